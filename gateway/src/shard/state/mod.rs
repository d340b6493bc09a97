//! The shard's state: everything one shard thread owns, and the few
//! operations on it that every layer above needs.
//!
//! Owns `Shard` (the user table, the connections, the id generator, the
//! idempotency table, the ring, the read-path client, the caches of groups,
//! receipts and presence) and registering a connection in it, publishing
//! to the backplane, and the backplane interest a connect-time sync waits
//! for. Everything here is touched only by this shard's thread (`Rc`,
//! `RefCell`, never `Arc<Mutex>`); no `RefCell` borrow is held across an
//! `.await`. Imports no layer above it: features, the pipeline and the
//! socket task import this.

pub mod conn;
pub mod durable;
pub mod group_cache;
pub mod idempotency;
pub mod presence_log;
pub mod receipt_batch;
pub mod signal;
pub mod store_client;
pub mod token_bucket;
pub mod users;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backplane_bridge::{Backplane, Outbound};
use bytes::Bytes;
use chat_protocol::snowflake::SnowflakeGenerator;
use chat_protocol::token::TokenVerifier;
use slab::Slab;

use self::conn::Conn;
use self::durable::Durability;
use self::group_cache::GroupCache;
use self::idempotency::IdempotencyTable;
use self::presence_log::PresenceLog;
use self::receipt_batch::ReceiptBatcher;
use self::signal::{LocalSignal, Waiters, Wakeup};
use self::store_client::{ReadPathOwner, StoreClient};
use self::token_bucket::Limit;
use self::users::UserTable;
use crate::config::Config;
use crate::mesh::Mesh;
use crate::metrics::{bump, NodeState, ShardMetrics};

/// The shard's state, shared by its tasks on its one thread. Every field is
/// this shard's alone; other shards reach it only through `mesh`.
pub struct Shard {
    pub id: usize,
    pub config: Arc<Config>,
    /// Node-wide counters and the connection budget (atomics, shared).
    pub node: Arc<NodeState>,
    /// The bounded queues between shards.
    pub mesh: Arc<Mesh>,
    pub verifier: TokenVerifier,
    /// The pages the listener serves besides `/ws`.
    pub web: Arc<crate::web::WebClient>,
    /// The listener's TLS configuration (`wss://`); `None` for plain `ws://`.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Users homed here, with their live devices and allowances.
    pub users: RefCell<UserTable>,
    /// Every registered connection, for heartbeat sweeps and draining.
    pub conns: RefCell<Slab<Rc<Conn>>>,
    pub snowflake: RefCell<SnowflakeGenerator>,
    /// What each recent send was answered with, by (user, device, client id).
    pub idempotency: RefCell<IdempotencyTable>,
    /// The read buffer all connections share; taken and put back around each read.
    pub scratch: RefCell<Vec<u8>>,
    /// `{"type":"pong"}`, encoded once.
    pub pong_frame: Bytes,
    pub draining: Cell<bool>,
    /// Fired when draining starts (stops the accept loop).
    pub drain_started: LocalSignal,
    /// Fired when the shard has closed everything and may exit.
    pub finished: LocalSignal,
    /// Origin of the shard's monotonic clock (liveness, allowances).
    pub started: Instant,
    /// This shard's ring and the `sent` frames waiting for durability.
    pub durability: Durability,
    /// The read path to the storage-writer.
    pub store: StoreClient,
    /// The NATS bridge, when this node is part of a fleet.
    pub backplane: Option<Arc<Backplane>>,
    /// Users for whom the backplane is not routing to this node yet (their
    /// home has not confirmed it), with the connections waiting for it
    /// before their connect-time sync.
    pub interest_pending: RefCell<HashMap<Rc<str>, Rc<Waiters>>>,
    /// Group member lists loaded from storage.
    pub groups: RefCell<GroupCache>,
    /// Receipts waiting for the end of their batching window.
    pub receipts: RefCell<ReceiptBatcher>,
    /// What was written about who is online.
    pub presence: RefCell<PresenceLog>,
    /// Fired when held records (group changes) became durable or were
    /// refused: the release task delivers them or tells their senders.
    pub held_released: Wakeup,
}

impl Shard {
    pub fn metrics(&self) -> &ShardMetrics {
        &self.node.shards[self.id]
    }

    /// The per-connection text frame rate limit.
    pub fn frames_limit(&self) -> Limit {
        Limit {
            per_s: self.config.frames_per_s,
            burst: self.config.frames_burst,
        }
    }

    /// Milliseconds on this shard's monotonic clock (liveness, allowances;
    /// never a timestamp: those are `crate::clock::unix_ms`).
    pub fn monotonic_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// How long any one read-path request may take (`storage_timeout_ms`).
    /// Whether nothing has become durable for longer than
    /// `storage_stall_ms_max` while a `sent` waits.
    pub fn storage_stalled(&self) -> bool {
        let bound = self.config.storage_stall_ms_max;
        bound > 0
            && self
                .durability
                .stalled_for()
                .is_some_and(|stalled| stalled > Duration::from_millis(bound))
    }

    pub fn storage_timeout(&self) -> Duration {
        Duration::from_millis(self.config.storage_timeout_ms)
    }

    /// Makes `conn` reachable: every message for its user from now on is
    /// queued or held for it. The user's first device here subscribes the
    /// node to the user on the backplane and is noted for presence.
    pub fn register(&self, conn: &Rc<Conn>) {
        let first_here = self
            .users
            .borrow_mut()
            .add(conn.clone(), self.monotonic_ms());
        if first_here {
            self.interest(&conn.user_id, true);
            let mut users = self.users.borrow_mut();
            self.presence
                .borrow_mut()
                .came_online(&conn.user_id, &mut users);
        }
        bump(&self.metrics().connections, 1);
    }

    /// Removes a connection from every table; nothing is delivered to it after.
    pub fn unregister(&self, conn: &Conn) {
        let last_here = self.users.borrow_mut().remove(conn);
        if let Some(written) = last_here {
            self.interest(&conn.user_id, false);
            // Revoked (every device) or deleted: no departure is written,
            // which would leave a presence row of a deleted account; a
            // reader takes the last online row as offline once it is 2.5
            // intervals old, and the deletion removed it.
            if !conn.was_revoked() {
                let now_unix_ms = crate::clock::unix_ms();
                self.presence
                    .borrow_mut()
                    .went_offline(&conn.user_id, now_unix_ms, written);
            }
        }
        self.conns.borrow_mut().try_remove(conn.slot);
        let connections = &self.metrics().connections;
        connections.store(connections.load(Relaxed).saturating_sub(1), Relaxed);
    }

    /// Tells storage that `conn`'s device was seen now (it connected or
    /// left), so its per-device rows outlive the writer's device retention
    /// while it keeps coming back. Nobody waits for the answer.
    pub fn note_device_seen(self: &Rc<Self>, conn: &Conn) {
        let shard = self.clone();
        let (user, device) = (conn.user_id.to_string(), conn.device_id.to_string());
        monoio::spawn(async move {
            let request = |req| chat_protocol::store_wire::Request::DeviceSeen {
                req,
                user,
                device,
                at_unix_ms: crate::clock::unix_ms(),
            };
            // A sighting lost to an outage only makes the device look older.
            let _ = shard.store.request(request, shard.storage_timeout()).await;
        });
    }

    /// Forgets `group`'s cached member list on every shard here, so each
    /// reloads it from storage (other nodes hear of it from the backplane).
    pub fn forget_group_everywhere(&self, group: &str) {
        self.groups.borrow_mut().forget(group);
        for other in (0..self.mesh.shard_count()).filter(|s| *s != self.id) {
            let changed = crate::mesh::ShardMessage::GroupChanged(group.into());
            let _ = self
                .mesh
                .send(crate::mesh::Sender::Shard(self.id), other, changed);
        }
    }

    /// Hands a message to the backplane for other nodes. A full bridge queue
    /// drops it (counted): it is durable, so remote devices get it on sync.
    pub fn publish(&self, publish: Outbound) {
        if let Some(backplane) = &self.backplane {
            if backplane.send(self.id, publish).is_err() {
                bump(&self.metrics().backplane_queue_full, 1);
            }
        }
    }

    /// Tells the backplane this node now has (or no longer has) a device of
    /// `user`, so messages for the user are routed here (or no longer).
    fn interest(&self, user: &Rc<str>, active: bool) {
        let Some(backplane) = &self.backplane else {
            return;
        };
        let pending = self.interest_pending.borrow_mut().remove(user);
        if let Some(waiters) = pending {
            waiters.fire();
        }
        let outbound = Outbound::Interest {
            user: user.as_ref().into(),
            active,
        };
        if backplane.send(self.id, outbound).is_err() {
            bump(&self.metrics().backplane_queue_full, 1);
            return;
        }
        if active {
            self.interest_pending
                .borrow_mut()
                .insert(user.clone(), Rc::new(Waiters::default()));
        }
    }

    /// The bridge says messages for `user` reach this node now (it is the
    /// user's home, or the home confirmed its registration).
    pub fn interest_active(&self, user: &str) {
        let waiters = self.interest_pending.borrow_mut().remove(user);
        if let Some(waiters) = waiters {
            waiters.fire();
        }
    }

    /// Waits (bounded) until messages for `user` reach this node, so a sync
    /// that starts after it cannot miss a message published before it.
    pub async fn interest_ready(&self, user: &str) {
        let waiters = self.interest_pending.borrow().get(user).cloned();
        if let Some(waiters) = waiters {
            let _ = monoio::time::timeout(self.storage_timeout(), waiters.wait()).await;
        }
    }
}

impl ReadPathOwner for Shard {
    fn read_path(&self) -> &StoreClient {
        &self.store
    }

    fn shard_id(&self) -> usize {
        self.id
    }

    /// The storage-writer committed this shard's ring up to `position`.
    fn on_durable(&self, position: u64) {
        self.durability
            .on_durable(position, self.metrics(), |publish| self.publish(*publish));
        if self.durability.has_released() {
            self.held_released.fire();
        }
    }

    fn on_refused(&self, message_id: u64, reason: String) {
        self.durability.on_refused(message_id, reason);
    }

    fn on_stalled(&self, reason: String) {
        self.durability.on_stalled(reason);
    }

    fn set_connected(&self, connected: bool) {
        self.metrics()
            .storage_connected
            .store(u64::from(connected), Relaxed);
    }
}
