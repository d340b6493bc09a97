//! The PostgreSQL backend behind a real gateway and storage-writer, against a
//! real PostgreSQL server started for the test: what is acknowledged is in
//! the database, so a node that restarts on an empty data directory still
//! syncs it, answers history from it and recognises a retried send.

mod support;

use serde_json::json;
use support::postgres::Postgres;
use support::Gateway;

#[test]
fn messages_live_in_postgres_across_a_gateway_kill_on_a_fresh_data_dir() {
    let database = Postgres::start();
    let flags = database.writer_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();

    let mut gateway = Gateway::start(&flags);
    let mut alice = gateway.connect("alice", "phone");
    let mut ids = Vec::new();
    for index in 0..3 {
        alice.send_message(&format!("c{index}"), "bob", &format!("m{index}"));
        ids.push(alice.recv_type("sent")["message_id"].clone());
    }
    gateway.kill9();

    // A new node (new data directory, so no ring or local state) on the same database.
    let gateway = Gateway::start(&flags);
    let mut alice = gateway.connect("alice", "phone");
    alice.send_message("c1", "bob", "m1");
    assert_eq!(
        alice.recv_type("sent")["message_id"],
        ids[1],
        "retry keeps its id"
    );
    let mut bob = gateway.connect("bob", "phone");
    let bodies: Vec<&str> = bob
        .synced
        .iter()
        .map(|m| m["body"].as_str().unwrap())
        .collect();
    assert_eq!(bodies, ["m0", "m1", "m2"]);
    let history = bob.history("dm:alice:bob", None, 10);
    assert_eq!(history.len(), 3);
    assert_eq!(history[0]["message_id"], ids[2]);

    bob.send(json!({"type": "ack", "message_id": ids[2]}));
    gateway.wait_metric("gateway_acks_total", &[], 1);
    bob.ping();
    bob.close();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let bob = gateway.connect("bob", "phone");
    assert!(
        bob.synced.is_empty(),
        "acknowledged in the database: {:?}",
        bob.synced
    );
}
