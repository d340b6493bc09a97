//! A 1:1 message reaches every device of the recipient and the sender's other
//! devices; the sending device gets `sent`; order holds; users homed on
//! different shards reach each other and every device lives on its home shard.

use testkit::gateway as support;

use serde_json::json;
use support::{users_on_different_shards, Gateway};

#[test]
fn alice_to_bob_reaches_both_bob_devices_and_alice_other_device() {
    let gateway = Gateway::start(&[]);
    let mut alice_phone = gateway.connect("alice", "phone");
    let mut alice_laptop = gateway.connect("alice", "laptop");
    let mut bob_phone = gateway.connect("bob", "phone");
    let mut bob_tablet = gateway.connect("bob", "tablet");

    alice_phone.send(json!({"type": "send", "id": "c-1", "to": "bob", "body": "aGVsbG8="}));

    let sent = alice_phone.recv();
    assert_eq!(sent["type"], "sent");
    assert_eq!(sent["id"], "c-1");
    assert_eq!(sent["conversation"], "dm:alice:bob");
    let message_id = sent["message_id"].as_str().expect("message_id is a string");
    assert!(
        message_id.parse::<u64>().is_ok(),
        "message_id is a decimal 64-bit integer: {message_id}"
    );
    assert!(sent["ts"].as_u64().unwrap() > 1_767_225_600_000);

    for device in [&mut bob_phone, &mut bob_tablet, &mut alice_laptop] {
        let message = device.recv();
        assert_eq!(message["type"], "message");
        assert_eq!(message["message_id"], message_id);
        assert_eq!(message["conversation"], "dm:alice:bob");
        assert_eq!(message["from"], "alice");
        assert_eq!(message["from_device"], "phone");
        assert_eq!(message["to"], "bob");
        assert_eq!(message["body"], "aGVsbG8=");
        assert_eq!(message["ts"], sent["ts"]);
    }
    // The sending device gets `sent`, not its own message.
    alice_phone.expect_silence(std::time::Duration::from_millis(200));

    // Bob's reply uses the same conversation id.
    bob_tablet.send(json!({"type": "send", "id": "r-1", "to": "alice", "body": "eW8="}));
    assert_eq!(bob_tablet.recv()["conversation"], "dm:alice:bob");
    assert_eq!(alice_phone.recv()["from_device"], "tablet");
}

#[test]
fn users_homed_on_different_shards_reach_each_other_in_order() {
    let gateway = Gateway::start(&[]);
    let (user_a, user_b) = users_on_different_shards("u");
    let mut a_devices: Vec<_> = (0..3)
        .map(|d| gateway.connect(&user_a, &format!("d{d}")))
        .collect();
    let mut b_devices: Vec<_> = (0..3)
        .map(|d| gateway.connect(&user_b, &format!("d{d}")))
        .collect();

    // Every device is registered on its user's home shard, whichever shard accepted it.
    assert_eq!(gateway.metric("gateway_connections", &["shard=\"0\""]), 3);
    assert_eq!(gateway.metric("gateway_connections", &["shard=\"1\""]), 3);
    assert_eq!(
        gateway.metric("gateway_handoffs_sent_total", &[]),
        gateway.metric("gateway_handoffs_received_total", &[])
    );

    const COUNT: usize = 50;
    for index in 0..COUNT {
        a_devices[0].send(json!({"type": "send", "id": format!("m{index}"), "to": user_b, "body": index.to_string()}));
    }
    let mut sent_ids = Vec::new();
    for _ in 0..COUNT {
        sent_ids.push(
            a_devices[0].recv_type("sent")["message_id"]
                .as_str()
                .unwrap()
                .parse::<u64>()
                .unwrap(),
        );
    }
    assert!(
        sent_ids.windows(2).all(|pair| pair[0] < pair[1]),
        "ids increase in send order"
    );
    for device in b_devices.iter_mut().chain(a_devices[1..].iter_mut()) {
        for (index, expected_id) in sent_ids.iter().enumerate() {
            let message = device.recv();
            assert_eq!(message["body"], index.to_string(), "in order");
            assert_eq!(message["message_id"], expected_id.to_string());
        }
    }
    assert!(gateway.metric("gateway_messages_routed_cross_shard_total", &[]) >= COUNT as u64);
    assert!(gateway.metric("gateway_messages_received_cross_shard_total", &[]) >= COUNT as u64);
}

#[test]
fn a_message_to_a_user_with_no_connection_is_still_acknowledged() {
    let gateway = Gateway::start(&[]);
    let mut alice = gateway.connect("alice", "phone");
    alice.send(json!({"type": "send", "id": "c-1", "to": "nobody-here", "body": "x"}));
    assert_eq!(alice.recv()["type"], "sent");
}
