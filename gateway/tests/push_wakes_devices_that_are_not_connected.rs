//! Web Push end to end against a real push service (`web-push-testing`,
//! which checks VAPID and decrypts `aes128gcm`): a device that registered a
//! subscription and is not connected gets one push for a burst of 50
//! messages, carrying their count and nothing of their content; a connected
//! device that acknowledges gets none, nor does the sender's other device;
//! a device that connects within the wait is not pushed; a subscription the
//! service expired (410) is removed from storage. Bad registrations get a
//! clear error. In a fleet (three nodes, NATS, PostgreSQL) the node that
//! stored the message pushes, wherever the recipient's home is; a kill -9
//! of the storage-writer in a burst takes down nothing, and pushes resume
//! with the restarted writer.

use std::net::SocketAddr;
use std::time::Duration;

use base64ct::{Base64UrlUnpadded, Encoding};
use serde_json::{json, Value};
use testkit::fleet::Fleet;
use testkit::gateway::{Client, Gateway, Next, WAIT};
use testkit::webpush::{Subscription, WebPushService};

/// How long a connected device has to acknowledge, and the coalescing
/// window, in this test.
const ACK_WAIT_MS: u64 = 400;
const COALESCE_MS: u64 = 2_500;

struct Node {
    gateway: Gateway,
    writer_metrics: SocketAddr,
    _vapid: testkit::webpush::VapidKey,
    /// The VAPID public key (base64url), for subscribing.
    application_server_key: String,
}

/// A VAPID key in a file, the gateway flags that turn Web Push on with it
/// (and the writer's metrics on `metrics`, if given), and its public key.
fn push_flags(metrics: Option<SocketAddr>) -> (testkit::webpush::VapidKey, Vec<String>, String) {
    let key = testkit::webpush::VapidKey::generate();
    let mut writer_args = vec![
        "--push-vapid-key".to_owned(),
        key.path.display().to_string(),
        "--push-vapid-subject".into(),
        "mailto:ops@example.org".into(),
        "--push-ack-wait-ms".into(),
        ACK_WAIT_MS.to_string(),
        "--push-coalesce-ms".into(),
        COALESCE_MS.to_string(),
    ];
    if let Some(metrics) = metrics {
        writer_args.extend(["--metrics-listen".into(), metrics.to_string()]);
    }
    let mut flags: Vec<String> = vec!["--push-loopback-endpoints".into(), "true".into()];
    flags.extend(
        writer_args
            .iter()
            .map(|arg| format!("--storage-writer-arg={arg}")),
    );
    let public = Base64UrlUnpadded::encode_string(&key.public_key_raw);
    (key, flags, public)
}

fn start_node() -> Node {
    let writer_metrics: SocketAddr = format!("127.0.0.1:{}", testkit::free_port())
        .parse()
        .unwrap();
    let (dir, flags, application_server_key) = push_flags(Some(writer_metrics));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    Node {
        gateway: Gateway::start(&flags),
        writer_metrics,
        _vapid: dir,
        application_server_key,
    }
}

/// The storage-writer's metric `name` with `labels`, summed.
fn writer_metric(node: &Node, name: &str, labels: &[&str]) -> u64 {
    let (_, body) =
        testkit::gateway::http_get(node.writer_metrics, "/metrics").expect("metrics answer");
    testkit::gateway::metric_in(&body, name, labels)
}

fn register(client: &mut Client, id: &str, subscription: &Subscription) {
    client.send(json!({
        "type": "push_register",
        "id": id,
        "push": {
            "kind": "webpush",
            "endpoint": subscription.endpoint,
            "p256dh": subscription.p256dh,
            "auth": subscription.auth,
        }
    }));
    let answer = client.recv_type("push_registered");
    assert_eq!(
        (answer["id"].as_str(), answer["kind"].as_str()),
        (Some(id), Some("webpush"))
    );
}

/// Reads frames for `quiet`, acknowledging every message (a connected
/// client does); returns how many it acknowledged.
fn ack_for(client: &mut Client, quiet: Duration) -> usize {
    let mut acked = 0;
    let deadline = std::time::Instant::now() + quiet;
    client.set_timeout(Duration::from_millis(100));
    while std::time::Instant::now() < deadline {
        if let Next::Json(frame) = client.next_frame() {
            if frame["type"] == "message" {
                client.send(json!({"type": "ack", "message_id": frame["message_id"]}));
                acked += 1;
            }
        }
    }
    client.set_timeout(WAIT);
    acked
}

fn send_burst(alice: &mut Client, to: &str, count: usize, tag: &str) {
    for index in 0..count {
        alice.send_message(&format!("{tag}-{index}"), to, "secret body");
    }
    for _ in 0..count {
        alice.recv_type("sent");
    }
}

#[test]
fn an_offline_device_gets_one_content_free_push_per_burst_and_connected_ones_none() {
    let service = WebPushService::start();
    let node = start_node();
    let gateway = &node.gateway;
    let phone = service.subscribe(&node.application_server_key);
    let tablet = service.subscribe(&node.application_server_key);
    let laptop = service.subscribe(&node.application_server_key);

    // bob's phone registers and leaves; his tablet registers and stays.
    let mut bob_phone = gateway.connect("bob", "phone");
    register(&mut bob_phone, "r1", &phone);
    bob_phone.close();
    let mut bob_tablet = gateway.connect("bob", "tablet");
    register(&mut bob_tablet, "r2", &tablet);
    // alice's laptop registers and leaves: it gets her sends by sync, never a push.
    let mut alice_laptop = gateway.connect("alice", "laptop");
    register(&mut alice_laptop, "r3", &laptop);
    alice_laptop.close();

    let mut alice = gateway.connect("alice", "phone");
    send_burst(&mut alice, "bob", 50, "burst");
    assert_eq!(
        ack_for(&mut bob_tablet, Duration::from_millis(ACK_WAIT_MS * 3)),
        50
    );

    let pushes = service.wait_notifications(&phone, 1);
    // Past the coalescing window: still one push for the burst.
    std::thread::sleep(Duration::from_millis(COALESCE_MS + 1_000));
    let pushes_after = service.notifications(&phone);
    assert_eq!(
        pushes_after.len(),
        1,
        "one push for 50 messages: {pushes_after:?}"
    );
    let payload: Value = serde_json::from_str(pushes[0].as_str().expect("decrypted text"))
        .expect("the payload is JSON");
    assert_eq!(payload["type"], "new_messages");
    assert_eq!(payload["count"], 50, "{payload}");
    assert!(
        payload.get("from").is_none(),
        "content-free by default: {payload}"
    );
    assert!(!pushes[0].to_string().contains("secret body"));

    assert!(
        service.notifications(&tablet).is_empty(),
        "the connected tablet acknowledged"
    );
    assert!(
        service.notifications(&laptop).is_empty(),
        "never the sender's own device"
    );
    assert_eq!(
        writer_metric(
            &node,
            "storage_writer_push_sent_total",
            &["provider=\"webpush\""]
        ),
        1
    );

    // The phone connects within the wait after the next message: it syncs
    // and acknowledges, so its push is cancelled.
    alice.send_message("while-away", "bob", "x");
    alice.recv_type("sent");
    let mut bob_phone = gateway.connect_unsynced("bob", "phone");
    let synced = ack_for(
        &mut bob_phone,
        Duration::from_millis(ACK_WAIT_MS + COALESCE_MS + 500),
    );
    assert!(synced >= 51, "the phone syncs what it missed ({synced})");
    assert_eq!(
        service.notifications(&phone).len(),
        1,
        "no push for what it acknowledged"
    );
    bob_phone.close();

    // The service expires the phone's subscription: the next push gets
    // 410 and the target is removed, so later messages do not try again.
    service.expire(&phone);
    std::thread::sleep(Duration::from_millis(COALESCE_MS));
    alice.send_message("after-expiry", "bob", "x");
    alice.recv_type("sent");
    let deadline = std::time::Instant::now() + WAIT;
    while writer_metric(
        &node,
        "storage_writer_push_pruned_total",
        &["provider=\"webpush\""],
    ) < 1
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the expired subscription was not pruned"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(COALESCE_MS + 500));
    alice.send_message("after-prune", "bob", "x");
    alice.recv_type("sent");
    std::thread::sleep(Duration::from_millis(ACK_WAIT_MS * 3));
    assert_eq!(
        writer_metric(
            &node,
            "storage_writer_push_failed_total",
            &["reason=\"invalid_target\""]
        ),
        1,
        "a pruned target is not pushed again"
    );
}

#[test]
fn bad_registrations_get_a_clear_error() {
    let node = start_node();
    let mut client = node.gateway.connect("carol", "phone");
    let cases = [
        (
            json!({"type": "push_register", "id": "a"}),
            "`push` is required",
        ),
        (
            json!({"type": "push_register", "id": "b", "push": {"kind": "pigeon"}}),
            "`push` must be",
        ),
        (
            json!({"type": "push_register", "id": "c", "push": {"kind": "fcm", "token": "no spaces"}}),
            "FCM",
        ),
        (
            json!({"type": "push_register", "id": "d", "push": {"kind": "apns", "token": "12", "topic": "org.example"}}),
            "hex",
        ),
        (
            json!({"type": "push_register", "id": "e", "push": {"kind": "webpush", "endpoint": "http://push.example.org/x", "p256dh": "B".repeat(87), "auth": "a".repeat(22)}}),
            "https://",
        ),
        (
            json!({"type": "push_register", "id": "f", "push": {"kind": "webpush", "endpoint": "https://push.example.org/x", "p256dh": "short", "auth": "a".repeat(22)}}),
            "p256dh",
        ),
        (
            json!({"type": "push_register", "id": "g", "push": {"kind": "fcm", "token": "t", "extra": 1}}),
            "`push` must be",
        ),
    ];
    for (frame, expected) in cases {
        client.send(frame.clone());
        let error = client.recv_type("error");
        assert_eq!(error["code"], "invalid_field", "{frame}: {error}");
        assert!(
            error["message"].as_str().unwrap().contains(expected),
            "{frame}: {error}"
        );
        assert_eq!(error["id"], frame["id"], "{error}");
    }
    // A good one after all that, and its removal.
    client.send(json!({"type": "push_register", "id": "ok", "push": {"kind": "fcm", "token": "dXk:APA91b"}}));
    assert_eq!(client.recv_type("push_registered")["kind"], "fcm");
    client.send(json!({"type": "push_unregister", "id": "off"}));
    assert_eq!(client.recv_type("push_unregistered")["id"], "off");
}

#[test]
fn in_a_fleet_the_node_that_stored_the_message_pushes_wherever_home_is() {
    let service = WebPushService::start();
    let (_vapid, flags, application_server_key) = push_flags(None);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let fleet = Fleet::start_with(3, &flags);
    let phone = service.subscribe(&application_server_key);
    let tablet = service.subscribe(&application_server_key);
    // bob's phone registers on node 1 and leaves; his tablet stays on node 2.
    let mut bob_phone = fleet.nodes[1].connect("bob", "phone");
    register(&mut bob_phone, "r1", &phone);
    bob_phone.close();
    let mut bob_tablet = fleet.nodes[2].connect("bob", "tablet");
    register(&mut bob_tablet, "r2", &tablet);
    let mut alice = fleet.nodes[0].connect("alice", "phone");
    send_burst(&mut alice, "bob", 5, "fleet");
    assert_eq!(
        ack_for(&mut bob_tablet, Duration::from_millis(ACK_WAIT_MS * 3)),
        5
    );
    let pushes = service.wait_notifications(&phone, 1);
    let payload: Value = serde_json::from_str(pushes[0].as_str().unwrap()).unwrap();
    assert_eq!(payload["count"], 5, "{payload}");
    assert!(
        service.notifications(&tablet).is_empty(),
        "the tablet acknowledged across nodes"
    );
}

#[test]
fn a_writer_killed_in_a_burst_takes_nothing_down_and_pushes_resume() {
    let service = WebPushService::start();
    let node = start_node();
    let gateway = &node.gateway;
    let phone = service.subscribe(&node.application_server_key);
    let mut bob = gateway.connect("bob", "phone");
    register(&mut bob, "r1", &phone);
    bob.close();
    let mut alice = gateway.connect("alice", "phone");
    // The writer dies while the burst's pushes wait out their ack window.
    send_burst(&mut alice, "bob", 20, "before");
    testkit::signal(gateway.writer_pid().expect("a spawned writer"), "KILL");
    // The gateway restarts it; sends are acknowledged again once it is back.
    std::thread::sleep(Duration::from_millis(COALESCE_MS));
    send_burst(&mut alice, "bob", 5, "after");
    let pushes = service.wait_notifications(&phone, 1);
    let last: Value = serde_json::from_str(pushes.last().unwrap().as_str().unwrap()).unwrap();
    // The push after the restart counts everything bob has not acknowledged,
    // including the burst whose pending push died with the old writer.
    assert_eq!(last["count"], 25, "{last}");
    assert_eq!(
        gateway.admin_get("/healthz").map(|(status, _)| status),
        Some(200)
    );
}
