//! Node and shard counters, and their Prometheus text rendering for /metrics.
//!
//! Each shard writes only its own `ShardMetrics` (cache-line padded, relaxed
//! atomics with a single writer, so no contention); the admin thread only reads.
//! Never allocates on the shards' side.

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use backplane_bridge::lease::LeaseValidity;
use backplane_bridge::Backplane;
use chat_protocol::codes::{CloseCode, ErrorCode, CLOSE_CODES, ERROR_CODES};
use crossbeam_utils::CachePadded;

use crate::mesh::Mesh;

/// Why a handshake was refused, for `gateway_handshakes_refused_total{reason}`.
#[derive(Debug, Clone, Copy)]
pub enum Refusal {
    BadRequest,
    Unauthorized,
    NotFound,
    MethodNotAllowed,
    UpgradeRequired,
    TooLarge,
    AtCapacity,
    Draining,
    Timeout,
    TooManyDevices,
    Revoked,
    StorageUnavailable,
    /// Plain bytes on a `wss://` listener (answered with a plain 400).
    NotTls,
    /// The TLS handshake failed (the client refused our certificate, or
    /// offered nothing we accept); rustls sent the alert.
    TlsHandshake,
}

const REFUSALS: [(&str, Refusal); 14] = [
    ("bad_request", Refusal::BadRequest),
    ("unauthorized", Refusal::Unauthorized),
    ("not_found", Refusal::NotFound),
    ("method_not_allowed", Refusal::MethodNotAllowed),
    ("upgrade_required", Refusal::UpgradeRequired),
    ("too_large", Refusal::TooLarge),
    ("at_capacity", Refusal::AtCapacity),
    ("draining", Refusal::Draining),
    ("timeout", Refusal::Timeout),
    ("too_many_devices", Refusal::TooManyDevices),
    ("revoked", Refusal::Revoked),
    ("storage_unavailable", Refusal::StorageUnavailable),
    ("not_tls", Refusal::NotTls),
    ("tls_handshake", Refusal::TlsHandshake),
];

/// Counters of one shard. Written only by that shard's thread.
#[derive(Default)]
pub struct ShardMetrics {
    pub connections: AtomicU64,
    /// Heartbeat sweeps completed: proof of progress for the systemd watchdog.
    pub sweeps: AtomicU64,
    /// Users with at least one connection here (refreshed each heartbeat sweep).
    pub users: AtomicU64,
    /// Entries in the idempotency table (refreshed each heartbeat sweep).
    pub idempotency_entries: AtomicU64,
    pub handshakes_accepted: AtomicU64,
    /// Plain GETs of the web client's pages answered.
    pub pages_served: AtomicU64,
    pub handshakes_refused: [AtomicU64; REFUSALS.len()],
    pub handoffs_sent: AtomicU64,
    pub handoffs_received: AtomicU64,
    pub frames_in: AtomicU64,
    pub frames_out: AtomicU64,
    pub messages_routed_local: AtomicU64,
    pub messages_routed_cross_shard: AtomicU64,
    pub messages_received_cross_shard: AtomicU64,
    pub idempotent_replays: AtomicU64,
    /// Sends refused because `sent` waited past `sent_wait_ms_max`.
    pub sends_refused_lagging: AtomicU64,
    /// Sends refused because nothing became durable for `storage_stall_ms_max`.
    pub sends_refused_stalled: AtomicU64,
    /// How long nothing has become durable while a `sent` waits, in ms (0:
    /// committing; refreshed each heartbeat sweep).
    pub storage_stalled_ms: AtomicU64,
    /// What the storage-writer last said fails (empty: nothing said since
    /// the last durable watermark). Written on the rare notice only.
    pub storage_failure: std::sync::Mutex<String>,
    /// Replays answered from storage and delivered again (see `pipeline::deliver_again`).
    pub redeliveries_after_failover: AtomicU64,
    pub errors: [AtomicU64; ERROR_CODES.len()],
    pub closes: [AtomicU64; CLOSE_CODES.len()],
    /// Publishes not queued to the backplane (its queue was full).
    pub backplane_queue_full: AtomicU64,
    /// Sends refused because the shard's ring was full (back-pressure).
    pub ring_full: AtomicU64,
    /// Device acknowledgements written to the ring.
    pub acks: AtomicU64,
    /// `typing` frames passed on.
    pub typing: AtomicU64,
    /// Messages sent to groups.
    pub group_messages: AtomicU64,
    /// Group membership changes.
    pub group_changes: AtomicU64,
    /// Delivered and read receipts taken from clients.
    pub receipts: AtomicU64,
    /// Receipt batches stored and sent (one per sender and conversation per window).
    pub receipt_batches: AtomicU64,
    /// Receipts dropped on a full ring.
    pub receipts_dropped: AtomicU64,
    /// Presence entries written (debounced).
    pub presence_written: AtomicU64,
    /// Presence requests answered.
    pub presence_queries: AtomicU64,
    /// Acknowledgements dropped on a full ring (the device may get a redelivery).
    pub acks_dropped: AtomicU64,
    pub syncs: AtomicU64,
    /// Syncs tried again after storage failed them.
    pub sync_retries: AtomicU64,
    pub synced_messages: AtomicU64,
    /// `sent` frames waiting for the durable watermark (refreshed each sweep).
    pub durable_waiting: AtomicU64,
    /// 1 while the shard is connected to the storage-writer.
    pub storage_connected: AtomicU64,
    /// Time from a ring append to the watermark covering it, by upper bound.
    pub durable_wait_buckets: [AtomicU64; DURABLE_WAIT_BOUNDS_US.len() + 1],
    pub durable_wait_sum_us: AtomicU64,
}

/// Upper bounds (µs) of the append-to-durable histogram buckets; the last bucket is +Inf.
pub const DURABLE_WAIT_BOUNDS_US: [u64; 12] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 1_000_000, 10_000_000,
];

/// Adds `amount` to a counter that only the calling thread writes: a plain
/// load and store, cheaper than a locked read-modify-write.
pub fn bump(counter: &AtomicU64, amount: u64) {
    counter.store(counter.load(Relaxed).wrapping_add(amount), Relaxed);
}

impl ShardMetrics {
    pub fn refused(&self, refusal: Refusal) {
        bump(&self.handshakes_refused[refusal as usize], 1);
    }
    pub fn error(&self, code: ErrorCode) {
        bump(&self.errors[code.index()], 1);
    }
    pub fn closed(&self, code: CloseCode) {
        bump(&self.closes[code.index()], 1);
    }
    pub fn durable_wait(&self, wait: std::time::Duration) {
        let us = wait.as_micros() as u64;
        let bucket = DURABLE_WAIT_BOUNDS_US
            .iter()
            .position(|bound| us <= *bound)
            .unwrap_or(DURABLE_WAIT_BOUNDS_US.len());
        bump(&self.durable_wait_buckets[bucket], 1);
        bump(&self.durable_wait_sum_us, us);
    }
}

/// State the whole node shares: metrics, the connection budget, drain and readiness.
pub struct NodeState {
    pub shards: Vec<CachePadded<ShardMetrics>>,
    /// Sockets open (accepted and not yet closed), across all shards.
    pub connections_open: CachePadded<AtomicUsize>,
    /// The most sockets this process may hold (from RLIMIT_NOFILE and config).
    pub connections_max: usize,
    pub draining: AtomicBool,
    pub shards_ready: AtomicUsize,
    pub io_driver: std::sync::OnceLock<&'static str>,
    /// This node's id, and whether it may make message ids with it now (a
    /// leased id whose lease lapsed may not; a configured id always may).
    pub node_id: u16,
    pub node_id_lease: Option<Arc<LeaseValidity>>,
    /// Certificate reloads (SIGHUP) that took effect, and that failed (the
    /// old certificate stays).
    pub tls_reloads: [AtomicU64; 2],
    /// `storage_stall_ms_max`: a shard stalled this long makes the node not ready.
    pub storage_stall_ms_max: u64,
}

impl NodeState {
    pub fn new(
        shard_count: usize,
        connections_max: usize,
        node_id: u16,
        node_id_lease: Option<Arc<LeaseValidity>>,
        storage_stall_ms_max: u64,
    ) -> Self {
        Self {
            shards: (0..shard_count)
                .map(|_| CachePadded::new(ShardMetrics::default()))
                .collect(),
            connections_open: CachePadded::new(AtomicUsize::new(0)),
            connections_max,
            draining: AtomicBool::new(false),
            shards_ready: AtomicUsize::new(0),
            io_driver: std::sync::OnceLock::new(),
            node_id,
            node_id_lease,
            tls_reloads: Default::default(),
            storage_stall_ms_max,
        }
    }

    /// Whether message ids may be made now (see `node_id_lease`).
    pub fn may_make_ids(&self) -> bool {
        self.node_id_lease
            .as_ref()
            .is_none_or(|lease| lease.is_valid())
    }

    /// Claims one connection slot; false when the node is full.
    pub fn try_claim_connection(&self) -> bool {
        let previous = self.connections_open.fetch_add(1, Relaxed);
        if previous >= self.connections_max {
            self.connections_open.fetch_sub(1, Relaxed);
            return false;
        }
        true
    }

    pub fn release_connection(&self) {
        self.connections_open.fetch_sub(1, Relaxed);
    }

    /// Why the node is not ready, one line each (`/readyz` says them;
    /// none: every shard is up, reaches the storage-writer and sees its
    /// sends made durable, and the node is not draining).
    pub fn not_ready_because(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        let started = self.shards_ready.load(Relaxed);
        if started < self.shards.len() {
            reasons.push(format!("{started} of {} shards started", self.shards.len()));
        }
        if self.draining.load(Relaxed) {
            reasons.push("draining".to_owned());
        }
        for (id, shard) in self.shards.iter().enumerate() {
            if shard.storage_connected.load(Relaxed) != 1 {
                reasons.push(format!("shard {id}: no storage-writer connected"));
            }
            let stalled_ms = shard.storage_stalled_ms.load(Relaxed);
            if self.storage_stall_ms_max > 0 && stalled_ms > self.storage_stall_ms_max {
                let failure = shard.storage_failure.lock().expect("failure lock");
                let why = if failure.is_empty() {
                    "the storage-writer said nothing"
                } else {
                    failure.as_str()
                };
                reasons.push(format!(
                    "shard {id}: nothing made durable for {stalled_ms} ms (storage-writer: {why}); sends get `unavailable`"
                ));
            }
        }
        reasons
    }
}

/// The per-shard metrics that are one atomic each: (name, kind, help, field).
/// Adding one is a field in `ShardMetrics` and a line here.
type ShardField = fn(&ShardMetrics) -> &AtomicU64;
const SHARD_METRICS: &[(&str, &str, &str, ShardField)] = &[
    (
        "gateway_connections",
        "gauge",
        "Registered WebSocket connections.",
        |m| &m.connections,
    ),
    (
        "gateway_users",
        "gauge",
        "Users homed on the shard with a connection.",
        |m| &m.users,
    ),
    (
        "gateway_idempotency_entries",
        "gauge",
        "Remembered send ids.",
        |m| &m.idempotency_entries,
    ),
    (
        "gateway_handshakes_accepted_total",
        "counter",
        "Upgrades accepted.",
        |m| &m.handshakes_accepted,
    ),
    (
        "gateway_pages_served_total",
        "counter",
        "Requests for the web client's pages (and dev sign-in) answered.",
        |m| &m.pages_served,
    ),
    (
        "gateway_handoffs_sent_total",
        "counter",
        "Authenticated sockets handed to their user's home shard.",
        |m| &m.handoffs_sent,
    ),
    (
        "gateway_handoffs_received_total",
        "counter",
        "Sockets adopted from another shard.",
        |m| &m.handoffs_received,
    ),
    (
        "gateway_frames_in_total",
        "counter",
        "WebSocket messages and control frames received.",
        |m| &m.frames_in,
    ),
    (
        "gateway_frames_out_total",
        "counter",
        "Frames queued to clients.",
        |m| &m.frames_out,
    ),
    (
        "gateway_messages_routed_local_total",
        "counter",
        "Sends whose recipient is homed on the sender's shard.",
        |m| &m.messages_routed_local,
    ),
    (
        "gateway_messages_routed_cross_shard_total",
        "counter",
        "Sends handed to the recipient's home shard.",
        |m| &m.messages_routed_cross_shard,
    ),
    (
        "gateway_messages_received_cross_shard_total",
        "counter",
        "Deliveries received from other shards.",
        |m| &m.messages_received_cross_shard,
    ),
    (
        "gateway_idempotent_replays_total",
        "counter",
        "Repeated send ids answered from the idempotency table.",
        |m| &m.idempotent_replays,
    ),
    (
        "gateway_sends_refused_lagging_total",
        "counter",
        "Sends answered `overloaded` because `sent` already waited past sent_wait_ms_max.",
        |m| &m.sends_refused_lagging,
    ),
    (
        "gateway_sends_refused_stalled_total",
        "counter",
        "Sends answered `unavailable` because nothing became durable for storage_stall_ms_max.",
        |m| &m.sends_refused_stalled,
    ),
    (
        "gateway_storage_stalled_ms",
        "gauge",
        "How long nothing has become durable while a `sent` waits (0: storage commits).",
        |m| &m.storage_stalled_ms,
    ),
    (
        "gateway_redeliveries_after_failover_total",
        "counter",
        "Retries answered from storage and delivered again (the first node may have died before delivering).",
        |m| &m.redeliveries_after_failover,
    ),
    (
        "gateway_ring_full_total",
        "counter",
        "Sends answered `overloaded` because the shard's ring was full.",
        |m| &m.ring_full,
    ),
    (
        "gateway_acks_total",
        "counter",
        "Device acknowledgements written to the ring.",
        |m| &m.acks,
    ),
    (
        "gateway_group_messages_total",
        "counter",
        "Messages sent to groups.",
        |m| &m.group_messages,
    ),
    (
        "gateway_group_changes_total",
        "counter",
        "Group membership changes.",
        |m| &m.group_changes,
    ),
    (
        "gateway_receipts_total",
        "counter",
        "Delivered and read receipts taken from clients.",
        |m| &m.receipts,
    ),
    (
        "gateway_receipt_batches_total",
        "counter",
        "Receipt batches stored and sent (one per sender and conversation per window).",
        |m| &m.receipt_batches,
    ),
    (
        "gateway_receipts_dropped_total",
        "counter",
        "Receipts dropped on a full ring.",
        |m| &m.receipts_dropped,
    ),
    (
        "gateway_presence_written_total",
        "counter",
        "Presence entries written (debounced).",
        |m| &m.presence_written,
    ),
    (
        "gateway_presence_queries_total",
        "counter",
        "Presence requests answered.",
        |m| &m.presence_queries,
    ),
    (
        "gateway_typing_total",
        "counter",
        "Typing indications passed on (never stored).",
        |m| &m.typing,
    ),
    (
        "gateway_acks_dropped_total",
        "counter",
        "Acknowledgements dropped on a full ring (a redelivery, not a loss).",
        |m| &m.acks_dropped,
    ),
    ("gateway_syncs_total", "counter", "Syncs completed.", |m| {
        &m.syncs
    }),
    (
        "gateway_sync_retries_total",
        "counter",
        "Syncs tried again after storage failed them (a device still gets what it missed).",
        |m| &m.sync_retries,
    ),
    (
        "gateway_synced_messages_total",
        "counter",
        "Messages sent by syncs.",
        |m| &m.synced_messages,
    ),
    (
        "gateway_durable_waiting",
        "gauge",
        "`sent` frames waiting for the durable watermark.",
        |m| &m.durable_waiting,
    ),
    (
        "gateway_storage_connected",
        "gauge",
        "1 while the shard is connected to the storage-writer.",
        |m| &m.storage_connected,
    ),
];

/// Renders Prometheus text exposition format 0.0.4.
pub fn render(node: &NodeState, mesh: &Mesh, backplane: Option<&Backplane>) -> String {
    let mut out = String::with_capacity(8 * 1024);
    let family = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    let per_shard = |out: &mut String,
                     name: &str,
                     kind: &str,
                     help: &str,
                     read: &dyn Fn(&ShardMetrics) -> u64| {
        family(out, name, kind, help);
        for (shard, metrics) in node.shards.iter().enumerate() {
            let _ = writeln!(out, "{name}{{shard=\"{shard}\"}} {}", read(metrics));
        }
    };

    family(
        &mut out,
        "gateway_connections_max",
        "gauge",
        "Connections this process can hold (RLIMIT_NOFILE and config).",
    );
    let _ = writeln!(out, "gateway_connections_max {}", node.connections_max);
    family(
        &mut out,
        "gateway_sockets_open",
        "gauge",
        "Sockets open, including handshakes in progress.",
    );
    let _ = writeln!(
        out,
        "gateway_sockets_open {}",
        node.connections_open.load(Relaxed)
    );
    family(
        &mut out,
        "gateway_draining",
        "gauge",
        "1 while the node drains.",
    );
    let _ = writeln!(
        out,
        "gateway_draining {}",
        u8::from(node.draining.load(Relaxed))
    );
    family(
        &mut out,
        "gateway_node_id",
        "gauge",
        "This node's id in message ids (leased from NATS in a fleet).",
    );
    let _ = writeln!(out, "gateway_node_id {}", node.node_id);
    family(
        &mut out,
        "gateway_node_id_valid",
        "gauge",
        "1 while this node may make message ids (its id lease, if any, is held).",
    );
    let _ = writeln!(
        out,
        "gateway_node_id_valid {}",
        u8::from(node.may_make_ids())
    );

    family(
        &mut out,
        "gateway_tls_reloads_total",
        "counter",
        "Certificate reloads on SIGHUP, by result (a failed one keeps the old certificate).",
    );
    for (index, result) in ["ok", "failed"].iter().enumerate() {
        let _ = writeln!(
            out,
            "gateway_tls_reloads_total{{result=\"{result}\"}} {}",
            node.tls_reloads[index].load(Relaxed)
        );
    }

    for (name, kind, help, field) in SHARD_METRICS {
        per_shard(&mut out, name, kind, help, &|m| field(m).load(Relaxed));
    }
    family(
        &mut out,
        "gateway_handshakes_refused_total",
        "counter",
        "Upgrades refused, by reason.",
    );
    for (shard, metrics) in node.shards.iter().enumerate() {
        for (reason, refusal) in REFUSALS {
            let value = metrics.handshakes_refused[refusal as usize].load(Relaxed);
            let _ = writeln!(
                out,
                "gateway_handshakes_refused_total{{shard=\"{shard}\",reason=\"{reason}\"}} {value}"
            );
        }
    }
    family(
        &mut out,
        "gateway_durable_wait_seconds",
        "histogram",
        "Time from a shard's ring append to the durable watermark covering it.",
    );
    for (shard, metrics) in node.shards.iter().enumerate() {
        let mut cumulative = 0;
        for (index, bucket) in metrics.durable_wait_buckets.iter().enumerate() {
            cumulative += bucket.load(Relaxed);
            let le = DURABLE_WAIT_BOUNDS_US
                .get(index)
                .map(|us| format!("{}", *us as f64 / 1e6))
                .unwrap_or_else(|| "+Inf".into());
            let _ = writeln!(
                out,
                "gateway_durable_wait_seconds_bucket{{shard=\"{shard}\",le=\"{le}\"}} {cumulative}"
            );
        }
        let sum = metrics.durable_wait_sum_us.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(
            out,
            "gateway_durable_wait_seconds_sum{{shard=\"{shard}\"}} {sum}\ngateway_durable_wait_seconds_count{{shard=\"{shard}\"}} {cumulative}"
        );
    }
    family(
        &mut out,
        "gateway_cross_shard_queue_depth",
        "gauge",
        "Messages waiting in a shard's inbound queues.",
    );
    for shard in 0..node.shards.len() {
        let _ = writeln!(
            out,
            "gateway_cross_shard_queue_depth{{shard=\"{shard}\"}} {}",
            mesh.depth(shard)
        );
    }
    family(
        &mut out,
        "gateway_errors_total",
        "counter",
        "Error frames sent, by code.",
    );
    for (shard, metrics) in node.shards.iter().enumerate() {
        for code in ERROR_CODES {
            let value = metrics.errors[code.index()].load(Relaxed);
            let _ = writeln!(
                out,
                "gateway_errors_total{{shard=\"{shard}\",code=\"{}\"}} {value}",
                code.as_str()
            );
        }
    }
    family(
        &mut out,
        "gateway_closes_total",
        "counter",
        "Connections closed by the gateway, by WebSocket close code.",
    );
    for (shard, metrics) in node.shards.iter().enumerate() {
        for code in CLOSE_CODES {
            let value = metrics.closes[code.index()].load(Relaxed);
            let _ = writeln!(
                out,
                "gateway_closes_total{{shard=\"{shard}\",code=\"{}\"}} {value}",
                code.code()
            );
        }
    }
    if let Some(backplane) = backplane {
        render_backplane(&mut out, backplane, node.shards.len());
    }
    out
}

fn render_backplane(out: &mut String, backplane: &Backplane, shards: usize) {
    let stats = &backplane.stats;
    let gauges = [
        (
            "gateway_backplane_connected",
            "gauge",
            "1 while the node is connected to NATS.",
            u64::from(stats.connected.load(Relaxed)),
        ),
        (
            "gateway_backplane_subscriptions",
            "gauge",
            "NATS subscriptions this node holds (a constant: per node, not per user).",
            stats.subscriptions.load(Relaxed),
        ),
        (
            "gateway_backplane_nodes_live",
            "gauge",
            "Nodes in this node's membership (itself included), heard within the liveness timeout.",
            stats.nodes_live.load(Relaxed),
        ),
        (
            "gateway_backplane_exceptions_held",
            "gauge",
            "(user, node) registrations held here as the users' home: messages this node forwards.",
            stats.exceptions_held.load(Relaxed),
        ),
        (
            "gateway_backplane_exceptions_here",
            "gauge",
            "Users with a device here whose home is another node.",
            stats.exceptions_here.load(Relaxed),
        ),
        (
            "gateway_backplane_forwarded_total",
            "counter",
            "Envelopes this node forwarded as a home (one per message per node).",
            stats.forwarded.load(Relaxed),
        ),
        (
            "gateway_backplane_homes_moved_total",
            "counter",
            "Users with a device here whose home moved (each resyncs once the fleet has seen it).",
            stats.homes_moved.load(Relaxed),
        ),
        (
            "gateway_backplane_registrations_failed_total",
            "counter",
            "Registrations at a home that failed or timed out (retried; the user resyncs after).",
            stats.registrations_failed.load(Relaxed),
        ),
        (
            "gateway_backplane_published_total",
            "counter",
            "Envelopes published (one per node per message, heartbeats aside).",
            stats.published.load(Relaxed),
        ),
        (
            "gateway_backplane_received_total",
            "counter",
            "Envelopes received for devices on this node.",
            stats.received.load(Relaxed),
        ),
        (
            "gateway_backplane_publish_dropped_total",
            "counter",
            "Publishes not sent because NATS was unreachable (recipients sync instead).",
            stats.publish_dropped.load(Relaxed),
        ),
        (
            "gateway_backplane_republished_total",
            "counter",
            "Publishes made just before NATS was lost, published again on the reconnect (receivers drop repeats).",
            stats.republished.load(Relaxed),
        ),
        (
            "gateway_backplane_inbound_dropped_total",
            "counter",
            "Received messages dropped on a full shard queue (recipients sync instead).",
            stats.inbound_dropped.load(Relaxed),
        ),
        (
            "gateway_backplane_reconnects_total",
            "counter",
            "Reconnections to NATS (each triggers a resync of every device).",
            stats.reconnects.load(Relaxed),
        ),
        (
            "gateway_backplane_bad_envelopes_total",
            "counter",
            "Received envelopes that did not decode.",
            stats.bad_envelopes.load(Relaxed),
        ),
    ];
    for (name, kind, help, value) in gauges {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP gateway_backplane_queue_depth Items waiting in a shard's queue to the backplane.\n# TYPE gateway_backplane_queue_depth gauge"
    );
    for shard in 0..shards {
        let _ = writeln!(
            out,
            "gateway_backplane_queue_depth{{shard=\"{shard}\"}} {}",
            backplane.depth(shard)
        );
    }
}
