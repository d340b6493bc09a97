//! Node-id leases: each node of a fleet takes its node id (part of every
//! message id) from NATS, so no operator assigns 4,096 ids by hand and no
//! two live nodes ever share one.
//!
//! Owns acquiring an id from a JetStream key-value bucket (`create` succeeds
//! only for a key nobody holds), refreshing it at a third of its TTL with a
//! revision-checked `update` (so a node whose key was taken over learns it),
//! deleting it on a clean stop, and `LeaseValidity`, which the shards read
//! before they make a message id. The bucket's `max_age` is the TTL: a node
//! killed with `kill -9` loses its id a TTL later. A lease counts as valid
//! only until two thirds of a TTL after its last refresh was *sent*, so it
//! stops being used before the server could expire it and hand it to
//! another node. Runs on its own thread and NATS connection; never blocks a
//! shard (they read one atomic).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv::{self, CreateErrorKind, UpdateErrorKind};
use tokio::sync::oneshot;

/// How to lease a node id.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub url: String,
    /// The fleet's subject prefix: the bucket is `<prefix>_node_ids` (dots
    /// become underscores), so fleets sharing a NATS do not share ids.
    pub subject_prefix: String,
    /// How long an id outlives its node's last refresh.
    pub ttl: Duration,
    /// Ids `0..ids` may be leased (4,096: the snowflake's node bits).
    pub ids: u16,
    /// How long `acquire` may take before start-up fails.
    pub acquire_timeout: Duration,
    /// Copies of the bucket a JetStream cluster keeps (1 on a single
    /// server; 3 on a three-server cluster, so losing one keeps the ids).
    pub replicas: usize,
}

/// Whether this node may make message ids with its leased node id now.
#[derive(Debug)]
pub struct LeaseValidity {
    origin: Instant,
    /// Milliseconds after `origin` until which the lease is certainly ours.
    valid_until_ms: AtomicU64,
    /// Another node holds our key now: never valid again in this process.
    lost: AtomicBool,
}

impl LeaseValidity {
    fn new(origin: Instant) -> Self {
        Self {
            origin,
            valid_until_ms: AtomicU64::new(0),
            lost: AtomicBool::new(false),
        }
    }

    pub fn is_valid(&self) -> bool {
        !self.lost.load(Relaxed)
            && (self.origin.elapsed().as_millis() as u64) < self.valid_until_ms.load(Relaxed)
    }

    /// A refresh sent at `sent` was accepted: valid for two thirds of `ttl` from then.
    fn refreshed(&self, sent: Instant, ttl: Duration) {
        let until = sent.duration_since(self.origin) + ttl * 2 / 3;
        self.valid_until_ms
            .fetch_max(until.as_millis() as u64, Relaxed);
    }
}

/// A held node id: refreshed in the background until `release`.
pub struct NodeIdLease {
    pub node_id: u16,
    validity: Arc<LeaseValidity>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("cannot reach NATS at {url} to lease a node id: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("NATS has no JetStream (start nats-server with -js): {0}")]
    NoJetStream(String),
    #[error("all {0} node ids are leased by live nodes")]
    Exhausted(u16),
    #[error("no node id leased within {0:?}")]
    TimedOut(Duration),
}

impl NodeIdLease {
    /// Leases a free node id, or fails within `acquire_timeout`. Blocks the
    /// caller (start-up, before any shard runs).
    pub fn acquire(config: LeaseConfig) -> Result<NodeIdLease, LeaseError> {
        let origin = Instant::now();
        let validity = Arc::new(LeaseValidity::new(origin));
        let (acquired_tx, acquired_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel();
        let thread_validity = validity.clone();
        let timeout = config.acquire_timeout;
        let thread = crate::runtime::runtime_thread("node-id-lease", async move {
            hold(config, thread_validity, acquired_tx, stop_rx).await
        })
        .map_err(|error| LeaseError::Unreachable {
            url: String::new(),
            reason: error.to_string(),
        })?;
        let node_id = match acquired_rx.recv_timeout(timeout + Duration::from_secs(1)) {
            Ok(result) => result?,
            Err(_) => return Err(LeaseError::TimedOut(timeout)),
        };
        Ok(NodeIdLease {
            node_id,
            validity,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// What the shards read before making a message id.
    pub fn validity(&self) -> Arc<LeaseValidity> {
        self.validity.clone()
    }

    /// Gives the id back (deletes the key) and stops refreshing. Bounded.
    pub fn release(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for NodeIdLease {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// The bucket of a fleet's node ids.
pub fn bucket_name(subject_prefix: &str) -> String {
    let prefix: String = subject_prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{prefix}_node_ids")
}

async fn hold(
    config: LeaseConfig,
    validity: Arc<LeaseValidity>,
    acquired: std::sync::mpsc::Sender<Result<u16, LeaseError>>,
    mut stop: oneshot::Receiver<()>,
) {
    let started = tokio::time::timeout(config.acquire_timeout, take(&config, &validity)).await;
    let (store, key, mut revision) = match started {
        Ok(Ok(held)) => held,
        Ok(Err(error)) => {
            let _ = acquired.send(Err(error));
            return;
        }
        Err(_) => {
            let _ = acquired.send(Err(LeaseError::TimedOut(config.acquire_timeout)));
            return;
        }
    };
    let node_id: u16 = key.parse().expect("keys are node ids");
    let _ = acquired.send(Ok(node_id));
    let token = instance_token();
    let period = config.ttl / 3;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(period) => {}
        }
        let sent = Instant::now();
        let refresh =
            tokio::time::timeout(period, store.update(&key, token.clone().into(), revision)).await;
        match refresh {
            Ok(Ok(next)) => {
                revision = next;
                validity.refreshed(sent, config.ttl);
            }
            Ok(Err(error)) if error.kind() == UpdateErrorKind::WrongLastRevision => {
                // Expired and perhaps taken by another node: make no more ids
                // with it. If it is free again, it is ours again.
                if !validity.lost.swap(true, Relaxed) {
                    tracing::error!(
                        node_id,
                        "node id lease lost: this node refuses sends until it holds an id again"
                    );
                }
                if let Ok(Ok(next)) =
                    tokio::time::timeout(period, store.create(&key, token.clone().into())).await
                {
                    revision = next;
                    validity.lost.store(false, Relaxed);
                    validity.refreshed(sent, config.ttl);
                    tracing::info!(node_id, "node id lease taken again");
                }
            }
            Ok(Err(error)) => {
                tracing::warn!(node_id, %error, "node id lease not refreshed; retrying")
            }
            Err(_) => tracing::warn!(node_id, "node id lease refresh timed out; retrying"),
        }
    }
    // A clean stop: the id is free for the next node at once.
    let _ = tokio::time::timeout(Duration::from_secs(2), store.delete(&key)).await;
    tracing::info!(node_id, "node id lease released");
}

/// Connects, opens (or creates) the bucket, and creates the first free key.
async fn take(
    config: &LeaseConfig,
    validity: &LeaseValidity,
) -> Result<(kv::Store, String, u64), LeaseError> {
    let unreachable = |reason: String| LeaseError::Unreachable {
        url: config.url.clone(),
        reason,
    };
    let servers = crate::servers::server_addrs(&config.url).map_err(&unreachable)?;
    let client = async_nats::ConnectOptions::new()
        .name("chat-gateway-node-id-lease")
        .retry_on_initial_connect()
        .connect(servers.as_slice())
        .await
        .map_err(|error| unreachable(error.to_string()))?;
    let jetstream = async_nats::jetstream::new(client);
    let bucket = bucket_name(&config.subject_prefix);
    let store = match jetstream.get_key_value(bucket.as_str()).await {
        Ok(store) => store,
        Err(_) => jetstream
            .create_key_value(kv::Config {
                bucket: bucket.clone(),
                description: "node ids of a chat gateway fleet, leased".into(),
                history: 1,
                max_age: config.ttl,
                num_replicas: config.replicas,
                ..Default::default()
            })
            .await
            .map_err(|error| LeaseError::NoJetStream(error.to_string()))?,
    };
    let token = instance_token();
    // Start anywhere: nodes starting together rarely try the same id first.
    let start = fastrand::u16(0..config.ids);
    for offset in 0..config.ids {
        let id = (start + offset) % config.ids;
        let key = id.to_string();
        let sent = Instant::now();
        match store.create(&key, token.clone().into()).await {
            Ok(revision) => {
                validity.refreshed(sent, config.ttl);
                return Ok((store, key, revision));
            }
            Err(error) if error.kind() == CreateErrorKind::AlreadyExists => continue,
            Err(error) => return Err(unreachable(error.to_string())),
        }
    }
    Err(LeaseError::Exhausted(config.ids))
}

/// Who holds a key, for an operator reading the bucket: host and pid.
fn instance_token() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{} pid {}", host.trim(), std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_valid_for_two_thirds_of_its_ttl_after_the_refresh_was_sent() {
        let origin = Instant::now();
        let validity = LeaseValidity::new(origin);
        assert!(!validity.is_valid(), "not valid before the first create");
        validity.refreshed(Instant::now(), Duration::from_secs(30));
        assert!(validity.is_valid());
        validity.lost.store(true, Relaxed);
        assert!(!validity.is_valid(), "a lost lease is never valid");
        let stale = LeaseValidity::new(origin);
        stale.refreshed(origin, Duration::from_millis(3));
        std::thread::sleep(Duration::from_millis(5));
        assert!(
            !stale.is_valid(),
            "expired two thirds of a ttl after the refresh"
        );
    }

    #[test]
    fn bucket_names_follow_the_fleet_prefix() {
        assert_eq!(bucket_name("chat"), "chat_node_ids");
        assert_eq!(bucket_name("eu.chat"), "eu_chat_node_ids");
    }
}
