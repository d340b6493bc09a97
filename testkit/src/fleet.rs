//! A fleet on loopback for cross-node tests: gateway nodes (each with its own
//! storage-writer) sharing one PostgreSQL and one nats-server (or a cluster
//! of them), and the client
//! helpers that count what each device received.
//!
//! Owns starting nodes with the fleet's flags, and reading messages while
//! acknowledging them (so a resync never offers them again). Never decides
//! what a test asserts.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::gateway::{Client, Gateway, Next};
use crate::nats::NatsCluster;
use crate::postgres::Postgres;
use crate::WAIT;

pub struct Fleet {
    pub nodes: Vec<Gateway>,
    pub database: Postgres,
    pub nats: NatsCluster,
}

impl Fleet {
    /// `count` nodes, each with a node id leased from NATS.
    pub fn start(count: usize) -> Fleet {
        Self::start_with(count, &[])
    }

    /// `start`, with `extra` flags for every node.
    pub fn start_with(count: usize, extra: &[&str]) -> Fleet {
        Self::start_on(NatsCluster::single(), count, extra)
    }

    /// `start_with`, on the NATS servers `nats` (a cluster: the lease
    /// bucket is kept on three of them).
    pub fn start_on(nats: NatsCluster, count: usize, extra: &[&str]) -> Fleet {
        let database = Postgres::start();
        let mut fleet = Fleet {
            nodes: Vec::new(),
            database,
            nats,
        };
        for index in 0..count {
            let url = public_url(index);
            let mut flags = vec!["--public-url", url.as_str()];
            flags.extend_from_slice(extra);
            let node = fleet.start_node(&flags);
            fleet.nodes.push(node);
        }
        // A settled fleet: every node knows every other before the test
        // starts (tests of membership changes make their own).
        let nodes: Vec<&Gateway> = fleet.nodes.iter().collect();
        fleet.wait_membership(&nodes, count as u64);
        fleet
    }

    /// Flags every node of this fleet gets, `extra` after them.
    pub fn node_flags(&self, extra: &[&str]) -> Vec<String> {
        let mut flags = self.database.writer_flags();
        flags.extend([
            "--nats-url".into(),
            self.nats.url(),
            "--resync-window-ms".into(),
            "200".into(),
            "--presence-interval-ms".into(),
            "400".into(),
            "--membership-heartbeat-ms".into(),
            MEMBERSHIP_HEARTBEAT_MS.to_string(),
            // Streams of one sender run above a person's send rate.
            "--sends-per-s".into(),
            "500".into(),
        ]);
        if self.nats.servers.len() >= 3 {
            flags.extend(["--node-id-lease-replicas".into(), "3".into()]);
        }
        flags.extend(extra.iter().map(|flag| flag.to_string()));
        flags
    }

    /// Starts one more node (not added to `nodes`) and waits until it is
    /// connected to NATS.
    pub fn start_node(&self, extra: &[&str]) -> Gateway {
        let flags = self.node_flags(extra);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let gateway = Gateway::start(&flags);
        gateway.wait_metric("gateway_backplane_connected", &[], 1);
        gateway
    }

    /// Waits until every running node counts `count` live nodes.
    /// `start_with`, then waits until every node sees all the others.
    pub fn start_joined(count: usize, extra: &[&str]) -> Fleet {
        let fleet = Self::start_with(count, extra);
        let nodes: Vec<&Gateway> = fleet.nodes.iter().collect();
        fleet.wait_membership(&nodes, count as u64);
        fleet
    }

    pub fn wait_membership(&self, nodes: &[&Gateway], count: u64) {
        let deadline = Instant::now() + WAIT * 2;
        for node in nodes {
            while node.metric("gateway_backplane_nodes_live", &[]) != count {
                assert!(
                    Instant::now() < deadline,
                    "a node never saw {count} live nodes"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// The fleet tests' heartbeat interval: membership changes settle in four
/// intervals (a liveness timeout of three, plus one of skew).
pub const MEMBERSHIP_HEARTBEAT_MS: u64 = 300;

/// The `public_url` the `index`th node of `Fleet::start` advertises (a
/// name, never resolved: tests read it from `hello`).
pub fn public_url(index: usize) -> String {
    format!("ws://fleet-node-{index}.invalid/ws")
}

/// A node's leased id, as it reports it.
pub fn node_id(node: &Gateway) -> u16 {
    node.metric("gateway_node_id", &[]) as u16
}

/// Reads until `count` distinct messages arrived (acknowledging each) or the
/// wait ends. Appends (message id, body) to `seen` in order of first
/// arrival; returns how many arrived again.
pub fn receive(client: &mut Client, count: usize, seen: &mut Vec<(String, String)>) -> usize {
    receive_for(client, count, seen, WAIT)
}

/// `receive`, waiting at most `wait`.
pub fn receive_for(
    client: &mut Client,
    count: usize,
    seen: &mut Vec<(String, String)>,
    wait: Duration,
) -> usize {
    let mut duplicates = 0;
    let deadline = Instant::now() + wait;
    client.set_timeout(Duration::from_millis(200));
    while seen.len() < count && Instant::now() < deadline {
        match client.next_frame() {
            Next::Json(frame) if frame["type"] == "message" => {
                if note(client, &frame, seen) {
                    duplicates += 1;
                }
            }
            Next::Json(_) | Next::Silent => {}
            other => panic!("connection ended: {other:?}"),
        }
    }
    client.set_timeout(WAIT);
    duplicates
}

/// Records a `message` frame in `seen` and acknowledges it; true if it was
/// there already.
pub fn note(
    client: &mut Client,
    frame: &serde_json::Value,
    seen: &mut Vec<(String, String)>,
) -> bool {
    let id = frame["message_id"].as_str().unwrap().to_owned();
    let body = frame["body"].as_str().unwrap_or_default().to_owned();
    client.send(json!({"type": "ack", "message_id": id}));
    if seen.iter().any(|(seen_id, _)| *seen_id == id) {
        return true;
    }
    seen.push((id, body));
    false
}

pub fn bodies(seen: &[(String, String)]) -> Vec<&str> {
    seen.iter().map(|(_, body)| body.as_str()).collect()
}

/// Waits for `count` `sent` frames (client id → message id); messages that
/// arrive meanwhile are acknowledged and kept in `seen` (a sender is often a
/// recipient too).
pub fn await_sent(
    client: &mut Client,
    count: usize,
    seen: &mut Vec<(String, String)>,
) -> BTreeMap<String, String> {
    let mut sent = BTreeMap::new();
    while sent.len() < count {
        let frame = client.recv();
        match frame["type"].as_str() {
            Some("sent") => {
                sent.insert(
                    frame["id"].as_str().unwrap().to_owned(),
                    frame["message_id"].as_str().unwrap().to_owned(),
                );
            }
            Some("message") => {
                note(client, &frame, seen);
            }
            Some("error") => panic!("a send was refused: {frame}"),
            _ => {}
        }
    }
    sent
}
