//! The durable path, end to end with the real processes: messages to
//! offline users, sync and acknowledgements, history, idempotency across a
//! restart, `kill -9` of the gateway and of the storage-writer, and a full
//! ring's back-pressure. Every client is a real WebSocket over loopback.

use testkit::gateway as support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{Gateway, Writer, WAIT};

fn bodies(messages: &[Value]) -> Vec<String> {
    messages
        .iter()
        .map(|m| m["body"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn a_message_to_an_offline_user_arrives_once_in_order_on_each_of_their_devices() {
    let gateway = Gateway::start(&[]);
    let mut alice = gateway.connect("alice", "phone");
    for index in 0..5 {
        alice.send_message(&format!("c{index}"), "bob", &format!("m{index}"));
        assert_eq!(alice.recv_type("sent")["id"], format!("c{index}"));
    }
    let expected: Vec<String> = (0..5).map(|i| format!("m{i}")).collect();

    let mut phone = gateway.connect("bob", "phone");
    assert_eq!(
        bodies(&phone.synced),
        expected,
        "phone gets the backlog in order"
    );
    let mut laptop = gateway.connect("bob", "laptop");
    assert_eq!(
        bodies(&laptop.synced),
        expected,
        "each device has its own state"
    );
    phone.expect_silence(Duration::from_millis(300));

    // Acknowledging the last message is cumulative for the conversation.
    let last = phone.synced.last().unwrap()["message_id"].clone();
    phone.send(json!({"type": "ack", "message_id": last}));
    gateway.wait_metric("gateway_acks_total", &[], 1);
    phone.ping();
    phone.close();
    std::thread::sleep(Duration::from_millis(200));
    let phone = gateway.connect("bob", "phone");
    assert!(
        phone.synced.is_empty(),
        "acknowledged: not sent again: {:?}",
        phone.synced
    );

    // The laptop acknowledged nothing: a new sync offers everything again.
    laptop.send(json!({"type": "sync"}));
    let mut again = Vec::new();
    loop {
        let frame = laptop.recv();
        if frame["type"] == "synced" {
            assert_eq!(frame["count"], 5);
            assert_eq!(frame["more"], false);
            assert_eq!(frame["last"], last);
            break;
        }
        again.push(frame);
    }
    assert_eq!(bodies(&again), expected);
}

#[test]
fn live_messages_during_a_sync_are_neither_lost_nor_doubled() {
    let gateway = Gateway::start(&[]);
    let mut alice = gateway.connect("alice", "phone");
    for index in 0..50 {
        alice.send_message(&format!("before{index}"), "bob", &format!("b{index}"));
    }
    for _ in 0..50 {
        alice.recv_type("sent");
    }
    // Bob connects while alice keeps sending: each message must reach him
    // exactly once, from the sync or live.
    let sender = std::thread::spawn(move || {
        for index in 0..50 {
            alice.send_message(&format!("during{index}"), "bob", &format!("d{index}"));
            std::thread::sleep(Duration::from_millis(1));
        }
        for _ in 0..50 {
            alice.recv_type("sent");
        }
        alice
    });
    let mut bob = gateway.connect("bob", "phone");
    let mut seen: Vec<String> = bodies(&bob.synced);
    let deadline = Instant::now() + WAIT;
    while seen.len() < 100 && Instant::now() < deadline {
        let frame = bob.recv();
        if frame["type"] == "message" {
            seen.push(frame["body"].as_str().unwrap().to_owned());
        }
    }
    sender.join().unwrap();
    bob.expect_silence(Duration::from_millis(300));
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for body in &seen {
        *counts.entry(body).or_default() += 1;
    }
    assert_eq!(seen.len(), 100, "every message once: {seen:?}");
    assert!(counts.values().all(|c| *c == 1), "duplicates: {counts:?}");
    let during: Vec<&String> = seen.iter().filter(|b| b.starts_with('d')).collect();
    let in_order: Vec<String> = (0..50).map(|i| format!("d{i}")).collect();
    assert_eq!(
        during,
        in_order.iter().collect::<Vec<_>>(),
        "one sender's messages stay in order"
    );
}

#[test]
fn sync_after_a_message_and_history_pages_work_for_members_only() {
    let gateway = Gateway::start(&[]);
    let mut alice = gateway.connect("alice", "phone");
    let mut ids = Vec::new();
    for index in 0..7 {
        alice.send_message(&format!("c{index}"), "bob", &format!("m{index}"));
        ids.push(
            alice.recv_type("sent")["message_id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let mut bob = gateway.connect("bob", "phone");
    assert_eq!(bob.synced.len(), 7);
    bob.send(json!({"type": "sync", "after": ids[4]}));
    assert_eq!(bob.recv()["body"], "m5");
    assert_eq!(bob.recv()["body"], "m6");
    assert_eq!(bob.recv()["type"], "synced");

    let conversation = "dm:alice:bob";
    let newest = bob.history(conversation, None, 3);
    assert_eq!(bodies(&newest), ["m6", "m5", "m4"], "newest first");
    let older = bob.history(conversation, Some(&ids[4]), 100);
    assert_eq!(bodies(&older), ["m3", "m2", "m1", "m0"]);
    assert_eq!(
        alice.history(conversation, None, 1)[0]["message_id"],
        ids[6]
    );

    let mut mallory = gateway.connect("mallory", "x");
    mallory.send(json!({"type": "history", "conversation": conversation}));
    assert_eq!(mallory.recv()["code"], "forbidden");
    mallory.send(json!({"type": "sync", "after": "12345"}));
    assert_eq!(
        mallory.recv()["code"],
        "invalid_field",
        "an id not in mallory's inbox"
    );
    mallory.ping();
}

#[test]
fn a_retried_send_keeps_its_first_message_id_across_a_gateway_kill() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap();
    let mut gateway = Gateway::start(&["--data-dir", dir]);
    let mut alice = gateway.connect("alice", "phone");
    alice.send_message("c-1", "bob", "hello");
    let first = alice.recv_type("sent")["message_id"].clone();
    gateway.kill9();

    let gateway = Gateway::start(&["--data-dir", dir]);
    let mut alice = gateway.connect("alice", "phone");
    alice.send_message("c-1", "bob", "hello");
    assert_eq!(alice.recv_type("sent")["message_id"], first, "same answer");
    let bob = gateway.connect("bob", "phone");
    assert_eq!(bodies(&bob.synced), ["hello"], "stored and delivered once");
}

/// A client that streams sends and retries whatever was not acknowledged.
struct Streamer {
    acked: HashMap<String, String>,
    next: usize,
}

impl Streamer {
    fn pump(&mut self, client: &mut support::Client, sends: usize) {
        for _ in 0..sends {
            let id = format!("s{}", self.next);
            client.send_message(&id, "bob", &id);
            self.next += 1;
        }
    }

    /// Reads `sent` frames until the connection dies or `quiet` passes.
    fn collect(&mut self, client: &mut support::Client, quiet: Duration) {
        client.set_timeout(quiet);
        while let support::Next::Json(frame) = client.next_frame() {
            if frame["type"] == "sent" {
                let id = frame["id"].as_str().unwrap().to_owned();
                let message_id = frame["message_id"].as_str().unwrap().to_owned();
                if let Some(first) = self.acked.insert(id.clone(), message_id.clone()) {
                    assert_eq!(first, message_id, "{id} changed its message id");
                }
            }
        }
    }
}

fn history_ids(client: &mut support::Client) -> Vec<(String, String)> {
    let mut all = Vec::new();
    let mut before: Option<String> = None;
    loop {
        let page = client.history("dm:alice:bob", before.as_deref(), 100);
        if page.is_empty() {
            return all;
        }
        before = Some(
            page.last().unwrap()["message_id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
        all.extend(page.iter().map(|m| {
            (
                m["body"].as_str().unwrap().to_owned(),
                m["message_id"].as_str().unwrap().to_owned(),
            )
        }));
    }
}

fn assert_history_matches(client: &mut support::Client, streamer: &Streamer) {
    let stored = history_ids(client);
    let mut by_body: HashMap<String, String> = HashMap::new();
    for (body, message_id) in &stored {
        assert!(
            by_body.insert(body.clone(), message_id.clone()).is_none(),
            "{body} stored twice"
        );
    }
    for (id, message_id) in &streamer.acked {
        assert_eq!(
            by_body.get(id),
            Some(message_id),
            "acknowledged {id} missing or renumbered"
        );
    }
}

#[test]
fn kill_9_of_the_gateway_mid_stream_loses_nothing_acknowledged() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap();
    let mut fast = vec!["--data-dir", dir];
    fast.extend(support::UNLIMITED_RATES);
    let mut gateway = Gateway::start(&fast);
    let mut alice = gateway.connect("alice", "phone");
    let mut streamer = Streamer {
        acked: HashMap::new(),
        next: 0,
    };
    // At most `idempotency_warm_max` (256) unacknowledged sends in flight:
    // that is how far back a restarted node recognises a retry (protocol.md).
    streamer.pump(&mut alice, 200);
    std::thread::sleep(Duration::from_millis(5));
    gateway.kill9();
    streamer.collect(&mut alice, Duration::from_millis(200));
    let sent_before = streamer.next;

    let gateway = Gateway::start(&fast);
    let mut alice = gateway.connect("alice", "phone");
    // The client retries everything it has no `sent` for, with the same ids.
    for index in 0..sent_before {
        let id = format!("s{index}");
        if !streamer.acked.contains_key(&id) {
            alice.send_message(&id, "bob", &id);
        }
    }
    streamer.pump(&mut alice, 20);
    streamer.collect(&mut alice, Duration::from_millis(1500));
    assert_eq!(
        streamer.acked.len(),
        streamer.next,
        "every send acknowledged after retries"
    );
    assert_history_matches(&mut alice, &streamer);
}

#[test]
fn kill_9_of_the_storage_writer_pauses_acknowledgements_and_loses_nothing() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap();
    let mut writer = Writer::start(data.path(), &[]);
    let gateway = Gateway::start(&[
        "--data-dir",
        dir,
        "--storage-writer",
        "external",
        "--sends-per-s",
        "100000",
        "--sends-burst",
        "100000",
    ]);
    let mut alice = gateway.connect("alice", "phone");
    let mut bob = gateway.connect("bob", "phone");
    let mut streamer = Streamer {
        acked: HashMap::new(),
        next: 0,
    };
    streamer.pump(&mut alice, 100);
    streamer.collect(&mut alice, Duration::from_millis(500));
    assert_eq!(streamer.acked.len(), 100);

    writer.kill9();
    // No new clients while storage is away; the ones connected stay.
    gateway.wait_readyz(503);
    streamer.pump(&mut alice, 100);
    streamer.collect(&mut alice, Duration::from_millis(500));
    assert_eq!(
        streamer.acked.len(),
        100,
        "no `sent` while nothing can become durable"
    );
    // The node keeps serving: live delivery, pings.
    let mut live = 0;
    while live < 200 {
        if bob.recv()["type"] == "message" {
            live += 1;
        }
    }
    alice.ping();

    let _writer = Writer::start(data.path(), &[]);
    streamer.collect(&mut alice, Duration::from_millis(2000));
    assert_eq!(streamer.acked.len(), 200, "acknowledgements resume");
    gateway.wait_readyz(200);
    assert_history_matches(&mut alice, &streamer);
    bob.expect_silence(Duration::from_millis(200));
}

#[test]
fn a_full_ring_back_pressures_senders_without_loss_or_duplicates() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap();
    // A 64 KiB ring. A writer serves alice's connect, then goes: nothing drains the ring.
    let early = Writer::start(data.path(), &[]);
    let gateway = Gateway::start(&[
        "--data-dir",
        dir,
        "--storage-writer",
        "external",
        "--ring-bytes",
        "65536",
        "--body-bytes-max",
        "4096",
        "--message-bytes-max",
        "8192",
        "--sends-per-s",
        "100000",
        "--sends-burst",
        "100000",
        "--shards",
        "1",
        "--storage-timeout-ms",
        "20000",
    ]);
    let mut alice = gateway.connect("alice", "phone");
    drop(early);
    std::thread::sleep(Duration::from_millis(200));
    let body = "x".repeat(1000);
    let mut refused = Vec::new();
    for index in 0..200 {
        alice.send_message(&format!("f{index}"), "bob", &body);
    }
    alice.set_timeout(Duration::from_millis(500));
    while let support::Next::Json(frame) = alice.next_frame() {
        match frame["type"].as_str() {
            Some("error") => {
                assert_eq!(frame["code"], "overloaded");
                assert!(frame["retry_after_ms"].as_u64().is_some());
                refused.push(frame["id"].as_str().unwrap().to_owned());
            }
            Some("sent") => panic!("nothing is durable without a writer: {frame}"),
            _ => {}
        }
    }
    assert!(
        !refused.is_empty() && refused.len() < 200,
        "some sends fit, the rest were refused: {}",
        refused.len()
    );
    assert!(gateway.metric("gateway_ring_full_total", &[]) >= refused.len() as u64);

    let _writer = Writer::start(data.path(), &[]);
    let mut streamer = Streamer {
        acked: HashMap::new(),
        next: 200,
    };
    for id in &refused {
        alice.send_message(id, "bob", id);
    }
    streamer.collect(&mut alice, Duration::from_millis(2000));
    assert_eq!(
        streamer.acked.len(),
        200,
        "every send acknowledged once retried"
    );
    let stored = history_ids(&mut alice);
    assert_eq!(stored.len(), 200, "stored once each");
}

#[test]
fn a_gateway_refuses_to_start_on_a_ring_it_cannot_trust() {
    let data = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(data.path().join("rings")).unwrap();
    std::fs::write(data.path().join("rings/shard-0.ring"), vec![0u8; 70_000]).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--shards", "1", "--storage-writer", "external"])
        .arg("--data-dir")
        .arg(data.path())
        .env("GATEWAY_AUTH_SECRET", support::SECRET)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("shard-0.ring") && stderr.contains("not a chat ring"),
        "{stderr}"
    );
}

#[test]
fn a_media_reference_travels_live_through_sync_and_into_history() {
    let gateway = Gateway::start(&[]);
    let mut alice = gateway.connect("alice", "phone");
    let mut bob_phone = gateway.connect("bob", "phone");
    let media = json!({"url": "https://cdn.example/f/1", "size": 1234, "sha256": "ab".repeat(32)});
    alice.send(json!({"type": "send", "id": "m1", "to": "bob", "body": "key", "media": media}));
    assert_eq!(alice.recv_type("sent")["id"], "m1");
    assert_eq!(bob_phone.recv()["media"], media, "live");
    let bob_laptop = gateway.connect("bob", "laptop");
    assert_eq!(bob_laptop.synced[0]["media"], media, "sync");
    assert_eq!(
        alice.history("dm:alice:bob", None, 1)[0]["media"],
        media,
        "history"
    );

    let bad = json!({"url": "ftp://x", "size": 1, "sha256": "ab".repeat(32)});
    alice.send(json!({"type": "send", "id": "m2", "to": "bob", "body": "k", "media": bad}));
    let error = alice.recv();
    assert_eq!(
        (error["code"].as_str(), error["id"].as_str()),
        (Some("invalid_field"), Some("m2"))
    );
}

#[test]
fn a_retry_older_than_the_warm_up_is_looked_up_and_keeps_its_first_id() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap();
    // The warm-up loads only the 4 most recent sends: older retries need a look-up.
    let flags = ["--data-dir", dir, "--idempotency-warm-max", "4"];
    let mut gateway = Gateway::start(&flags);
    let mut alice = gateway.connect("alice", "phone");
    let mut first_ids = Vec::new();
    for index in 0..12 {
        alice.send_message(&format!("c{index}"), "bob", &format!("m{index}"));
        first_ids.push(alice.recv_type("sent")["message_id"].clone());
    }
    gateway.kill9();

    let gateway = Gateway::start(&flags);
    let mut alice = gateway.connect("alice", "phone");
    for index in 0..12 {
        alice.send_message(&format!("c{index}"), "bob", &format!("m{index}"));
    }
    alice.send_message("c12", "bob", "m12");
    alice.send(json!({"type": "ping"}));
    // Answers keep the frames' order: every `sent`, then the new one, then `pong`.
    for (index, first) in first_ids.iter().enumerate() {
        let sent = alice.recv();
        assert_eq!(sent["id"], format!("c{index}"));
        assert_eq!(&sent["message_id"], first, "c{index} keeps its first id");
    }
    assert_eq!(alice.recv()["id"], "c12");
    assert_eq!(alice.recv()["type"], "pong");
    let history = alice.history("dm:alice:bob", None, 100);
    assert_eq!(history.len(), 13, "nothing stored twice");
}
