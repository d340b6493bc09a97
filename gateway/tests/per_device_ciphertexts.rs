//! Per-device ciphertexts against the real binary: a send with `bodies`
//! gives each device only its own ciphertext (live, on sync and in
//! history), and one that leaves out a current device of the recipient or
//! of the sender's other devices is refused with the list of them.

use testkit::gateway as support;

use serde_json::{json, Value};
use support::{Client, Gateway};

fn upload_keys(client: &mut Client, tag: &str) {
    client.send(json!({
        "type": "keys_upload",
        "identity_key": format!("id{tag}"),
        "signed_prekey": format!("spk{tag}"),
        "signed_prekey_signature": format!("sig{tag}"),
        "one_time_prekeys": [format!("otk{tag}")],
    }));
    client.recv_type("keys_uploaded");
}

fn devices(error: &Value) -> Vec<(String, String)> {
    let mut listed: Vec<(String, String)> = error["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["user"].as_str().unwrap().into(),
                d["device"].as_str().unwrap().into(),
            )
        })
        .collect();
    listed.sort();
    listed
}

#[test]
fn each_device_gets_only_its_own_ciphertext_and_a_missing_device_is_listed() {
    let gateway = Gateway::start(&[]);
    let mut alice_phone = gateway.connect("alice", "phone");
    let mut alice_laptop = gateway.connect("alice", "laptop");
    let mut bob_phone = gateway.connect("bob", "phone");
    let mut bob_tablet = gateway.connect("bob", "tablet");
    for (client, tag) in [
        (&mut alice_phone, "ap"),
        (&mut alice_laptop, "al"),
        (&mut bob_phone, "bp"),
        (&mut bob_tablet, "bt"),
    ] {
        upload_keys(client, tag);
    }

    // The device list costs no one-time prekey: a fetch after it still gets one.
    for _ in 0..2 {
        alice_phone.send(json!({"type": "devices", "user": "bob"}));
        let listed = alice_phone.recv_type("devices");
        assert_eq!(listed["devices"], json!(["phone", "tablet"]), "{listed}");
    }
    alice_phone.send(json!({"type": "keys_fetch", "user": "bob"}));
    let keys = alice_phone.recv_type("keys");
    for device in keys["devices"].as_array().unwrap() {
        assert!(device["one_time_prekey"].is_string(), "{keys}");
    }
    // That fetch left each of bob's devices with none: both of them hear it.
    for client in [&mut bob_phone, &mut bob_tablet] {
        for _ in 0..2 {
            assert_eq!(client.recv_type("keys_low")["remaining"], 0);
        }
    }

    // Leaving out bob's tablet and alice's own laptop: refused, both listed.
    alice_phone.send(json!({"type": "send", "id": "p1", "to": "bob",
                            "bodies": {"phone": "for-bob-phone"}}));
    let refused = alice_phone.recv_type("error");
    assert_eq!(
        (refused["code"].as_str(), refused["id"].as_str()),
        (Some("missing_devices"), Some("p1"))
    );
    assert_eq!(
        devices(&refused),
        [
            ("alice".into(), "laptop".into()),
            ("bob".into(), "tablet".into())
        ]
    );
    bob_phone.expect_silence(std::time::Duration::from_millis(150));

    // Every device addressed: each gets its own, nobody else's.
    alice_phone.send(json!({"type": "send", "id": "p2", "to": "bob", "bodies": {
        "phone": "for-bob-phone", "tablet": "for-bob-tablet", "alice/laptop": "for-alice-laptop"}}));
    assert_eq!(alice_phone.recv_type("sent")["id"], "p2");
    for (client, expected) in [
        (&mut bob_phone, "for-bob-phone"),
        (&mut bob_tablet, "for-bob-tablet"),
        (&mut alice_laptop, "for-alice-laptop"),
    ] {
        let message = client.recv_type("message");
        assert_eq!(message["body"], expected);
        assert!(
            message.get("bodies").is_none(),
            "no other device's ciphertext: {message}"
        );
    }

    // On sync and in history, too: a device sees its own, never another's.
    bob_tablet.close();
    let tablet_again = gateway.connect("bob", "tablet");
    assert_eq!(tablet_again.synced.len(), 1);
    assert_eq!(tablet_again.synced[0]["body"], "for-bob-tablet");
    let conversation = chat_protocol::ids::direct_conversation_id("alice", "bob");
    let history = bob_phone.history(&conversation, None, 10);
    assert_eq!(history[0]["body"], "for-bob-phone");
    // A device that was not addressed (it came later) is given no body.
    let mut bob_watch = gateway.connect("bob", "watch");
    assert!(bob_watch.synced.is_empty(), "{:?}", bob_watch.synced);
    assert_eq!(bob_watch.history(&conversation, None, 10)[0]["body"], "");

    // A device that uploaded keys since is required from then on.
    upload_keys(&mut bob_watch, "bw");
    alice_phone.send(json!({"type": "send", "id": "p3", "to": "bob", "bodies": {
        "phone": "x", "tablet": "y", "alice/laptop": "z"}}));
    assert_eq!(
        devices(&alice_phone.recv_type("error")),
        [("bob".into(), "watch".into())]
    );

    // `bodies` with `body`, or in a group, is refused.
    alice_phone.send(
        json!({"type": "send", "id": "p4", "to": "bob", "body": "b", "bodies": {"phone": "x"}}),
    );
    assert_eq!(alice_phone.recv_type("error")["code"], "invalid_field");
    alice_phone.send(json!({"type": "send", "id": "p5", "group": "g1", "bodies": {"phone": "x"}}));
    assert_eq!(alice_phone.recv_type("error")["code"], "invalid_field");
}
