//! Chaos under load across a cluster, as a scenario both the test suite
//! (short, fixed faults) and `bench chaos` (minutes, random faults) run.
//!
//! Owns the cluster (gateway nodes with their storage-writers, a shared
//! PostgreSQL, a NATS cluster), the senders (one send at a time, each until
//! `sent`, reconnecting to another node and resending with the same id on
//! any failure, as the client library does), the receivers (acknowledging
//! what arrives, reconnecting likewise), the faults, and the audit
//! afterwards: what was acknowledged against what every conversation's
//! history holds and what the receivers saw. Never asserts: it reports, and
//! the caller decides (the test asserts zeros, the bench prints figures).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::fleet::Fleet;
use crate::gateway::{connect_at, connect_unsynced_at, Client, Gateway, Next};
use crate::nats::NatsCluster;

/// One thing that goes wrong, and how long before it is put right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `kill -9` of a gateway node (its writer dies with it), restarted after `down`.
    KillGateway { node: usize, down: Duration },
    /// `kill -9` of a node's storage-writer (its gateway restarts it).
    KillWriter { node: usize },
    /// `kill -9` of one NATS server, restarted after `down`.
    KillNats { server: usize, down: Duration },
    /// PostgreSQL stopped, started again after `down`.
    StopPostgres { down: Duration },
}

impl Fault {
    /// A random fault (for `bench chaos`).
    pub fn random(rng: &mut fastrand::Rng, nodes: usize, nats_servers: usize) -> Fault {
        let down = Duration::from_millis(rng.u64(500..4_000));
        match rng.u8(0..4) {
            0 => Fault::KillGateway {
                node: rng.usize(0..nodes),
                down,
            },
            1 => Fault::KillWriter {
                node: rng.usize(0..nodes),
            },
            2 => Fault::KillNats {
                server: rng.usize(0..nats_servers),
                down,
            },
            _ => Fault::StopPostgres { down },
        }
    }
}

pub struct Plan {
    pub nodes: usize,
    pub nats_servers: usize,
    /// Sender → receiver pairs, each in its own 1:1 conversation.
    pub pairs: usize,
    /// Senders stream until the faults are over and `tail` has passed
    /// (so every fault happens under load), and at most this many sends or
    /// until `until`, whichever comes first.
    pub sends_per_sender: usize,
    pub until: Duration,
    pub tail: Duration,
    /// Pause between a `sent` and the next send.
    pub send_pause: Duration,
    /// Faults in order, each after the pause before it.
    pub faults: Vec<(Duration, Fault)>,
}

/// What happened, and what the audit found.
#[derive(Debug, Default)]
pub struct Report {
    pub acknowledged: usize,
    /// Acknowledged, and not in the conversation's history.
    pub lost: usize,
    /// History entries beyond the first of each send (by its body).
    pub duplicates: usize,
    /// Acknowledged ids stored under another message id.
    pub changed_ids: usize,
    /// Adjacent history entries out of send order.
    pub out_of_order: usize,
    /// Acknowledged, stored, and never seen by the receiver: not live, not
    /// on a resync, not on the sync every device makes at the end.
    pub undelivered: usize,
    /// Seen only on that final sync: stored and acknowledged, but an online
    /// receiver did not get it until it synced (see `docs/design/backplane.md`).
    pub only_on_final_sync: usize,
    /// The first few not seen before the final sync: (pair, body, when it
    /// was acknowledged).
    pub undelivered_examples: Vec<(usize, String, Duration)>,
    /// Sends that saw no `sent` within the phase limit (their sender gave up).
    pub never_acknowledged: usize,
    pub longest_wait_for_sent: Duration,
    pub sender_reconnects: u32,
    pub refusals: u32,
    pub faults: Vec<(Duration, Fault)>,
    pub elapsed: Duration,
}

impl Report {
    /// Nothing acknowledged lost, doubled, renamed, reordered or undelivered.
    pub fn is_clean(&self) -> bool {
        self.lost == 0
            && self.duplicates == 0
            && self.changed_ids == 0
            && self.out_of_order == 0
            && self.undelivered == 0
            && self.never_acknowledged == 0
    }
}

/// How long one send may go unacknowledged before its sender gives up.
const SEND_LIMIT: Duration = Duration::from_secs(90);

/// Connects to the first node of `nodes`, from `start`, that takes it.
fn connect_any(nodes: &[SocketAddr], start: usize, user: &str) -> (Client, usize) {
    let deadline = Instant::now() + SEND_LIMIT;
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
    /// Body → message id, for every acknowledged send.
    acknowledged: BTreeMap<String, String>,
    /// Body → when it was acknowledged (since the run started).
    acknowledged_at: BTreeMap<String, Duration>,
    bodies: Vec<String>,
    given_up: usize,
    longest_wait: Duration,
    reconnects: u32,
    refusals: u32,
}

/// Sends one message at a time to `to`, each until `sent`, reconnecting
/// (to another node if need be) and resending on any failure.
fn sender(nodes: Vec<SocketAddr>, start: usize, me: String, to: String, plan: PlanView) -> Sent {
    let (mut client, mut at) = connect_any(&nodes, start, &me);
    let mut sent = Sent {
        acknowledged: BTreeMap::new(),
        acknowledged_at: BTreeMap::new(),
        bodies: Vec::new(),
        given_up: 0,
        longest_wait: Duration::ZERO,
        reconnects: 0,
        refusals: 0,
    };
    for index in 0..plan.sends {
        if plan.started.elapsed() > plan.until || plan.done.load(SeqCst) {
            break;
        }
        let id = format!("{me}-{index:06}");
        sent.bodies.push(id.clone());
        let started = Instant::now();
        let mut resend = true;
        loop {
            if started.elapsed() > SEND_LIMIT {
                sent.given_up += 1;
                break;
            }
            if resend {
                client.send(json!({"type": "send", "id": id, "to": to, "body": id}));
                resend = false;
            }
            match client.next_frame() {
                Next::Json(frame) if frame["type"] == "sent" && frame["id"] == id.as_str() => {
                    let message_id = frame["message_id"].as_str().unwrap_or_default().to_owned();
                    sent.acknowledged.insert(id.clone(), message_id);
                    sent.acknowledged_at
                        .insert(id.clone(), plan.started.elapsed());
                    sent.longest_wait = sent.longest_wait.max(started.elapsed());
                    break;
                }
                Next::Json(frame) if frame["type"] == "error" => {
                    // overloaded / unavailable while something restarts.
                    sent.refusals += 1;
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
                Next::Closed(_) | Next::Gone(_) => {
                    sent.reconnects += 1;
                    let next = connect_any(&nodes, at + 1, &me);
                    client = next.0;
                    at = next.1;
                    resend = true;
                }
            }
        }
        std::thread::sleep(plan.pause);
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
                let id = frame["message_id"].as_str().unwrap_or_default().to_owned();
                client.send(json!({"type": "ack", "message_id": id}));
                seen.insert(id);
            }
            Next::Json(_) | Next::Silent => {}
            Next::Closed(_) | Next::Gone(_) => {
                let next = connect_any(&nodes, at + 1, &me);
                client = next.0;
                at = next.1;
            }
        }
    }
    seen
}

#[derive(Clone)]
struct PlanView {
    sends: usize,
    until: Duration,
    pause: Duration,
    started: Instant,
    /// Set once the faults are over and the tail has passed.
    done: Arc<AtomicBool>,
}

fn inflict(fleet: &mut Fleet, fault: Fault) {
    match fault {
        Fault::KillGateway { node, down } => {
            fleet.nodes[node].kill9();
            std::thread::sleep(down);
            fleet.nodes[node].restart();
        }
        Fault::KillWriter { node } => {
            if let Some(writer) = fleet.nodes[node].writer_pid() {
                crate::signal(writer, "KILL");
            }
        }
        Fault::KillNats { server, down } => {
            fleet.nats.servers[server].stop();
            std::thread::sleep(down);
            fleet.nats.servers[server].restart();
        }
        Fault::StopPostgres { down } => {
            fleet.database.stop();
            std::thread::sleep(down);
            fleet.database.restart();
        }
    }
}

/// Runs `plan` and audits the result.
pub fn run(plan: &Plan) -> Report {
    let nats = NatsCluster::start(plan.nats_servers);
    let mut fleet = Fleet::start_on(nats, plan.nodes, &[]);
    let addresses: Vec<SocketAddr> = fleet.nodes.iter().map(|n| n.ws).collect();
    let started = Instant::now();
    let view = PlanView {
        sends: plan.sends_per_sender,
        until: plan.until,
        pause: plan.send_pause,
        started,
        done: Arc::new(AtomicBool::new(false)),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let receivers: Vec<_> = (0..plan.pairs)
        .map(|pair| {
            let (nodes, stop) = (addresses.clone(), stop.clone());
            let start = pair % addresses.len();
            std::thread::spawn(move || receiver(nodes, start, format!("chaos-r{pair}"), stop))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let results = Arc::new(Mutex::new(Vec::new()));
    let senders: Vec<_> = (0..plan.pairs)
        .map(|pair| {
            let nodes = addresses.clone();
            let results = results.clone();
            let start = (pair + 1) % addresses.len();
            let view = view.clone();
            std::thread::spawn(move || {
                let (me, to) = (format!("chaos-s{pair}"), format!("chaos-r{pair}"));
                let sent = sender(nodes, start, me, to, view);
                results.lock().unwrap().push((pair, sent));
            })
        })
        .collect();

    let mut report = Report::default();
    for (pause, fault) in &plan.faults {
        std::thread::sleep(*pause);
        if senders.iter().all(|sender| sender.is_finished()) {
            break;
        }
        report.faults.push((started.elapsed(), *fault));
        inflict(&mut fleet, *fault);
    }
    std::thread::sleep(plan.tail);
    view.done.store(true, SeqCst);
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
    report.elapsed = started.elapsed();
    // Afterwards every device syncs.
    let finally: Vec<BTreeSet<String>> = (0..plan.pairs)
        .map(|pair| final_sync(&addresses, &format!("chaos-r{pair}")))
        .collect();

    let results = std::mem::take(&mut *results.lock().unwrap());
    for (pair, sent) in &results {
        let seen = (&seen[*pair], &finally[*pair]);
        audit(&fleet.nodes, *pair, sent, seen, &mut report);
    }
    report
}

/// The message ids a fresh connection of `user`'s device syncs.
fn final_sync(nodes: &[SocketAddr], user: &str) -> BTreeSet<String> {
    for address in nodes {
        let attempt = std::panic::catch_unwind(|| connect_at(*address, user, "phone"));
        if let Ok(client) = attempt {
            return client
                .synced
                .iter()
                .filter_map(|frame| frame["message_id"].as_str().map(str::to_owned))
                .collect();
        }
    }
    panic!("{user} could not sync on any node");
}

/// Compares what `pair`'s sender had acknowledged with its conversation's
/// history and with what its receiver saw (live or on resyncs, and on the
/// final sync).
fn audit(
    nodes: &[Gateway],
    pair: usize,
    sent: &Sent,
    (seen, finally): (&BTreeSet<String>, &BTreeSet<String>),
    report: &mut Report,
) {
    report.longest_wait_for_sent = report.longest_wait_for_sent.max(sent.longest_wait);
    report.sender_reconnects += sent.reconnects;
    report.refusals += sent.refusals;
    report.acknowledged += sent.acknowledged.len();
    report.never_acknowledged += sent.given_up;

    let addresses: Vec<SocketAddr> = nodes.iter().map(|n| n.ws).collect();
    let (mut reader, _) = connect_any(&addresses, 0, &format!("chaos-r{pair}"));
    reader.set_timeout(crate::WAIT);
    let conversation = chat_protocol::ids::direct_conversation_id(
        &format!("chaos-s{pair}"),
        &format!("chaos-r{pair}"),
    );
    let stored = reader.whole_history(&conversation);
    let mut first: BTreeMap<&str, &str> = BTreeMap::new();
    let order: BTreeMap<&str, usize> = sent
        .bodies
        .iter()
        .enumerate()
        .map(|(index, body)| (body.as_str(), index))
        .collect();
    let mut previous: Option<usize> = None;
    for message in &stored {
        let body = message["body"].as_str().unwrap_or_default();
        let message_id = message["message_id"].as_str().unwrap_or_default();
        if first.insert(body, message_id).is_some() {
            report.duplicates += 1;
            continue;
        }
        if let Some(&position) = order.get(body) {
            if previous.is_some_and(|previous| previous > position) {
                report.out_of_order += 1;
            }
            previous = Some(position);
        }
    }
    for (body, message_id) in &sent.acknowledged {
        match first.get(body.as_str()) {
            None => report.lost += 1,
            Some(stored) if stored != message_id => report.changed_ids += 1,
            Some(_) => {
                if !seen.contains(message_id) {
                    if finally.contains(message_id) {
                        report.only_on_final_sync += 1;
                    } else {
                        report.undelivered += 1;
                    }
                    if report.undelivered_examples.len() < 20 {
                        let at = sent.acknowledged_at[body];
                        report.undelivered_examples.push((pair, body.clone(), at));
                    }
                }
            }
        }
    }
}
