//! Idempotent sends: a repeated `id` from the same user and device gets the
//! same `sent` (same `message_id`) and is not delivered again.

use testkit::gateway as support;

use std::time::Duration;

use serde_json::json;
use support::Gateway;

#[test]
fn a_resent_id_yields_the_same_message_id_and_no_second_delivery() {
    let gateway = Gateway::start(&[]);
    let mut alice = gateway.connect("alice", "phone");
    let mut bob = gateway.connect("bob", "phone");

    let send = json!({"type": "send", "id": "retry-me", "to": "bob", "body": "once"});
    alice.send(send.clone());
    let first = alice.recv();
    assert_eq!(bob.recv()["message_id"], first["message_id"]);

    alice.send(send.clone());
    let second = alice.recv();
    assert_eq!(
        second, first,
        "the retry is answered exactly as the first send"
    );
    bob.expect_silence(Duration::from_millis(300));
    assert_eq!(gateway.metric("gateway_idempotent_replays_total", &[]), 1);
}

#[test]
fn a_retry_on_a_new_connection_of_the_same_device_is_still_deduplicated() {
    let gateway = Gateway::start(&[]);
    let mut bob = gateway.connect("bob", "phone");
    let send = json!({"type": "send", "id": "net-blip", "to": "bob", "body": "once"});

    let mut alice = gateway.connect("alice", "phone");
    alice.send(send.clone());
    let first = alice.recv();
    alice.close();
    assert_eq!(bob.recv()["message_id"], first["message_id"]);

    let mut alice_again = gateway.connect("alice", "phone");
    alice_again.send(send);
    assert_eq!(alice_again.recv()["message_id"], first["message_id"]);
    bob.expect_silence(Duration::from_millis(300));
}

#[test]
fn the_same_id_from_another_device_is_a_different_message() {
    let gateway = Gateway::start(&[]);
    let mut phone = gateway.connect("alice", "phone");
    let mut laptop = gateway.connect("alice", "laptop");
    phone.send(json!({"type": "send", "id": "same", "to": "bob", "body": "1"}));
    let from_phone = phone.recv();
    laptop.recv_type("message");
    laptop.send(json!({"type": "send", "id": "same", "to": "bob", "body": "2"}));
    let from_laptop = laptop.recv_type("sent");
    assert_ne!(from_phone["message_id"], from_laptop["message_id"]);
}
