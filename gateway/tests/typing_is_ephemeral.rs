//! `typing` reaches the other user's devices at once, is never stored or
//! replayed, is rate-limited per user, and is refused to oneself.

use testkit::gateway as support;

use std::time::Duration;

use serde_json::json;
use support::{users_on_different_shards, Gateway};

#[test]
fn typing_reaches_the_other_users_devices_and_is_never_stored() {
    let gateway = Gateway::start(&[]);
    // Homed on different shards: the indication crosses the mesh.
    let (alice, bob) = users_on_different_shards("typist");
    let mut alice_phone = gateway.connect(&alice, "phone");
    let mut alice_laptop = gateway.connect(&alice, "laptop");
    let mut bob_phone = gateway.connect(&bob, "phone");
    let mut bob_laptop = gateway.connect(&bob, "laptop");

    alice_phone.send(json!({"type": "typing", "to": bob}));
    for device in [&mut bob_phone, &mut bob_laptop] {
        let typing = device.recv();
        assert_eq!(typing["type"], "typing");
        assert_eq!(typing["from"], alice.as_str());
        assert_eq!(typing["from_device"], "phone");
        assert_eq!(
            typing["conversation"],
            chat_protocol::ids::direct_conversation_id(&alice, &bob)
        );
        assert_eq!(typing["expires_ms"], 5000);
    }
    alice_laptop.expect_silence(Duration::from_millis(200));

    // Not stored: a new device syncs nothing, history is empty.
    let mut bob_tablet = gateway.connect(&bob, "tablet");
    assert!(bob_tablet.synced.is_empty());
    let conversation = chat_protocol::ids::direct_conversation_id(&alice, &bob);
    assert!(bob_tablet.history(&conversation, None, 10).is_empty());
    assert_eq!(gateway.metric("gateway_typing_total", &[]), 1);
}

#[test]
fn typing_is_rate_limited_per_user_and_not_to_oneself() {
    let gateway = Gateway::start(&[]);
    let mut alice = gateway.connect("alice", "phone");
    let mut bob = gateway.connect("bob", "phone");

    alice.send(json!({"type": "typing", "to": "alice"}));
    assert_eq!(alice.recv()["code"], "invalid_field");

    // The default burst is 5; the sixth in a row is refused.
    for _ in 0..6 {
        alice.send(json!({"type": "typing", "to": "bob"}));
    }
    let refused = alice.recv();
    assert_eq!(refused["code"], "rate_limited");
    assert!(refused["retry_after_ms"].as_u64().is_some());
    for _ in 0..5 {
        assert_eq!(bob.recv()["type"], "typing");
    }
    bob.expect_silence(Duration::from_millis(200));
    alice.ping();
}
