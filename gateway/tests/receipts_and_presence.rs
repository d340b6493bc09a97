//! Receipts and presence against the real binary: delivered and read
//! receipts reach the sender batched per conversation (many reads, few
//! frames), wait in storage for an offline sender, and name the member in a
//! group; presence answers only about users the asker shares a
//! conversation with, and goes offline with a last-seen time.

use testkit::gateway as support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::Gateway;

/// Reads `receipts` frames (skipping others) until one says `user` has
/// `status` up to `up_to`; returns how many `receipts` frames it read.
fn receipts_until(client: &mut support::Client, user: &str, status: &str, up_to: &str) -> usize {
    let mut frames = 0;
    for _ in 0..200 {
        let frame = client.recv();
        if frame["type"] != "receipts" {
            continue;
        }
        frames += 1;
        let done = frame["receipts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["user"] == user && r["status"] == status && r["up_to"] == up_to);
        if done {
            return frames;
        }
    }
    panic!("no {status} receipt from {user} up to {up_to}");
}

#[test]
fn many_reads_become_few_receipt_frames_and_wait_for_an_offline_sender() {
    let gateway = Gateway::start(&["--receipt-window-ms", "300"]);
    let mut alice = gateway.connect("alice", "phone");
    let mut bob = gateway.connect("bob", "phone");
    let conversation = chat_protocol::ids::direct_conversation_id("alice", "bob");

    // 30 messages; bob acknowledges each (naming the sender) and reads each.
    for i in 0..30 {
        alice.send_message(&format!("c{i}"), "bob", &format!("m{i}"));
    }
    let mut last_id = String::new();
    for _ in 0..30 {
        let message = bob.recv_type("message");
        last_id = message["message_id"].as_str().unwrap().to_owned();
        bob.send(json!({"type": "ack", "message_id": last_id,
                        "conversation": conversation, "from": "alice"}));
        bob.send(json!({"type": "read", "conversation": conversation, "up_to": last_id}));
    }
    // 60 receipts, a few frames (one per 300 ms window), highest id kept.
    let frames = receipts_until(&mut alice, "bob", "read", &last_id);
    assert!(frames <= 3, "{frames} receipt frames for 60 receipts");
    let batch_count = gateway.metric("gateway_receipt_batches_total", &[]);
    assert!(batch_count <= 3, "{batch_count} batches");
    assert_eq!(gateway.metric("gateway_receipts_total", &[]), 60);

    // Alice goes away; bob reads again. Alice's next connect syncs the receipt.
    alice.close();
    bob.send(json!({"type": "read", "conversation": conversation, "up_to": last_id}));
    let deadline = Instant::now() + Duration::from_secs(10);
    while gateway.metric("gateway_receipt_batches_total", &[]) <= batch_count {
        assert!(Instant::now() < deadline, "the read was never batched");
        std::thread::sleep(Duration::from_millis(50));
    }
    let laptop = gateway.connect("alice", "laptop");
    let synced: Vec<&Value> = laptop
        .synced
        .iter()
        .filter(|f| f["type"] == "receipts")
        .collect();
    assert!(
        !synced.is_empty(),
        "receipts wait in storage: {:?}",
        laptop.synced
    );
    assert_eq!(
        synced.last().unwrap()["conversation"],
        conversation.as_str()
    );

    // A receipt about a conversation bob is not in is refused.
    bob.send(json!({"type": "read", "conversation": "dm:alice:carol", "up_to": last_id}));
    assert_eq!(bob.recv_type("error")["code"], "invalid_field");
}

#[test]
fn group_receipts_name_the_member_and_go_to_the_sender_only() {
    let gateway = Gateway::start(&["--receipt-window-ms", "100"]);
    let mut alice = gateway.connect("alice", "phone");
    let mut bob = gateway.connect("bob", "phone");
    let mut carol = gateway.connect("carol", "phone");
    let group = alice.create_group("g", &["bob", "carol"]);
    alice.send(json!({"type": "send", "id": "q", "group": group, "body": "lunch?"}));
    let conversation = format!("grp:{group}");
    for client in [&mut bob, &mut carol] {
        let message = client.messages_until("lunch?").pop().unwrap();
        let id = message["message_id"].as_str().unwrap().to_owned();
        client.send(
            json!({"type": "read", "conversation": conversation, "up_to": id, "from": "alice"}),
        );
    }
    let mut readers = Vec::new();
    while readers.len() < 2 {
        let frame = alice.recv_type("receipts");
        assert_eq!(frame["conversation"], conversation.as_str());
        for receipt in frame["receipts"].as_array().unwrap() {
            assert_eq!(receipt["status"], "read");
            readers.push(receipt["user"].as_str().unwrap().to_owned());
        }
    }
    readers.sort();
    assert_eq!(readers, ["bob", "carol"]);
    // Carol is not told about bob's read.
    carol.expect_silence(Duration::from_millis(300));
    // A group read must name the sender.
    bob.send(json!({"type": "read", "conversation": conversation, "up_to": "5"}));
    assert_eq!(bob.recv_type("error")["code"], "invalid_field");
}

#[test]
fn presence_is_for_conversation_partners_only_and_ends_with_a_last_seen() {
    let gateway = Gateway::start(&["--presence-interval-ms", "400"]);
    let mut alice = gateway.connect("alice", "phone");
    let bob = gateway.connect("bob", "phone");
    let _stranger = gateway.connect("stranger", "phone");
    alice.send_message("hello", "bob", "hi");
    alice.recv_type("sent");

    // Strangers' presence is refused, and the answer names no one else.
    alice.send(json!({"type": "presence", "users": ["bob", "stranger"]}));
    let refused = alice.recv_type("error");
    assert_eq!(refused["code"], "forbidden");
    assert!(refused["message"].as_str().unwrap().contains("stranger"));
    assert!(!refused["message"].as_str().unwrap().contains("bob"));

    let ask = |alice: &mut support::Client| {
        alice.send(json!({"type": "presence", "users": ["bob"]}));
        alice.recv_type("presence")["users"][0].clone()
    };
    // Online (written within about a second of connecting).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let bob_now = ask(&mut alice);
        if bob_now["online"] == true {
            assert!(bob_now.get("last_seen").is_none());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "bob never showed online: {bob_now}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Gone: after the next full write, offline with the time he left.
    let left_ms = support::unix_s() * 1000;
    bob.close();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let bob_now = ask(&mut alice);
        if bob_now["online"] == false {
            let last_seen = bob_now["last_seen"].as_u64().expect("a last-seen time");
            assert!(last_seen + 2_000 >= left_ms, "{last_seen} vs {left_ms}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "bob never went offline: {bob_now}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(gateway.metric("gateway_presence_written_total", &[]) >= 2);

    // Rate-limited per user (burst 10).
    for _ in 0..12 {
        alice.send(json!({"type": "presence", "users": ["bob"]}));
    }
    let mut limited = false;
    for _ in 0..12 {
        let frame = alice.recv();
        if frame["code"] == "rate_limited" {
            assert!(frame["retry_after_ms"].as_u64().is_some());
            limited = true;
        }
    }
    assert!(limited, "the presence bucket never ran out");
}
