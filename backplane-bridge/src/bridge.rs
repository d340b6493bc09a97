//! The bridge thread: the NATS connection, the node's few subscriptions,
//! routing by home, heartbeats, exceptions, events.
//!
//! Owns the per-shard outbound queues (shards push, the bridge thread pops);
//! one loop that holds all routing state (the membership, the exceptions
//! this node holds as a home, the users with devices here), so nothing in it
//! is shared or locked; one task that hands messages to the shards (through
//! the `Sink`, which queues to the user's home shard); reconnection with
//! back-off and jitter; and the counters behind `gateway_backplane_*`.
//!
//! A node subscribes to three subjects whatever its users: its own
//! (`<prefix>.n.<id>`: messages, registrations), the membership subject
//! and the group-changes subject (plus async-nats's one request inbox). A
//! message for a user goes to the user's home, which delivers to its own
//! devices and forwards to the nodes registered as having others.
//!
//! Must never: block a shard (a full queue is handed back to the caller), grow
//! without bound (every queue has a capacity; what does not fit is counted and
//! dropped, and the recipient gets it on a sync, since it is durable), publish
//! while disconnected (the reconnect triggers a resync instead), or let a
//! change of homes lose a message silently (the devices of a moved user
//! resync once every node has seen the change), or trust a publish made just
//! before NATS was lost (NATS is at-most-once, and a server killed with the
//! publish in its buffers loses it: those are published again on the
//! reconnect, and receivers drop repeats by message id).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use crossbeam_queue::ArrayQueue;
use futures_util::StreamExt;
use tokio::sync::{mpsc, Notify};

use crate::envelope::{Deliver, Envelope, Heartbeat, Hop, DELIVER_USERS_MAX};
use crate::exceptions::Exceptions;
use crate::membership::{Membership, Rebuilt};
use crate::routing::HomeTable;

/// Publishes made this long before NATS was lost are published again on
/// the reconnect (a server that dies drops what it had not routed; a dead
/// server's socket is seen closed within milliseconds, a silent one only
/// at async-nats's ping interval).
const REPUBLISH_WINDOW_MS: u64 = 2_000;
/// The most recent publishes kept for that (beyond, the oldest are
/// forgotten: their receivers get them on their next sync).
const REPUBLISH_KEPT_MAX: usize = 16_384;

/// Outbound items taken per shard per turn (fairness between shards).
const TURN_BUDGET: usize = 256;
/// How long a subscription may take to be confirmed before going on anyway.
const SUBSCRIBE_CONFIRM: Duration = Duration::from_secs(2);
/// Retries of a full shard queue before an inbound message is dropped.
const INBOUND_RETRIES: u32 = 50;
/// Messages waiting for the shards (between the routing loop and the task
/// that retries full shard queues).
const LOCAL_QUEUE: usize = 16 * 1024;
const RECONNECT_BACKOFF_MIN_MS: u64 = 100;
const RECONNECT_BACKOFF_MAX_MS: u64 = 5_000;
/// How often the routing loop does its housekeeping (heartbeat due, expiry,
/// table rebuild, retries, resyncs due).
const TICK: Duration = Duration::from_millis(100);
/// A node is live while heard within this many heartbeat intervals.
pub const HEARTBEATS_MISSED_MAX: u64 = 3;
/// How long a registration at a home may take before it is retried.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(1);
/// Registrations in flight at once (a reconnect re-registers every user).
const REGISTRATIONS_IN_FLIGHT_MAX: usize = 512;
/// A node gone this long has its registrations dropped (it was not just slow).
const GONE_FORGET_MS: u64 = 60_000;
/// How much earlier than the moment a message could first have gone astray
/// a resync starts: the clock difference between two nodes it tolerates
/// (message ids carry the sending node's clock).
const RESYNC_CLOCK_MARGIN_MS: u64 = 1_000;

/// Wall-clock milliseconds (message ids are made from it).
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

#[derive(Debug, Clone)]
pub struct BackplaneConfig {
    /// e.g. `nats://127.0.0.1:4222`.
    pub url: String,
    pub node_id: u16,
    pub shards: usize,
    /// Slots in each shard's outbound queue.
    pub queue_capacity: usize,
    /// Subject prefix (several fleets may share one NATS).
    pub subject_prefix: String,
    /// How often this node says it is live; it counts as gone after
    /// `HEARTBEATS_MISSED_MAX` intervals unheard.
    pub heartbeat_interval: Duration,
    /// Where clients reach this node (e.g. `wss://node7.chat.example/ws`),
    /// told to devices of users homed here that connect elsewhere; empty
    /// when not advertised.
    pub public_url: String,
}

impl BackplaneConfig {
    /// Unheard this long, a node is out of the membership.
    pub fn liveness_timeout(&self) -> Duration {
        self.heartbeat_interval * HEARTBEATS_MISSED_MAX as u32
    }

    /// After a change of homes, when every node has seen it: the longest a
    /// node can go on using the old table (a timeout, plus the interval by
    /// which two nodes' clocks of the last heartbeat can differ).
    pub fn settle_time(&self) -> Duration {
        self.liveness_timeout() + self.heartbeat_interval
    }
}

/// What a shard asks of the bridge.
#[derive(Debug)]
pub enum Outbound {
    /// The node now has (`active`) or no longer has a device of `user`.
    Interest { user: Box<str>, active: bool },
    /// A message for the devices of `users` on other nodes (the recipient,
    /// and the sender's user for the sender's other devices). Durable ones
    /// are published once durable; ephemeral ones at once.
    Publish {
        users: Vec<Box<str>>,
        message_id: u64,
        json: Bytes,
    },
    /// A group's membership changed (and is durable): every node forgets
    /// its cached member list.
    GroupChanged { group: Box<str> },
    /// A device of `user` (every device for `None`) was revoked (and is
    /// durable): the nodes with devices of the user close them. Routed like
    /// a message: to the user's home, which forwards to its exceptions.
    Revoke {
        user: Box<str>,
        device: Option<Box<str>>,
    },
}

/// What the bridge hands the gateway.
#[derive(Debug)]
pub enum Inbound {
    /// A message for the local devices of `user`.
    Deliver {
        user: Box<str>,
        message_id: u64,
        json: Bytes,
    },
    /// Messages for `user` reach this node now: its devices may sync.
    InterestActive { user: Box<str> },
    /// The backplane was away and is back: devices may have missed messages
    /// made since `since_unix_ms`.
    Reconnected { since_unix_ms: u64 },
    /// `user`'s home moved (or its registration there was late, or a
    /// message for it was dropped) and every node has seen it now: its
    /// devices here sync every message made since `since_unix_ms`. A device
    /// may have acknowledged a later message that arrived live (acks are
    /// cumulative), so the sync is from a time, not from its cursor.
    Moved { user: Box<str>, since_unix_ms: u64 },
    /// Another node changed this group's membership.
    GroupChanged { group: Box<str> },
    /// Another node revoked this device of a user with devices here (every
    /// device for `None`): close their connections.
    Revoked {
        user: Box<str>,
        device: Option<Box<str>>,
    },
}

/// Where inbound items go (the gateway routes them to the user's home shard).
pub trait Sink: Send + Sync + 'static {
    /// False when the target shard's queue is full (the item is not taken).
    fn deliver(&self, inbound: &Inbound) -> bool;
}

#[derive(Default)]
pub struct BackplaneStats {
    pub connected: AtomicBool,
    pub published: AtomicU64,
    pub received: AtomicU64,
    /// Publishes dropped while disconnected (the recipients sync instead).
    pub publish_dropped: AtomicU64,
    /// Publishes made just before NATS was lost, published again on the reconnect.
    pub republished: AtomicU64,
    /// Inbound messages dropped because a shard queue stayed full.
    pub inbound_dropped: AtomicU64,
    /// NATS subscriptions this node holds (constant: not one per user).
    pub subscriptions: AtomicU64,
    pub reconnects: AtomicU64,
    pub bad_envelopes: AtomicU64,
    /// Nodes in this node's membership, itself included.
    pub nodes_live: AtomicU64,
    /// (user, node) registrations this node holds as a home.
    pub exceptions_held: AtomicU64,
    /// Users with devices here whose home is another node.
    pub exceptions_here: AtomicU64,
    /// Messages this node forwarded as a home, one per (message, node).
    pub forwarded: AtomicU64,
    /// Users with devices here whose home moved.
    pub homes_moved: AtomicU64,
    /// Registrations at a home that failed or timed out (retried).
    pub registrations_failed: AtomicU64,
}

pub struct Backplane {
    config: BackplaneConfig,
    queues: Vec<ArrayQueue<Outbound>>,
    notify: Notify,
    serving: AtomicBool,
    /// What the shards may read of the routing state (at connect, never
    /// per message): replaced whole when the membership changes.
    homes: ArcSwap<Homes>,
    pub stats: BackplaneStats,
}

/// The home table and the nodes' advertised URLs, as one snapshot.
struct Homes {
    me: u16,
    table: Arc<HomeTable>,
    urls: HashMap<u16, Arc<str>>,
}

impl Backplane {
    /// Starts the bridge thread; it connects (and keeps reconnecting) in the background.
    pub fn start(config: BackplaneConfig, sink: Arc<dyn Sink>) -> anyhow::Result<Arc<Self>> {
        anyhow::ensure!(config.shards > 0 && config.queue_capacity > 0);
        anyhow::ensure!(!config.heartbeat_interval.is_zero());
        anyhow::ensure!(
            config.public_url.len() <= crate::envelope::URL_BYTES_MAX,
            "public_url is longer than {} bytes",
            crate::envelope::URL_BYTES_MAX
        );
        let me = config.node_id;
        let homes = Homes {
            me,
            table: Arc::new(HomeTable::new(&[me]).expect("one node")),
            urls: HashMap::new(),
        };
        let backplane = Arc::new(Self {
            homes: ArcSwap::from_pointee(homes),
            queues: (0..config.shards)
                .map(|_| ArrayQueue::new(config.queue_capacity))
                .collect(),
            config,
            notify: Notify::new(),
            serving: AtomicBool::new(true),
            stats: BackplaneStats::default(),
        });
        let thread = backplane.clone();
        crate::runtime::runtime_thread("backplane", async move { run(thread, sink).await })?;
        Ok(backplane)
    }

    /// Queues `outbound` from `shard`. A full queue hands it back.
    pub fn send(&self, shard: usize, outbound: Outbound) -> Result<(), Outbound> {
        self.queues[shard].push(outbound)?;
        self.notify.notify_one();
        Ok(())
    }

    /// Items waiting in `shard`'s outbound queue.
    pub fn depth(&self, shard: usize) -> usize {
        self.queues[shard].len()
    }

    /// Where a device of `user` should reconnect: its home's `public_url`,
    /// when another node is the home and advertises one. Reads a snapshot
    /// (no lock); for `hello`, never per message.
    pub fn home_url(&self, user: &str) -> Option<Arc<str>> {
        let homes = self.homes.load();
        let home = homes.table.home(user);
        if home == homes.me {
            return None;
        }
        homes.urls.get(&home).cloned()
    }

    /// A draining node stops being anyone's home at once (it says so in a
    /// heartbeat), so its users' homes move while it still serves them.
    pub fn stop_serving(&self) {
        self.serving.store(false, Relaxed);
        self.notify.notify_one();
    }
}

/// The subject of one node: messages for its devices and registrations.
pub fn node_subject(prefix: &str, node: u16) -> String {
    format!("{prefix}.n.{node}")
}

/// The fleet-wide membership subject: every node's heartbeats.
pub fn nodes_subject(prefix: &str) -> String {
    format!("{prefix}.nodes")
}

/// The fleet-wide subject of membership changes (rare next to messages:
/// one small publish per change, heard by every node).
pub fn groups_subject(prefix: &str) -> String {
    format!("{prefix}.groups")
}

/// Exponential back-off with ±50% jitter, so a fleet does not reconnect in step.
fn reconnect_delay(attempts: usize) -> Duration {
    let exponent = attempts.min(16) as u32;
    let base = RECONNECT_BACKOFF_MIN_MS
        .saturating_mul(1u64 << exponent)
        .min(RECONNECT_BACKOFF_MAX_MS);
    Duration::from_millis(base / 2 + fastrand::u64(0..=base))
}

/// A user with devices on this node.
#[derive(Debug, Default)]
struct Local {
    /// The home that knows this node has devices of the user (this node
    /// itself when it is the home); `None` until a registration succeeds.
    registered: Option<u16>,
    /// A registration on its way to this home.
    in_flight: Option<u16>,
    /// The shard waits for `InterestActive` before the connect-time sync.
    owed_active: bool,
    /// A registration failed at this time (unix ms): resync from it once
    /// one succeeds.
    missed_since: Option<u64>,
}

/// A registration's answer.
struct Registered {
    user: Box<str>,
    home: u16,
    ok: bool,
}

/// Everything the routing loop owns.
struct Router {
    backplane: Arc<Backplane>,
    client: async_nats::Client,
    sink: Arc<dyn Sink>,
    to_shards: mpsc::Sender<Inbound>,
    /// Deliveries queued for `hand_to_shards` and not yet handed over.
    retrying: Arc<AtomicUsize>,
    registered_tx: mpsc::Sender<Registered>,
    me: u16,
    incarnation: u64,
    membership: Membership,
    exceptions: Exceptions,
    local: HashMap<Box<str>, Local>,
    /// Local users with no registration and none in flight (retried each tick).
    unregistered: HashSet<Box<str>>,
    in_flight: usize,
    /// Users whose devices resync at a time (ms since start), each from a
    /// wall-clock time (unix ms).
    resync_due: BTreeMap<u64, Vec<(Box<str>, u64)>>,
    /// When to drop registrations of users no longer homed here.
    sweep_at: Option<u64>,
    started: Instant,
    last_heartbeat_ms: Option<u64>,
    /// Outbound traffic waits until the membership is known (one heartbeat
    /// interval and a half after the first connect): a table of this node
    /// alone would make it home to everyone.
    warm_at_ms: Option<u64>,
    /// When NATS was lost (unix ms), until the reconnect.
    disconnected_at_unix_ms: Option<u64>,
    started_unix_ms: u64,
    /// Messages kept while this node could not route them.
    held: VecDeque<Outbound>,
    /// The last `REPUBLISH_WINDOW_MS` of publishes (unix ms, the publish),
    /// oldest first, for a reconnect to publish again.
    recent: VecDeque<(u64, Outbound)>,
}

async fn run(backplane: Arc<Backplane>, sink: Arc<dyn Sink>) {
    let (events_tx, mut events) = mpsc::channel(64);
    let options = async_nats::ConnectOptions::new()
        .name(format!("chat-gateway-node-{}", backplane.config.node_id))
        // A node never hears its own publishes (heartbeats included).
        .no_echo()
        .retry_on_initial_connect()
        .max_reconnects(None)
        .reconnect_delay_callback(reconnect_delay)
        .event_callback(move |event| {
            let events_tx = events_tx.clone();
            async move {
                let _ = events_tx.send(event).await;
            }
        });
    let servers = match crate::servers::server_addrs(&backplane.config.url) {
        Ok(servers) => servers,
        Err(error) => {
            tracing::error!(%error, "backplane: bad NATS address; cross-node delivery is off");
            return;
        }
    };
    let client = match options.connect(servers.as_slice()).await {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(url = %backplane.config.url, %error, "backplane: bad NATS address; cross-node delivery is off");
            return;
        }
    };
    let prefix = backplane.config.subject_prefix.clone();
    let me = backplane.config.node_id;
    let subscribed = async {
        let node = client.subscribe(node_subject(&prefix, me)).await?;
        let nodes = client.subscribe(nodes_subject(&prefix)).await?;
        Ok::<_, async_nats::SubscribeError>((node, nodes))
    };
    let (mut node_messages, mut heartbeats) = match subscribed.await {
        Ok(subscriptions) => subscriptions,
        Err(error) => {
            tracing::error!(%error, "backplane: could not subscribe; cross-node delivery is off");
            return;
        }
    };
    tokio::spawn(forward_group_changes(
        backplane.clone(),
        client.clone(),
        sink.clone(),
    ));
    // Ours, the membership, group changes, and the request inbox.
    backplane.stats.subscriptions.store(4, Relaxed);
    let (to_shards, from_router) = mpsc::channel(LOCAL_QUEUE);
    let retrying = Arc::new(AtomicUsize::new(0));
    let (dropped_tx, mut dropped_rx) = mpsc::channel(LOCAL_QUEUE);
    tokio::spawn(hand_to_shards(
        backplane.clone(),
        sink.clone(),
        from_router,
        dropped_tx,
        retrying.clone(),
    ));
    let (registered_tx, mut registered_rx) = mpsc::channel(REGISTRATIONS_IN_FLIGHT_MAX);
    let timeout_ms = backplane.config.liveness_timeout().as_millis() as u64;
    let mut router = Router {
        backplane: backplane.clone(),
        client,
        sink,
        to_shards,
        retrying,
        registered_tx,
        me,
        incarnation: fastrand::u64(..),
        membership: Membership::new(me, timeout_ms),
        exceptions: Exceptions::default(),
        local: HashMap::new(),
        unregistered: HashSet::new(),
        in_flight: 0,
        resync_due: BTreeMap::new(),
        sweep_at: None,
        started: Instant::now(),
        last_heartbeat_ms: None,
        warm_at_ms: None,
        disconnected_at_unix_ms: None,
        started_unix_ms: unix_ms(),
        held: VecDeque::new(),
        recent: VecDeque::new(),
    };
    router.stats_update();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ever_connected = false;
    loop {
        tokio::select! {
            _ = backplane.notify.notified() => router.drain_outbound().await,
            Some(message) = node_messages.next() => router.on_node_message(message).await,
            Some(message) = heartbeats.next() => router.on_heartbeat(&message.payload),
            Some(registered) = registered_rx.recv() => router.on_registered(registered).await,
            Some((user, since)) = dropped_rx.recv() => router.resync_at_settle(user, since),
            _ = tick.tick() => router.housekeeping().await,
            Some(event) = events.recv() => match event {
                async_nats::Event::Connected => {
                    backplane.stats.connected.store(true, Relaxed);
                    if ever_connected {
                        backplane.stats.reconnects.fetch_add(1, Relaxed);
                        tracing::info!("backplane reconnected; devices resync");
                        let since = router
                            .disconnected_at_unix_ms
                            .take()
                            .unwrap_or_else(|| unix_ms().saturating_sub(router.settle_ms()));
                        router.republish_since(since.saturating_sub(REPUBLISH_WINDOW_MS));
                        router.tell_registered_nodes_to_resync(since).await;
                        router.after_an_outage(since);
                    } else {
                        tracing::info!(url = %backplane.config.url, node = me, "backplane connected");
                        if !router.local.is_empty() {
                            // Devices were served before NATS was reachable.
                            router.after_an_outage(router.started_unix_ms);
                        }
                    }
                    // Others may have dropped this node meanwhile, and it
                    // may have dropped them: learn the membership again
                    // before routing.
                    let interval = backplane.config.heartbeat_interval.as_millis() as u64;
                    router.warm_at_ms = Some(router.now_ms() + interval * 3 / 2);
                    router.heartbeat().await;
                    ever_connected = true;
                }
                async_nats::Event::Disconnected => {
                    router.disconnected_at_unix_ms.get_or_insert_with(unix_ms);
                    router.warm_at_ms = None;
                    backplane.stats.connected.store(false, Relaxed);
                    tracing::warn!("backplane down: local delivery continues; remote users get their messages on sync");
                }
                other => tracing::info!(event = %other, "backplane event"),
            },
        }
        // More may have arrived while this turn ran.
        if backplane.queues.iter().any(|q| !q.is_empty()) {
            backplane.notify.notify_one();
        }
    }
}

impl Router {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn warm(&self) -> bool {
        self.warm_at_ms.is_some_and(|at| self.now_ms() >= at)
    }

    fn prefix(&self) -> &str {
        &self.backplane.config.subject_prefix
    }

    fn settle_ms(&self) -> u64 {
        self.backplane.config.settle_time().as_millis() as u64
    }

    fn stats(&self) -> &BackplaneStats {
        &self.backplane.stats
    }

    async fn publish_to(&self, node: u16, envelope: &Envelope) {
        let subject = node_subject(self.prefix(), node);
        match self.client.publish(subject, envelope.encode().into()).await {
            Ok(()) => self.stats().published.fetch_add(1, Relaxed),
            Err(_) => self.stats().publish_dropped.fetch_add(1, Relaxed),
        };
    }

    /// Publishes one message to each node of `batches`, in envelopes of at
    /// most `DELIVER_USERS_MAX` users.
    async fn publish_batches(
        &self,
        batches: HashMap<(u16, bool), Vec<Box<str>>>,
        message_id: u64,
        json: &Bytes,
    ) {
        for ((node, to_home), mut users) in batches {
            while !users.is_empty() {
                let rest = users.split_off(users.len().min(DELIVER_USERS_MAX));
                let envelope = Envelope::Deliver(Deliver {
                    origin_node: self.me,
                    hop: if to_home { Hop::ToHome } else { Hop::Forwarded },
                    users: std::mem::replace(&mut users, rest),
                    message_id,
                    json: json.clone(),
                });
                self.publish_to(node, &envelope).await;
            }
        }
    }

    /// Connected, and the membership is known: messages can be routed.
    fn routable(&self) -> bool {
        self.stats().connected.load(Relaxed) && self.warm()
    }

    async fn drain_outbound(&mut self) {
        let routable = self.routable();
        if routable {
            self.check_serving().await;
            self.flush_held().await;
        }
        let backplane = self.backplane.clone();
        for queue in &backplane.queues {
            for _ in 0..TURN_BUDGET {
                let Some(item) = queue.pop() else {
                    break;
                };
                match item {
                    Outbound::Interest { user, active: true } => self.interest_on(user),
                    Outbound::Interest {
                        user,
                        active: false,
                    } => self.interest_off(&user).await,
                    other if routable => self.route(other).await,
                    other => self.hold(other),
                }
            }
        }
        self.stats_update();
    }

    /// Keeps a message while this node cannot route (NATS away, or the
    /// membership not known yet), up to one shard queue's capacity; beyond
    /// that it is dropped and counted (recipients on other nodes get it on
    /// their next sync).
    fn hold(&mut self, item: Outbound) {
        if self.held.len() < self.backplane.config.queue_capacity {
            self.held.push_back(item);
        } else {
            self.stats().publish_dropped.fetch_add(1, Relaxed);
        }
    }

    /// Routes what was held, oldest first.
    async fn flush_held(&mut self) {
        while let Some(item) = self.held.pop_front() {
            self.route(item).await;
        }
    }

    async fn route(&mut self, item: Outbound) {
        match item {
            Outbound::Publish {
                users,
                message_id,
                json,
            } => self.publish(users, message_id, json).await,
            Outbound::GroupChanged { group } => {
                let subject = groups_subject(self.prefix());
                let payload = Bytes::copy_from_slice(group.as_bytes());
                match self.client.publish(subject, payload).await {
                    Ok(()) => self.stats().published.fetch_add(1, Relaxed),
                    Err(_) => self.stats().publish_dropped.fetch_add(1, Relaxed),
                };
            }
            Outbound::Interest { user, active: true } => self.interest_on(user),
            Outbound::Interest {
                user,
                active: false,
            } => self.interest_off(&user).await,
            Outbound::Revoke { user, device } => {
                let device: Box<str> = device.unwrap_or_default();
                for (node, hop) in self.route_targets(&user) {
                    let envelope = Envelope::Revoke {
                        origin_node: self.me,
                        hop,
                        user: user.clone(),
                        device: device.clone(),
                    };
                    self.publish_to(node, &envelope).await;
                }
            }
        }
    }

    /// Where something for `user` that starts on this node goes: to the
    /// user's home, or (when this node is the home) straight to the nodes
    /// registered with devices of the user.
    /// (Per message and user: nothing is allocated.)
    fn route_targets<'a>(&'a self, user: &'a str) -> impl Iterator<Item = (u16, Hop)> + 'a {
        let home = self.membership.home(user);
        let at_home = home == self.me;
        let to_home = (!at_home).then_some((home, Hop::ToHome));
        let forwards = self
            .forward_targets(user, self.me)
            .filter(move |_| at_home)
            .map(|node| (node, Hop::Forwarded));
        to_home.into_iter().chain(forwards)
    }

    /// The nodes a home forwards to for `user`: those registered with
    /// devices of the user, except `from` (its devices have it) and itself.
    fn forward_targets<'a>(&'a self, user: &str, from: u16) -> impl Iterator<Item = u16> + 'a {
        let me = self.me;
        self.exceptions
            .nodes_of(user)
            .iter()
            .copied()
            .filter(move |node| *node != from && *node != me)
    }

    /// Publishes again, ahead of what is held, what was published since
    /// `since` (unix ms): the server that took it may have died with it.
    fn republish_since(&mut self, since: u64) {
        let again: Vec<Outbound> = self
            .recent
            .drain(..)
            .filter(|(at, _)| *at >= since)
            .map(|(_, publish)| publish)
            .collect();
        self.stats()
            .republished
            .fetch_add(again.len() as u64, Relaxed);
        for publish in again.into_iter().rev() {
            self.held.push_front(publish);
        }
    }

    /// After an outage of this node's NATS, messages for users homed here
    /// went to a node nobody listened as: the nodes registered with devices
    /// of those users (the exceptions held here) resync them from `since`.
    async fn tell_registered_nodes_to_resync(&mut self, since: u64) {
        let since_unix_ms = since.saturating_sub(RESYNC_CLOCK_MARGIN_MS);
        let mut by_node: HashMap<u16, Vec<Box<str>>> = HashMap::new();
        for (user, node) in self.exceptions.iter() {
            by_node.entry(node).or_default().push(user.into());
        }
        for (node, mut users) in by_node {
            while !users.is_empty() {
                let rest = users.split_off(users.len().min(DELIVER_USERS_MAX));
                let envelope = Envelope::Resync {
                    users: std::mem::replace(&mut users, rest),
                    since_unix_ms,
                };
                self.publish_to(node, &envelope).await;
            }
        }
    }

    /// Keeps a copy of a publish for `republish_since` (the JSON is shared,
    /// not copied), forgetting what is older than the window.
    fn remember_publish(&mut self, users: Vec<Box<str>>, message_id: u64, json: Bytes) {
        let now = unix_ms();
        while self
            .recent
            .front()
            .is_some_and(|(at, _)| *at + REPUBLISH_WINDOW_MS < now)
            || self.recent.len() >= REPUBLISH_KEPT_MAX
        {
            self.recent.pop_front();
        }
        let publish = Outbound::Publish {
            users,
            message_id,
            json,
        };
        self.recent.push_back((now, publish));
    }

    /// Routes a message from this node's shards: each user's home gets it
    /// (one envelope per home), and for users homed here the registered
    /// nodes get it directly.
    async fn publish(&mut self, users: Vec<Box<str>>, message_id: u64, json: Bytes) {
        let mut batches: HashMap<(u16, bool), Vec<Box<str>>> = HashMap::new();
        for user in &users {
            for (node, hop) in self.route_targets(user) {
                let to_home = hop == Hop::ToHome;
                batches
                    .entry((node, to_home))
                    .or_default()
                    .push(user.clone());
            }
        }
        let forwarded = batches.keys().filter(|(_, to_home)| !to_home).count();
        self.stats().forwarded.fetch_add(forwarded as u64, Relaxed);
        self.publish_batches(batches, message_id, &json).await;
        self.remember_publish(users, message_id, json);
    }

    async fn on_node_message(&mut self, message: async_nats::Message) {
        self.stats().received.fetch_add(1, Relaxed);
        let envelope = match Envelope::decode(&message.payload) {
            Ok(envelope) => envelope,
            Err(error) => {
                self.stats().bad_envelopes.fetch_add(1, Relaxed);
                tracing::debug!(%error, "backplane: bad envelope");
                return;
            }
        };
        match envelope {
            Envelope::Deliver(deliver) => self.on_deliver(deliver).await,
            Envelope::Register { node, user } => {
                self.exceptions.register(&user, node);
                if let Some(reply) = message.reply {
                    let _ = self.client.publish(reply, Bytes::new()).await;
                }
                self.stats_update();
            }
            Envelope::Unregister { node, user } => {
                self.exceptions.unregister(&user, node);
                self.stats_update();
            }
            Envelope::Resync {
                users,
                since_unix_ms,
            } => {
                for user in users {
                    if self.local.contains_key(&user) {
                        self.resync_at_settle(user, since_unix_ms);
                    }
                }
            }
            Envelope::Revoke {
                origin_node,
                hop,
                user,
                device,
            } => {
                if hop == Hop::ToHome {
                    for node in self.forward_targets(&user, origin_node) {
                        let envelope = Envelope::Revoke {
                            origin_node: self.me,
                            hop: Hop::Forwarded,
                            user: user.clone(),
                            device: device.clone(),
                        };
                        self.publish_to(node, &envelope).await;
                    }
                }
                if self.local.contains_key(&user) {
                    let device = (!device.is_empty()).then_some(device);
                    let _ = self.queue_to_shards(Inbound::Revoked { user, device });
                }
            }
            Envelope::Heartbeat(_) => {
                self.stats().bad_envelopes.fetch_add(1, Relaxed);
            }
        }
    }

    /// A message for users with devices here, or homed here, or both.
    async fn on_deliver(&mut self, deliver: Deliver) {
        let Deliver {
            origin_node,
            hop,
            users,
            message_id,
            json,
        } = deliver;
        let mut forwards: HashMap<(u16, bool), Vec<Box<str>>> = HashMap::new();
        for user in users {
            if hop == Hop::ToHome {
                for node in self.forward_targets(&user, origin_node) {
                    forwards
                        .entry((node, false))
                        .or_default()
                        .push(user.clone());
                }
            }
            if self.local.contains_key(&user) {
                let inbound = Inbound::Deliver {
                    user,
                    message_id,
                    json: json.clone(),
                };
                // At once when nothing waits for a retry (so a user's
                // messages keep their order), else behind the retries.
                if self.retrying.load(Relaxed) == 0 && self.sink.deliver(&inbound) {
                    continue;
                }
                if let Err(inbound) = self.queue_to_shards(inbound) {
                    self.stats().inbound_dropped.fetch_add(1, Relaxed);
                    if let Inbound::Deliver {
                        user, message_id, ..
                    } = inbound
                    {
                        self.resync_later(user, message_id);
                    }
                }
            } else if hop == Hop::Forwarded {
                // (Not a drop: no device of the user is here.)
                // The home still thinks this node has devices of the user.
                let unregister = Envelope::Unregister {
                    node: self.me,
                    user,
                };
                self.publish_to(origin_node, &unregister).await;
            }
        }
        if !forwards.is_empty() {
            self.stats()
                .forwarded
                .fetch_add(forwards.len() as u64, Relaxed);
            self.publish_batches(forwards, message_id, &json).await;
        }
    }

    fn on_heartbeat(&mut self, payload: &[u8]) {
        match Envelope::decode(payload) {
            Ok(Envelope::Heartbeat(heartbeat)) => {
                let now = self.now_ms();
                self.membership.observe(heartbeat, now);
            }
            _ => {
                self.stats().bad_envelopes.fetch_add(1, Relaxed);
            }
        }
    }

    async fn heartbeat(&mut self) {
        let now = self.now_ms();
        if let Some(last) = self.last_heartbeat_ms {
            let timeout = self.backplane.config.liveness_timeout().as_millis() as u64;
            if now.saturating_sub(last) > timeout && self.stats().connected.load(Relaxed) {
                // This node was silent long enough for the others to drop
                // it (a stalled process): what they routed meanwhile went
                // elsewhere, and homes may have dropped its registrations.
                tracing::warn!(
                    silent_ms = now.saturating_sub(last),
                    "backplane: this node's heartbeats stalled; devices resync"
                );
                let silent_ms = now - last;
                self.after_an_outage(unix_ms().saturating_sub(silent_ms));
            }
        }
        self.last_heartbeat_ms = Some(now);
        if !self.stats().connected.load(Relaxed) {
            return;
        }
        let heartbeat = Envelope::Heartbeat(Heartbeat {
            node: self.me,
            incarnation: self.incarnation,
            serving: self.membership.serving(),
            url: self.backplane.config.public_url.as_str().into(),
        });
        let subject = nodes_subject(self.prefix());
        let _ = self
            .client
            .publish(subject, heartbeat.encode().into())
            .await;
    }

    /// A draining node leaves the membership at once (and says so).
    async fn check_serving(&mut self) {
        let serving = self.backplane.serving.load(Relaxed);
        if serving != self.membership.serving() {
            self.membership.set_serving(serving);
            tracing::info!("backplane: this node leaves the membership (draining)");
            self.heartbeat().await;
            self.rebuild().await;
        }
    }

    async fn housekeeping(&mut self) {
        self.check_serving().await;
        let now = self.now_ms();
        let interval = self.backplane.config.heartbeat_interval.as_millis() as u64;
        if self
            .last_heartbeat_ms
            .is_none_or(|last| now.saturating_sub(last) >= interval)
        {
            self.heartbeat().await;
        }
        self.membership.expire(now);
        if self.warm() {
            self.rebuild().await;
            let (urls, changed) = self.membership.urls();
            if changed {
                self.publish_homes(urls);
            }
        }
        if self.routable() {
            self.flush_held().await;
        }
        // The notify may have been missed.
        if self.backplane.queues.iter().any(|q| !q.is_empty()) {
            self.backplane.notify.notify_one();
        }
        for node in self.membership.gone_for(GONE_FORGET_MS, now) {
            self.exceptions.forget_node(node);
        }
        if self.sweep_at.is_some_and(|at| now >= at) {
            self.sweep_at = None;
            let membership = &self.membership;
            let me = self.me;
            self.exceptions
                .retain(|user, _| membership.home(user) == me);
        }
        if self.warm() {
            let retry: Vec<Box<str>> = self
                .unregistered
                .iter()
                .take(REGISTRATIONS_IN_FLIGHT_MAX.saturating_sub(self.in_flight))
                .cloned()
                .collect();
            for user in retry {
                self.register(&user);
            }
        }
        while let Some(entry) = self.resync_due.first_entry() {
            if *entry.key() > now {
                break;
            }
            for (user, since_unix_ms) in entry.remove() {
                if self.local.contains_key(&user) {
                    let moved = Inbound::Moved {
                        user,
                        since_unix_ms,
                    };
                    let _ = self.queue_to_shards(moved);
                }
            }
        }
        self.stats_update();
        // Once per tick, not per message: it walks every local user.
        let here = self
            .local
            .values()
            .filter(|local| local.registered != Some(self.me))
            .count();
        self.stats().exceptions_here.store(here as u64, Relaxed);
    }

    /// Rebuilds the home table if the membership changed, and moves what
    /// depended on the old one.
    async fn rebuild(&mut self) {
        let Some(Rebuilt {
            before,
            after,
            restarted,
        }) = self.membership.rebuild()
        else {
            return;
        };
        let (urls, _) = self.membership.urls();
        self.publish_homes(urls);
        let now = self.now_ms();
        let due = now + self.settle_ms();
        // A message could have gone to a stale home from a settle time
        // before now (the dead node's last heartbeat, plus skew).
        let since = unix_ms().saturating_sub(self.settle_ms() + RESYNC_CLOCK_MARGIN_MS);
        self.sweep_at = Some(due);
        tracing::info!(nodes = ?after.nodes(), "backplane: membership changed");
        let mut moved = Vec::new();
        for (user, local) in &mut self.local {
            let old = before.home(user);
            let new = after.home(user);
            if old == new && !restarted.contains(&new) {
                continue;
            }
            moved.push(user.clone());
            local.registered = (new == self.me).then_some(self.me);
        }
        self.stats()
            .homes_moved
            .fetch_add(moved.len() as u64, Relaxed);
        for user in &moved {
            if self.local[user].registered.is_none() {
                self.register(user);
            }
        }
        if !moved.is_empty() {
            let entry = self.resync_due.entry(due).or_default();
            entry.extend(moved.into_iter().map(|user| (user, since)));
        }
    }

    /// Queues `inbound` for `hand_to_shards` (which retries full shard
    /// queues); hands it back when that queue is full.
    fn queue_to_shards(&self, inbound: Inbound) -> Result<(), Inbound> {
        self.retrying.fetch_add(1, Relaxed);
        self.to_shards.try_send(inbound).map_err(|error| {
            self.retrying.fetch_sub(1, Relaxed);
            error.into_inner()
        })
    }

    /// Resyncs `user` from `message_id`'s time, a settle time from now (a
    /// message for it could not be handed to its shard).
    fn resync_later(&mut self, user: Box<str>, message_id: u64) {
        if let Some(since) = resync_since(message_id) {
            self.resync_at_settle(user, since);
        }
    }

    /// Resyncs `user`'s devices here from `since` (unix ms), once every
    /// node has had a settle time to see what this node sees now.
    fn resync_at_settle(&mut self, user: Box<str>, since: u64) {
        let due = self.now_ms() + self.settle_ms();
        self.resync_due.entry(due).or_default().push((user, since));
    }

    /// Hands the shards a new snapshot of the homes and URLs.
    fn publish_homes(&self, urls: HashMap<u16, Arc<str>>) {
        self.backplane.homes.store(Arc::new(Homes {
            me: self.me,
            table: self.membership.table().clone(),
            urls,
        }));
    }

    /// A device of `user` is here now.
    fn interest_on(&mut self, user: Box<str>) {
        if let Some(local) = self.local.get_mut(&user) {
            if local.registered.is_some() {
                let _ = self.sink.deliver(&Inbound::InterestActive { user });
            } else {
                local.owed_active = true;
            }
            return;
        }
        self.local.insert(
            user.clone(),
            Local {
                owed_active: true,
                ..Local::default()
            },
        );
        self.register(&user);
    }

    /// The last device of `user` here is gone.
    async fn interest_off(&mut self, user: &str) {
        self.unregistered.remove(user);
        let Some(local) = self.local.remove(user) else {
            return;
        };
        if let Some(home) = local.registered.filter(|home| *home != self.me) {
            let unregister = Envelope::Unregister {
                node: self.me,
                user: user.into(),
            };
            self.publish_to(home, &unregister).await;
        }
    }

    /// Makes sure `user`'s home forwards to this node: nothing to do when
    /// this node is the home, else a request to it (answered once it will).
    fn register(&mut self, user: &str) {
        let home = self.membership.home(user);
        let connected = self.stats().connected.load(Relaxed);
        let warm = self.warm();
        let can_ask = self.in_flight < REGISTRATIONS_IN_FLIGHT_MAX;
        let Some(local) = self.local.get_mut(user) else {
            self.unregistered.remove(user);
            return;
        };
        if !connected {
            // Nothing is routed now; the device syncs at once, and again
            // from now once this node is back and the home knows it.
            if std::mem::take(&mut local.owed_active) {
                let _ = self
                    .sink
                    .deliver(&Inbound::InterestActive { user: user.into() });
            }
            local
                .missed_since
                .get_or_insert_with(|| unix_ms().saturating_sub(RESYNC_CLOCK_MARGIN_MS));
            self.unregistered.insert(user.into());
            return;
        }
        if !warm {
            // The membership is not known yet: the connect-time sync waits
            // (at most until warm, 1.5 heartbeat intervals).
            self.unregistered.insert(user.into());
            return;
        }
        if home == self.me {
            local.registered = Some(home);
            self.unregistered.remove(user);
            if std::mem::take(&mut local.owed_active) {
                let _ = self
                    .sink
                    .deliver(&Inbound::InterestActive { user: user.into() });
            }
            if let Some(since_unix_ms) = local.missed_since.take() {
                let moved = Inbound::Moved {
                    user: user.into(),
                    since_unix_ms,
                };
                let _ = self.queue_to_shards(moved);
            }
            return;
        }
        if local.in_flight.is_some() {
            // Its answer comes back to `on_registered`, which checks the home.
            return;
        }
        if !can_ask {
            self.unregistered.insert(user.into());
            return;
        }
        self.unregistered.remove(user);
        local.in_flight = Some(home);
        self.in_flight += 1;
        let client = self.client.clone();
        let subject = node_subject(self.prefix(), home);
        let payload: Bytes = Envelope::Register {
            node: self.me,
            user: user.into(),
        }
        .encode()
        .into();
        let answers = self.registered_tx.clone();
        let user: Box<str> = user.into();
        tokio::spawn(async move {
            let answer = tokio::time::timeout(REGISTER_TIMEOUT, client.request(subject, payload));
            let ok = matches!(answer.await, Ok(Ok(_)));
            let _ = answers.send(Registered { user, home, ok }).await;
        });
    }

    async fn on_registered(&mut self, registered: Registered) {
        let Registered { user, home, ok } = registered;
        self.in_flight = self.in_flight.saturating_sub(1);
        let current_home = self.membership.home(&user);
        let Some(local) = self.local.get_mut(&user) else {
            if ok {
                // The user left while the registration was on its way.
                let unregister = Envelope::Unregister {
                    node: self.me,
                    user,
                };
                self.publish_to(home, &unregister).await;
            }
            return;
        };
        local.in_flight = None;
        if !ok {
            self.backplane
                .stats
                .registrations_failed
                .fetch_add(1, Relaxed);
            let since = unix_ms()
                .saturating_sub(REGISTER_TIMEOUT.as_millis() as u64 + RESYNC_CLOCK_MARGIN_MS);
            local.missed_since.get_or_insert(since);
            // The connect-time sync must not wait forever: it runs, and
            // the user resyncs once a registration succeeds.
            if std::mem::take(&mut local.owed_active) {
                let _ = self
                    .sink
                    .deliver(&Inbound::InterestActive { user: user.clone() });
            }
            self.unregistered.insert(user);
            return;
        }
        if home != current_home {
            // The home moved while the request was on its way.
            self.register(&user);
            return;
        }
        local.registered = Some(home);
        if std::mem::take(&mut local.owed_active) {
            let _ = self
                .sink
                .deliver(&Inbound::InterestActive { user: user.clone() });
        }
        if let Some(since_unix_ms) = local.missed_since.take() {
            let _ = self.queue_to_shards(Inbound::Moved {
                user,
                since_unix_ms,
            });
        }
    }

    /// After NATS was away (or this node was silent too long): register
    /// every exception again and resync every device.
    /// `since_unix_ms`: when messages could first have gone astray.
    fn after_an_outage(&mut self, since_unix_ms: u64) {
        let since_unix_ms = since_unix_ms.saturating_sub(RESYNC_CLOCK_MARGIN_MS);
        for (user, local) in &mut self.local {
            if local.registered != Some(self.me) {
                local.registered = None;
                // Resynced again once registered: messages may go astray
                // until the home knows this node again.
                local.missed_since = Some(since_unix_ms);
                if local.in_flight.is_none() {
                    self.unregistered.insert(user.clone());
                }
            }
        }
        let client = self.client.clone();
        let sink = self.sink.clone();
        let settle = Duration::from_millis(self.settle_ms());
        tokio::spawn(async move {
            // The server has this node's subscriptions once a round trip
            // after the reconnect; then every shard resyncs its devices.
            let _ = tokio::time::timeout(SUBSCRIBE_CONFIRM, client.flush()).await;
            let reconnected = unix_ms();
            while !sink.deliver(&Inbound::Reconnected { since_unix_ms }) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            // In a cluster the other servers learn of the subscriptions a
            // route hop later, and drop what they get for this node until
            // then (found by `bench chaos`: 37 messages after a server of
            // three was killed). Once that has surely settled, resync what
            // was made since the reconnect.
            tokio::time::sleep(settle).await;
            let since_unix_ms = reconnected.saturating_sub(RESYNC_CLOCK_MARGIN_MS);
            while !sink.deliver(&Inbound::Reconnected { since_unix_ms }) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
    }

    fn stats_update(&self) {
        let stats = self.stats();
        stats
            .nodes_live
            .store(self.membership.table().nodes().len() as u64, Relaxed);
        stats
            .exceptions_held
            .store(self.exceptions.entries() as u64, Relaxed);
    }
}

/// Hands messages to the shards, retrying a full shard queue briefly (off
/// the routing loop, so one full shard never stalls routing). A durable
/// message that cannot be handed over is resynced later: the device may
/// acknowledge a later one first, which would hide the gap from its cursor.
async fn hand_to_shards(
    backplane: Arc<Backplane>,
    sink: Arc<dyn Sink>,
    mut from_router: mpsc::Receiver<Inbound>,
    dropped: mpsc::Sender<(Box<str>, u64)>,
    retrying: Arc<AtomicUsize>,
) {
    while let Some(inbound) = from_router.recv().await {
        let mut tries = 0;
        while !sink.deliver(&inbound) {
            tries += 1;
            if tries > INBOUND_RETRIES {
                backplane.stats.inbound_dropped.fetch_add(1, Relaxed);
                if let Inbound::Deliver {
                    user, message_id, ..
                } = inbound
                {
                    resync_after_a_drop(&dropped, user, message_id);
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        retrying.fetch_sub(1, Relaxed);
    }
}

/// Asks the routing loop to resync `user` from `message_id`'s time.
fn resync_after_a_drop(dropped: &mpsc::Sender<(Box<str>, u64)>, user: Box<str>, message_id: u64) {
    if let Some(since) = resync_since(message_id) {
        // A full channel means many resyncs are queued already.
        let _ = dropped.try_send((user, since));
    }
}

/// Where a resync for a lost `message_id` starts (unix ms); `None` for an
/// ephemeral one (never stored, nothing to resync).
fn resync_since(message_id: u64) -> Option<u64> {
    use chat_protocol::snowflake;
    (message_id != snowflake::EPHEMERAL_ID).then(|| {
        snowflake::decode(message_id)
            .unix_ms
            .saturating_sub(RESYNC_CLOCK_MARGIN_MS)
    })
}

/// Hands every membership change another node announces to the gateway.
async fn forward_group_changes(
    backplane: Arc<Backplane>,
    client: async_nats::Client,
    sink: Arc<dyn Sink>,
) {
    let subject = groups_subject(&backplane.config.subject_prefix);
    let mut subscriber = match client.subscribe(subject).await {
        Ok(subscriber) => subscriber,
        Err(error) => {
            tracing::warn!(%error, "backplane: no group-change subscription; caches expire instead");
            return;
        }
    };
    while let Some(message) = subscriber.next().await {
        backplane.stats.received.fetch_add(1, Relaxed);
        let Ok(group) = std::str::from_utf8(&message.payload) else {
            backplane.stats.bad_envelopes.fetch_add(1, Relaxed);
            continue;
        };
        // Best effort: a shard that misses it trusts its cache until it expires.
        let _ = sink.deliver(&Inbound::GroupChanged {
            group: group.into(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_per_node_and_fleet_wide_never_per_user() {
        assert_eq!(node_subject("chat", 4095), "chat.n.4095");
        assert_eq!(nodes_subject("chat"), "chat.nodes");
        assert_eq!(groups_subject("fleet.a"), "fleet.a.groups");
    }

    #[test]
    fn settle_time_covers_a_timeout_and_the_skew_between_nodes() {
        let config = BackplaneConfig {
            url: String::new(),
            node_id: 1,
            shards: 1,
            queue_capacity: 16,
            subject_prefix: "chat".into(),
            heartbeat_interval: Duration::from_millis(1_000),
            public_url: String::new(),
        };
        assert_eq!(config.liveness_timeout(), Duration::from_millis(3_000));
        assert_eq!(config.settle_time(), Duration::from_millis(4_000));
    }

    #[test]
    fn reconnect_delays_grow_with_jitter_and_stay_bounded() {
        for attempts in 0..40 {
            let delay = reconnect_delay(attempts);
            assert!(delay >= Duration::from_millis(RECONNECT_BACKOFF_MIN_MS / 2));
            assert!(delay <= Duration::from_millis(RECONNECT_BACKOFF_MAX_MS * 3 / 2));
        }
    }
}
