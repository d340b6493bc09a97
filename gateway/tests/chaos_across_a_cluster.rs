//! Chaos under load, across a cluster (the short version that runs in the
//! suite): three gateway nodes with their storage-writers, a shared
//! PostgreSQL and nats-server. Senders stream to receivers on other nodes,
//! resending what has no `sent` after any failure (as the client library
//! does). Meanwhile, one after another: a gateway is killed with `kill -9`,
//! a storage-writer is killed with `kill -9`, NATS is stopped and started,
//! PostgreSQL is stopped and started. Afterwards: every acknowledged message
//! is stored once and reached its receiver (live or on sync), nothing is
//! stored twice, and each conversation's history is in send order.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testkit::fleet::Fleet;
use testkit::gateway::{connect_unsynced_at, Client, Gateway, Next};

const PAIRS: usize = 4;
const SENDS: usize = 120;
/// The longest any one phase may take before the test gives up.
const PHASE_LIMIT: Duration = Duration::from_secs(60);

/// Connects to the first node of `nodes`, from `start`, that takes it.
fn connect_any(nodes: &[SocketAddr], start: usize, user: &str) -> (Client, usize) {
    let deadline = Instant::now() + PHASE_LIMIT;
    let mut index = start;
    loop {
        let address = nodes[index % nodes.len()];
        let attempt = std::panic::catch_unwind(|| connect_unsynced_at(address, user, "phone"));
        if let Ok(mut client) = attempt {
            client.set_timeout(Duration::from_millis(200));
            return (client, index % nodes.len());
        }
        index += 1;
        assert!(
            Instant::now() < deadline,
            "{user} found no node to connect to"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct Sent {
    /// Client id → message id, for every acknowledged send.
    acknowledged: BTreeMap<String, String>,
    longest_wait: Duration,
    reconnects: u32,
}

/// Sends `SENDS` messages to `to`, one at a time, each until `sent`,
/// reconnecting (to another node if need be) and resending on any failure.
fn sender(nodes: Vec<SocketAddr>, start: usize, me: String, to: String) -> Sent {
    let (mut client, mut at) = connect_any(&nodes, start, &me);
    let mut sent = Sent {
        acknowledged: BTreeMap::new(),
        longest_wait: Duration::ZERO,
        reconnects: 0,
    };
    for index in 0..SENDS {
        let id = format!("{me}-{index:04}");
        let started = Instant::now();
        let mut resend = true;
        loop {
            assert!(started.elapsed() < PHASE_LIMIT, "{id} never acknowledged");
            if resend {
                client.send(json!({"type": "send", "id": id, "to": to, "body": id}));
                resend = false;
            }
            match client.next_frame() {
                Next::Json(frame) if frame["type"] == "sent" && frame["id"] == id.as_str() => {
                    let message_id = frame["message_id"].as_str().unwrap().to_owned();
                    sent.acknowledged.insert(id.clone(), message_id);
                    sent.longest_wait = sent.longest_wait.max(started.elapsed());
                    break;
                }
                Next::Json(frame) if frame["type"] == "error" => {
                    // overloaded / unavailable while something restarts.
                    let wait = frame["retry_after_ms"].as_u64().unwrap_or(200).min(2_000);
                    std::thread::sleep(Duration::from_millis(wait));
                    resend = true;
                }
                Next::Json(_) => {}
                Next::Silent => {
                    // No answer for a while: say it again (the id dedupes).
                    if started.elapsed() > Duration::from_secs(3) {
                        resend = true;
                    }
                }
                Next::Closed(_) | Next::Gone => {
                    sent.reconnects += 1;
                    let next = connect_any(&nodes, at + 1, &me);
                    client = next.0;
                    at = next.1;
                    resend = true;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    sent
}

/// Reads (and acknowledges) until told to stop, reconnecting on failure;
/// returns every message id seen.
fn receiver(
    nodes: Vec<SocketAddr>,
    start: usize,
    me: String,
    stop: Arc<AtomicBool>,
) -> BTreeSet<String> {
    let (mut client, mut at) = connect_any(&nodes, start, &me);
    let mut seen = BTreeSet::new();
    while !stop.load(SeqCst) {
        match client.next_frame() {
            Next::Json(frame) if frame["type"] == "message" => {
                let id = frame["message_id"].as_str().unwrap().to_owned();
                client.send(json!({"type": "ack", "message_id": id}));
                seen.insert(id);
            }
            Next::Json(_) | Next::Silent => {}
            Next::Closed(_) | Next::Gone => {
                let next = connect_any(&nodes, at + 1, &me);
                client = next.0;
                at = next.1;
            }
        }
    }
    seen
}

/// A whole conversation's history, oldest first.
fn history(client: &mut Client, conversation: &str) -> Vec<Value> {
    let mut all = Vec::new();
    let mut before: Option<String> = None;
    loop {
        let page = client.history(conversation, before.as_deref(), 100);
        if page.is_empty() {
            break;
        }
        before = page
            .last()
            .and_then(|m| m["message_id"].as_str())
            .map(str::to_owned);
        all.extend(page);
    }
    all.reverse();
    all
}

#[test]
fn kill_9_of_a_gateway_and_a_writer_and_nats_and_postgres_outages_lose_nothing_acknowledged() {
    let mut fleet = Fleet::start(3);
    let nodes: Vec<&Gateway> = fleet.nodes.iter().collect();
    fleet.wait_membership(&nodes, 3);
    let addresses: Vec<SocketAddr> = fleet.nodes.iter().map(|n| n.ws).collect();
    // Clients start spread over the nodes; node 2 dies, and those on it
    // move to the others.
    let stop = Arc::new(AtomicBool::new(false));
    let receivers: Vec<_> = (0..PAIRS)
        .map(|pair| {
            let (nodes, stop) = (addresses.clone(), stop.clone());
            std::thread::spawn(move || receiver(nodes, pair % 3, format!("chaos-r{pair}"), stop))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let results = Arc::new(Mutex::new(Vec::new()));
    let senders: Vec<_> = (0..PAIRS)
        .map(|pair| {
            let nodes = addresses.clone();
            let results = results.clone();
            std::thread::spawn(move || {
                let (me, to) = (format!("chaos-s{pair}"), format!("chaos-r{pair}"));
                let sent = sender(nodes, (pair + 1) % 3, me, to);
                results.lock().unwrap().push((pair, sent));
            })
        })
        .collect();

    // The faults, one after another, while the senders stream.
    std::thread::sleep(Duration::from_millis(800));
    fleet.nodes[2].kill9();
    std::thread::sleep(Duration::from_millis(800));
    let writer = fleet.nodes[0]
        .writer_pid()
        .expect("node 0 runs a storage-writer");
    testkit::signal(writer, "KILL");
    std::thread::sleep(Duration::from_millis(800));
    fleet.nats.stop();
    std::thread::sleep(Duration::from_millis(1_000));
    fleet.nats.restart();
    std::thread::sleep(Duration::from_millis(800));
    fleet.database.stop();
    std::thread::sleep(Duration::from_millis(2_000));
    fleet.database.restart();

    for sender in senders {
        sender.join().expect("a sender finished");
    }
    // Let the last deliveries and resyncs land, then stop the receivers.
    std::thread::sleep(Duration::from_secs(6));
    stop.store(true, SeqCst);
    let seen: Vec<BTreeSet<String>> = receivers
        .into_iter()
        .map(|r| r.join().expect("a receiver finished"))
        .collect();

    let results = std::mem::take(&mut *results.lock().unwrap());
    let mut longest = Duration::ZERO;
    let mut reconnects = 0;
    for (pair, sent) in &results {
        longest = longest.max(sent.longest_wait);
        reconnects += sent.reconnects;
        assert_eq!(
            sent.acknowledged.len(),
            SENDS,
            "pair {pair}: every send acknowledged"
        );
        let ids: BTreeSet<&String> = sent.acknowledged.values().collect();
        assert_eq!(ids.len(), SENDS, "pair {pair}: one message id per send");

        // Stored once each, in order: the conversation's history.
        let (mut reader, _) = connect_any(&addresses[..2], 0, &format!("chaos-r{pair}"));
        reader.set_timeout(testkit::WAIT);
        let conversation = chat_protocol::ids::direct_conversation_id(
            &format!("chaos-s{pair}"),
            &format!("chaos-r{pair}"),
        );
        let stored = history(&mut reader, &conversation);
        let bodies: Vec<&str> = stored.iter().map(|m| m["body"].as_str().unwrap()).collect();
        let expected: Vec<String> = (0..SENDS)
            .map(|i| format!("chaos-s{pair}-{i:04}"))
            .collect();
        assert_eq!(
            bodies, expected,
            "pair {pair}: stored once each, in send order"
        );
        for message in &stored {
            let body = message["body"].as_str().unwrap();
            assert_eq!(
                sent.acknowledged.get(body).map(String::as_str),
                message["message_id"].as_str(),
                "pair {pair}: {body} stored under its acknowledged id"
            );
        }

        // Delivered: live, or on the resyncs and syncs after the failures.
        let got = &seen[*pair];
        let missing: Vec<_> = ids.iter().filter(|id| !got.contains(**id)).collect();
        assert!(
            missing.is_empty(),
            "pair {pair}: acknowledged but never delivered: {missing:?}"
        );
    }
    eprintln!(
        "chaos: {} messages acknowledged, longest wait for `sent` {longest:?}, {reconnects} sender reconnects",
        PAIRS * SENDS
    );
}
