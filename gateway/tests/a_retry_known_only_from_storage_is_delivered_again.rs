//! A retry of a send that the node knows only from storage (loaded when the
//! device reconnected after a restart, or to another node after its node
//! died) gets the first `sent`, and its message is delivered again under the
//! first `message_id`: the node that stored it may have died before
//! delivering it. A retry the node knows from its own ring is never
//! delivered again (`resent_send_id_is_not_delivered_twice.rs`).

use testkit::gateway::Gateway;

#[test]
fn a_retry_after_a_restart_reaches_the_online_recipient_under_its_first_id() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().to_str().unwrap();
    let mut gateway = Gateway::start(&["--data-dir", dir]);
    let mut alice = gateway.connect("alice", "phone");
    alice.send_message("c1", "bob", "hello");
    let first = alice.recv_type("sent");
    gateway.kill9();

    // The restarted node knows `c1` only from storage (alice's warm-up).
    let gateway = Gateway::start(&["--data-dir", dir]);
    let mut bob = gateway.connect("bob", "phone");
    let synced: Vec<_> = bob.synced.iter().map(|m| m["message_id"].clone()).collect();
    assert_eq!(
        synced,
        [first["message_id"].clone()],
        "stored before the kill"
    );
    let mut alice = gateway.connect("alice", "phone");
    alice.send_message("c1", "bob", "hello");
    let replayed = alice.recv_type("sent");
    assert_eq!(replayed["message_id"], first["message_id"], "the first id");

    let again = bob.recv_type("message");
    assert_eq!(again["message_id"], first["message_id"]);
    assert_eq!(again["body"], "hello");
    assert_eq!(
        gateway.metric("gateway_redeliveries_after_failover_total", &[]),
        1
    );

    // A new send after it is delivered once, and nothing else arrives.
    alice.send_message("c2", "bob", "second");
    let sent = alice.recv_type("sent");
    let live = bob.recv_type("message");
    assert_eq!(live["message_id"], sent["message_id"]);
    bob.expect_silence(std::time::Duration::from_millis(300));
}
