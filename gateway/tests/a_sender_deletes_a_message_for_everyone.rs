//! Delete for everyone: the sender withdraws its message with a `send`
//! that names it in `delete`. Every device of both sides hears it live, a
//! device that was away syncs the tombstone (no body) and the delete, and
//! history shows the tombstone in the message's place. Someone else's
//! message, a message of another conversation and a message older than
//! `delete_window_ms` are refused with `forbidden`, and nothing is stored
//! or delivered for them. A retried delete is answered with its first id.

use std::time::Duration;

use serde_json::{json, Value};
use testkit::gateway::Gateway;

const WINDOW_MS: u64 = 3_000;

/// The next `message` frame, skipping receipts and other notices.
fn next_message(client: &mut testkit::gateway::Client) -> Value {
    loop {
        let frame = client.recv();
        if frame["type"] == "message" {
            return frame;
        }
    }
}

fn delete(client: &mut testkit::gateway::Client, id: &str, to: &str, target: &Value) {
    client.send(json!({"type": "send", "id": id, "to": to, "delete": target}));
}

#[test]
fn only_the_sender_deletes_within_the_window_and_every_device_sees_the_tombstone() {
    let window = WINDOW_MS.to_string();
    let gateway = Gateway::start(&["--delete-window-ms", &window]);
    let mut alice = gateway.connect("alice", "phone");
    let mut alice_laptop = gateway.connect("alice", "laptop");
    let mut bob = gateway.connect("bob", "phone");
    let mut carol = gateway.connect("carol", "phone");

    alice.send_message("m1", "bob", "secret");
    let target = alice.recv_type("sent")["message_id"].clone();
    assert_eq!(next_message(&mut bob)["body"], "secret");
    assert_eq!(next_message(&mut alice_laptop)["body"], "secret");

    // Not the sender, and not this conversation: refused, nothing stored.
    delete(&mut bob, "d-bob", "alice", &target);
    let refused = bob.recv_type("error");
    assert_eq!(refused["code"], "forbidden", "{refused}");
    assert_eq!(refused["id"], "d-bob");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("only its sender"),
        "{refused}"
    );
    delete(&mut carol, "d-carol", "bob", &target);
    let refused = carol.recv_type("error");
    assert_eq!(refused["code"], "forbidden", "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("no such message"),
        "{refused}"
    );

    // The sender deletes it: both sides' devices hear it live.
    delete(&mut alice, "d1", "bob", &target);
    let deletion = alice.recv_type("sent")["message_id"].clone();
    for device in [&mut bob, &mut alice_laptop] {
        let notice = next_message(device);
        assert_eq!(notice["message_id"], deletion, "{notice}");
        assert_eq!(notice["deletes"], target, "{notice}");
        assert_eq!(notice["body"], "", "{notice}");
    }
    // A retry of the same delete is answered with its first id.
    delete(&mut alice, "d1", "bob", &target);
    assert_eq!(alice.recv_type("sent")["message_id"], deletion);
    bob.expect_silence(Duration::from_millis(300));

    // A device that was away: the tombstone in the message's place, then
    // the delete; no trace of what it said.
    let tablet = gateway.connect("bob", "tablet");
    let synced: Vec<&Value> = tablet.synced.iter().collect();
    assert_eq!(synced.len(), 2, "{synced:?}");
    assert_eq!(synced[0]["message_id"], target);
    assert_eq!(synced[0]["deleted"], true, "{}", synced[0]);
    assert_eq!(synced[0]["body"], "");
    assert_eq!(synced[1]["deletes"], target);
    assert!(!synced.iter().any(|m| m.to_string().contains("secret")));

    // History agrees, newest first.
    let history = bob.history("dm:alice:bob", None, 10);
    assert_eq!(history.len(), 2, "{history:?}");
    assert_eq!(history[0]["deletes"], target);
    assert_eq!(
        (history[1]["deleted"].clone(), history[1]["body"].clone()),
        (json!(true), json!(""))
    );

    // Past the window: refused before anything is stored.
    alice.send_message("m2", "bob", "later");
    let late = alice.recv_type("sent")["message_id"].clone();
    next_message(&mut bob);
    std::thread::sleep(Duration::from_millis(WINDOW_MS + 300));
    delete(&mut alice, "d2", "bob", &late);
    let refused = alice.recv_type("error");
    assert_eq!(refused["code"], "forbidden", "{refused}");
    assert!(
        refused["message"].as_str().unwrap().contains("within"),
        "{refused}"
    );
    let history = bob.history("dm:alice:bob", None, 10);
    assert_eq!(history[0]["body"], "later", "still there: {history:?}");
    bob.expect_silence(Duration::from_millis(300));
}

#[test]
fn a_group_message_is_deleted_for_every_member() {
    let gateway = Gateway::start(&[]);
    let mut alice = gateway.connect("alice", "phone");
    let mut bob = gateway.connect("bob", "phone");
    let mut dave = gateway.connect("dave", "phone");
    let group = alice.create_group("g", &["bob", "dave"]);
    for member in [&mut bob, &mut dave] {
        next_message(member); // the creation
    }
    alice.send(json!({"type": "send", "id": "gm", "group": group, "body": "oops"}));
    let target = alice.recv_type("sent")["message_id"].clone();
    for member in [&mut bob, &mut dave] {
        assert_eq!(next_message(member)["body"], "oops");
    }
    // A member may not delete another's message.
    bob.send(json!({"type": "send", "id": "gd-bob", "group": group, "delete": target}));
    assert_eq!(bob.recv_type("error")["code"], "forbidden");
    alice.send(json!({"type": "send", "id": "gd", "group": group, "delete": target}));
    alice.recv_type("sent");
    for member in [&mut bob, &mut dave] {
        let notice = next_message(member);
        assert_eq!(notice["deletes"], target, "{notice}");
        assert_eq!(notice["group"], group);
    }
    let history = dave.history(&format!("grp:{group}"), None, 10);
    let deleted: Vec<&Value> = history.iter().filter(|m| m["deleted"] == true).collect();
    assert_eq!(deleted.len(), 1, "{history:?}");
    assert_eq!(deleted[0]["message_id"], target);
}
