//! Idempotency holds for its window and no longer: with the window cut to a
//! second, a retry inside it is answered with the first message id, and once
//! the storage-writer's cleanup has removed the key (every second here) a
//! retry is a new message, as `docs/protocol.md` says. The first message
//! stays in the conversation: only the key expires.

use std::time::{Duration, Instant};

use testkit::gateway::Gateway;

#[test]
fn a_retry_after_the_window_is_a_new_message_and_the_first_stays() {
    let gateway = Gateway::start(&[
        "--idempotency-window-ms",
        "1000",
        "--storage-writer-arg",
        "--cleanup-interval-s",
        "--storage-writer-arg",
        "1",
    ]);
    let mut alice = gateway.connect("alice", "phone");
    alice.send_message("x", "bob", "hello");
    let first = alice.recv_type("sent")["message_id"].clone();
    alice.send_message("x", "bob", "hello");
    assert_eq!(
        alice.recv_type("sent")["message_id"],
        first,
        "inside the window"
    );

    // Past the window (in the node's memory and, after a cleanup pass, in
    // storage) the same id makes a new message.
    let deadline = Instant::now() + Duration::from_secs(30);
    let second = loop {
        assert!(Instant::now() < deadline, "the key never expired");
        std::thread::sleep(Duration::from_millis(500));
        alice.send_message("x", "bob", "hello");
        let answer = alice.recv_type("sent")["message_id"].clone();
        if answer != first {
            break answer;
        }
    };
    let history = alice.history("dm:alice:bob", None, 10);
    let ids: Vec<&serde_json::Value> = history.iter().map(|m| &m["message_id"]).collect();
    assert_eq!(ids, [&second, &first], "both messages, newest first");
}
