//! The bridge thread: the NATS connection, subscriptions, publishing, events.
//!
//! Owns the per-shard outbound queues (shards push, the bridge thread pops),
//! one forwarding task per subscribed user (NATS → the `Sink`, which queues to
//! that user's home shard), reconnection with back-off and jitter (async-nats
//! re-subscribes; we then tell every shard to resync its devices), and the
//! counters behind the gateway's `gateway_backplane_*` metrics.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use crossbeam_queue::ArrayQueue;
use futures_util::StreamExt;
use tokio::sync::Notify;

use crate::envelope::Deliver;

/// Outbound items taken per shard per turn (fairness between shards).
const TURN_BUDGET: usize = 256;
/// How long a subscription may take to be confirmed before the shard is told anyway.
const SUBSCRIBE_CONFIRM: Duration = Duration::from_secs(2);
/// Retries of a full shard queue before an inbound message is dropped.
const INBOUND_RETRIES: u32 = 50;
const RECONNECT_BACKOFF_MIN_MS: u64 = 100;
const RECONNECT_BACKOFF_MAX_MS: u64 = 5_000;

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
}

/// What a shard asks of the bridge.
#[derive(Debug)]
pub enum Outbound {
    /// The node now has (`active`) or no longer has a device of `user`.
    Interest { user: Box<str>, active: bool },
    /// A durable message for the devices of `users` on other nodes (the
    /// recipient, and the sender's user for the sender's other devices).
    Publish {
        users: Vec<Box<str>>,
        message_id: u64,
        json: Bytes,
    },
    /// A group's membership changed (and is durable): every node forgets
    /// its cached member list.
    GroupChanged { group: Box<str> },
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
    /// The subscription for `user` is in place: its devices may sync now.
    InterestActive { user: Box<str> },
    /// The backplane was away and is back: devices may have missed messages.
    Reconnected,
    /// Another node changed this group's membership.
    GroupChanged { group: Box<str> },
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
    /// Inbound messages dropped because a shard queue stayed full.
    pub inbound_dropped: AtomicU64,
    pub subscriptions: AtomicU64,
    pub reconnects: AtomicU64,
    pub bad_envelopes: AtomicU64,
}

pub struct Backplane {
    config: BackplaneConfig,
    queues: Vec<ArrayQueue<Outbound>>,
    notify: Notify,
    pub stats: BackplaneStats,
}

impl Backplane {
    /// Starts the bridge thread; it connects (and keeps reconnecting) in the background.
    pub fn start(config: BackplaneConfig, sink: Arc<dyn Sink>) -> anyhow::Result<Arc<Self>> {
        anyhow::ensure!(config.shards > 0 && config.queue_capacity > 0);
        let backplane = Arc::new(Self {
            queues: (0..config.shards)
                .map(|_| ArrayQueue::new(config.queue_capacity))
                .collect(),
            config,
            notify: Notify::new(),
            stats: BackplaneStats::default(),
        });
        let thread = backplane.clone();
        crate::runtime_thread("backplane", async move { run(thread, sink).await })?;
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

    fn subject(&self, user: &str) -> String {
        subject(&self.config.subject_prefix, user)
    }
}

/// The subject of `user`'s devices. Ids may contain `.`, NATS's token
/// separator, so those ids are hex-encoded under another token (`x`), which
/// keeps every user's subject distinct and valid.
pub fn subject(prefix: &str, user: &str) -> String {
    if user.contains('.') {
        let hex: String = user.bytes().map(|b| format!("{b:02x}")).collect();
        format!("{prefix}.x.{hex}")
    } else {
        format!("{prefix}.u.{user}")
    }
}

/// Exponential back-off with ±50% jitter, so a fleet does not reconnect in step.
fn reconnect_delay(attempts: usize) -> Duration {
    let exponent = attempts.min(16) as u32;
    let base = RECONNECT_BACKOFF_MIN_MS
        .saturating_mul(1u64 << exponent)
        .min(RECONNECT_BACKOFF_MAX_MS);
    Duration::from_millis(base / 2 + fastrand::u64(0..=base))
}

async fn run(backplane: Arc<Backplane>, sink: Arc<dyn Sink>) {
    let (events_tx, mut events) = tokio::sync::mpsc::channel(64);
    let options = async_nats::ConnectOptions::new()
        .name(format!("chat-gateway-node-{}", backplane.config.node_id))
        // A node never hears its own publishes: its devices got them locally.
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
    let client = match options.connect(backplane.config.url.as_str()).await {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(url = %backplane.config.url, %error, "backplane: bad NATS address; cross-node delivery is off");
            return;
        }
    };
    let mut subscriptions: HashMap<Box<str>, tokio::task::JoinHandle<()>> = HashMap::new();
    tokio::spawn(forward_group_changes(
        backplane.clone(),
        client.clone(),
        sink.clone(),
    ));
    let mut ever_connected = false;
    loop {
        tokio::select! {
            _ = backplane.notify.notified() => {
                drain_outbound(&backplane, &client, &sink, &mut subscriptions).await;
            }
            Some(event) = events.recv() => match event {
                async_nats::Event::Connected => {
                    backplane.stats.connected.store(true, Relaxed);
                    if ever_connected {
                        backplane.stats.reconnects.fetch_add(1, Relaxed);
                        tracing::info!("backplane reconnected; devices resync");
                        // async-nats has re-subscribed; once the server has
                        // them, every shard resyncs its devices.
                        let client = client.clone();
                        let sink = sink.clone();
                        tokio::spawn(async move {
                            let _ = tokio::time::timeout(SUBSCRIBE_CONFIRM, client.flush()).await;
                            while !sink.deliver(&Inbound::Reconnected) {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                        });
                    } else {
                        tracing::info!(url = %backplane.config.url, "backplane connected");
                    }
                    ever_connected = true;
                }
                async_nats::Event::Disconnected => {
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

async fn drain_outbound(
    backplane: &Arc<Backplane>,
    client: &async_nats::Client,
    sink: &Arc<dyn Sink>,
    subscriptions: &mut HashMap<Box<str>, tokio::task::JoinHandle<()>>,
) {
    for queue in &backplane.queues {
        for _ in 0..TURN_BUDGET {
            let Some(item) = queue.pop() else {
                break;
            };
            match item {
                Outbound::Publish {
                    users,
                    message_id,
                    json,
                } => {
                    if !backplane.stats.connected.load(Relaxed) {
                        backplane.stats.publish_dropped.fetch_add(1, Relaxed);
                        continue;
                    }
                    for user in users {
                        let envelope = Deliver {
                            origin_node: backplane.config.node_id,
                            user,
                            message_id,
                            json: json.clone(),
                        };
                        let subject = backplane.subject(&envelope.user);
                        match client.publish(subject, envelope.encode().into()).await {
                            Ok(()) => {
                                backplane.stats.published.fetch_add(1, Relaxed);
                            }
                            Err(_) => {
                                backplane.stats.publish_dropped.fetch_add(1, Relaxed);
                            }
                        }
                    }
                }
                Outbound::GroupChanged { group } => {
                    if !backplane.stats.connected.load(Relaxed) {
                        // Other nodes' caches expire (`group_cache_ms`).
                        backplane.stats.publish_dropped.fetch_add(1, Relaxed);
                        continue;
                    }
                    let subject = groups_subject(&backplane.config.subject_prefix);
                    let payload = Bytes::copy_from_slice(group.as_bytes());
                    match client.publish(subject, payload).await {
                        Ok(()) => backplane.stats.published.fetch_add(1, Relaxed),
                        Err(_) => backplane.stats.publish_dropped.fetch_add(1, Relaxed),
                    };
                }
                Outbound::Interest { user, active: true } => {
                    if subscriptions.contains_key(&user) {
                        let _ = sink.deliver(&Inbound::InterestActive { user });
                        continue;
                    }
                    let task = tokio::spawn(forward(
                        backplane.clone(),
                        client.clone(),
                        sink.clone(),
                        user.clone(),
                    ));
                    subscriptions.insert(user, task);
                    backplane
                        .stats
                        .subscriptions
                        .store(subscriptions.len() as u64, Relaxed);
                }
                Outbound::Interest {
                    user,
                    active: false,
                } => {
                    // Dropping the subscriber unsubscribes.
                    if let Some(task) = subscriptions.remove(&user) {
                        task.abort();
                    }
                    backplane
                        .stats
                        .subscriptions
                        .store(subscriptions.len() as u64, Relaxed);
                }
            }
        }
    }
}

/// The fleet-wide subject of membership changes (rare next to messages:
/// one small publish per change, heard by every node).
pub fn groups_subject(prefix: &str) -> String {
    format!("{prefix}.groups")
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

/// Subscribes to `user`'s subject, says when it is in place, then forwards
/// every envelope to the user's home shard until aborted.
async fn forward(
    backplane: Arc<Backplane>,
    client: async_nats::Client,
    sink: Arc<dyn Sink>,
    user: Box<str>,
) {
    let subscriber = client.subscribe(backplane.subject(&user)).await;
    // The server has the subscription once a round trip after it completes.
    let _ = tokio::time::timeout(SUBSCRIBE_CONFIRM, client.flush()).await;
    let _ = sink.deliver(&Inbound::InterestActive { user: user.clone() });
    let mut subscriber = match subscriber {
        Ok(subscriber) => subscriber,
        Err(error) => {
            tracing::warn!(%user, %error, "backplane: could not subscribe");
            return;
        }
    };
    while let Some(message) = subscriber.next().await {
        backplane.stats.received.fetch_add(1, Relaxed);
        let Ok(deliver) = Deliver::decode(&message.payload) else {
            backplane.stats.bad_envelopes.fetch_add(1, Relaxed);
            continue;
        };
        let inbound = Inbound::Deliver {
            user: deliver.user,
            message_id: deliver.message_id,
            json: deliver.json,
        };
        let mut tries = 0;
        while !sink.deliver(&inbound) {
            tries += 1;
            if tries > INBOUND_RETRIES {
                // Durable: the device gets it on its next sync.
                backplane.stats.inbound_dropped.fetch_add(1, Relaxed);
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_distinct_and_have_no_empty_tokens() {
        assert_eq!(subject("chat", "bob"), "chat.u.bob");
        assert_eq!(subject("chat", "a.b"), "chat.x.612e62");
        assert_ne!(subject("chat", "a.b"), subject("chat", "a_b"));
        assert_eq!(subject("chat", ".a."), "chat.x.2e612e");
        for user in ["bob", "a.b", ".a.", "x-1_2"] {
            assert!(subject("chat", user).split('.').all(|t| !t.is_empty()));
        }
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
