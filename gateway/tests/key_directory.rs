//! The end-to-end key directory with the real processes: devices upload
//! opaque public keys, anyone fetches one bundle per device, every one-time
//! prekey is handed out exactly once (also to concurrent fetchers on two
//! nodes sharing PostgreSQL), devices hear when they run low, and bad
//! uploads and fetch floods are refused.

use testkit::gateway as support;

use std::collections::HashSet;

use serde_json::{json, Value};
use support::postgres::Postgres;
use support::{Client, Gateway};

fn upload(client: &mut Client, prekeys: usize, tag: &str) -> Value {
    let one_time: Vec<String> = (0..prekeys).map(|i| format!("{tag}{i}")).collect();
    client.send(json!({
        "type": "keys_upload",
        "identity_key": format!("id{tag}"),
        "signed_prekey": format!("spk{tag}"),
        "signed_prekey_signature": format!("sig{tag}"),
        "one_time_prekeys": one_time,
    }));
    client.recv_type("keys_uploaded")
}

fn fetch(client: &mut Client, user: &str) -> Vec<Value> {
    client.send(json!({"type": "keys_fetch", "user": user}));
    let keys = client.recv_type("keys");
    assert_eq!(keys["user"], user);
    keys["devices"].as_array().unwrap().clone()
}

#[test]
fn a_fetch_takes_one_prekey_per_device_and_devices_hear_when_they_run_low() {
    let gateway = Gateway::start(&[]);
    let mut phone = gateway.connect("bob", "phone");
    let mut laptop = gateway.connect("bob", "laptop");
    assert_eq!(upload(&mut phone, 3, "p")["one_time_prekeys"], 3);
    assert_eq!(upload(&mut laptop, 1, "l")["one_time_prekeys"], 1);
    assert_eq!(
        upload(&mut phone, 2, "q")["one_time_prekeys"],
        5,
        "uploads add up"
    );

    let mut alice = gateway.connect("alice", "phone");
    let first = fetch(&mut alice, "bob");
    let devices: Vec<&str> = first
        .iter()
        .map(|d| d["device"].as_str().unwrap())
        .collect();
    assert_eq!(devices, ["laptop", "phone"], "the device list");
    assert_eq!(first[0]["one_time_prekey"], "l0");
    assert_eq!(first[1]["one_time_prekey"], "p0");
    // The latest upload's identity and signed prekey replaced the first's.
    assert_eq!(first[1]["identity_key"], "idq");
    assert_eq!(first[1]["signed_prekey_signature"], "sigq");

    let second = fetch(&mut alice, "bob");
    assert_eq!(
        second[0]["one_time_prekey"],
        Value::Null,
        "the laptop has none left"
    );
    assert_eq!(
        second[1]["one_time_prekey"], "p1",
        "never the same one twice"
    );

    // Both devices of bob hear that a device runs low (below 10 left).
    let low = phone.recv_type("keys_low");
    assert!(low["remaining"].as_u64().unwrap() < 10);
    laptop.recv_type("keys_low");

    // Unknown users have no devices.
    assert!(fetch(&mut alice, "nobody").is_empty());
}

#[test]
fn bad_uploads_and_fetch_floods_are_refused() {
    let gateway = Gateway::start(&[]);
    let mut bob = gateway.connect("bob", "phone");
    bob.send(json!({"type": "keys_upload", "identity_key": "not base64!", "signed_prekey": "a", "signed_prekey_signature": "b"}));
    let error = bob.recv();
    assert_eq!(error["code"], "invalid_field");
    assert!(error["message"].as_str().unwrap().contains("identity_key"));
    let too_many: Vec<String> = (0..101).map(|i| format!("k{i}")).collect();
    bob.send(json!({"type": "keys_upload", "identity_key": "a", "signed_prekey": "b", "signed_prekey_signature": "c", "one_time_prekeys": too_many}));
    assert_eq!(bob.recv()["code"], "invalid_field");
    bob.send(json!({"type": "keys_upload", "identity_key": "a", "signed_prekey": "b", "signed_prekey_signature": "c", "one_time_prekeys": "k"}));
    assert_eq!(bob.recv()["code"], "invalid_field");

    // The default allowance is a burst of 10 fetches; the next is refused.
    let mut alice = gateway.connect("alice", "phone");
    for _ in 0..10 {
        alice.send(json!({"type": "keys_fetch", "user": "bob"}));
    }
    alice.send(json!({"type": "keys_fetch", "user": "bob"}));
    let mut keys = 0;
    let mut refused = None;
    while keys < 10 || refused.is_none() {
        let frame = alice.recv();
        match frame["type"].as_str() {
            Some("keys") => keys += 1,
            Some("error") => refused = Some(frame),
            _ => {}
        }
    }
    let refused = refused.unwrap();
    assert_eq!(refused["code"], "rate_limited");
    assert!(refused["retry_after_ms"].as_u64().is_some());
}

#[test]
fn concurrent_fetches_on_two_nodes_never_share_a_prekey() {
    let database = Postgres::start();
    let mut flags = database.writer_flags();
    flags.extend(["--prekey-fetches-per-s".into(), "1000".into()]);
    flags.extend(["--prekey-fetches-burst".into(), "1000".into()]);
    let node = |id: &str| {
        let mut node_flags = flags.clone();
        node_flags.extend(["--node-id".into(), id.into()]);
        let node_flags: Vec<&str> = node_flags.iter().map(String::as_str).collect();
        Gateway::start(&node_flags)
    };
    let nodes = [node("1"), node("2")];
    fetch_concurrently_and_count(&nodes);
}

#[test]
fn concurrent_fetches_on_one_node_with_the_embedded_store_never_share_a_prekey() {
    let flags = [
        "--prekey-fetches-per-s",
        "1000",
        "--prekey-fetches-burst",
        "1000",
    ];
    let node = Gateway::start(&flags);
    fetch_concurrently_and_count(std::slice::from_ref(&node));
}

/// Bob uploads 40 one-time prekeys; four fetchers spread over `nodes` fetch
/// 15 times each at once (60 fetches): exactly 40 distinct prekeys come back.
fn fetch_concurrently_and_count(nodes: &[Gateway]) {
    let mut bob = nodes[0].connect("bob", "phone");
    assert_eq!(upload(&mut bob, 40, "k")["one_time_prekeys"], 40);
    let fetchers: Vec<_> = (0..4)
        .map(|index| {
            let mut client = nodes[index % nodes.len()].connect(&format!("fetcher{index}"), "d");
            std::thread::spawn(move || {
                (0..15)
                    .map(|_| fetch(&mut client, "bob")[0]["one_time_prekey"].clone())
                    .collect::<Vec<Value>>()
            })
        })
        .collect();
    let mut handed_out = Vec::new();
    for fetcher in fetchers {
        handed_out.extend(fetcher.join().unwrap());
    }
    let keys: Vec<&str> = handed_out.iter().filter_map(Value::as_str).collect();
    let distinct: HashSet<&str> = keys.iter().copied().collect();
    assert_eq!(keys.len(), 40, "every prekey handed out: {handed_out:?}");
    assert_eq!(distinct.len(), 40, "none handed out twice");
    assert_eq!(handed_out.iter().filter(|k| k.is_null()).count(), 20);
}
