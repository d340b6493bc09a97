//! A shard: one pinned thread running one monoio runtime, owning its listener,
//! its connections and the user table of the users homed on it.
//!
//! Owns the shard's state (`Shard`) and its long-lived tasks: accepting,
//! draining the cross-shard inbox, sweeping silent connections, and draining
//! on shutdown. Everything in `Shard` is touched only by this thread (`Rc`,
//! `RefCell`, never `Arc<Mutex>`); other threads reach it only through `Mesh`.
//! No `RefCell` borrow is ever held across an `.await`.

mod accept;
pub mod connection;
mod dedup;
mod durable;
mod groups;
mod keys;
mod limits;
mod per_device;
mod presence;
mod receipts;
mod router;
mod store_client;
mod sync;
mod users;

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::rc::{Rc, Weak};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use std::collections::HashMap;

use anyhow::Context;
use bytes::Bytes;
use chat_backplane::{Backplane, Outbound};
use chat_protocol::codes::CloseCode;
use chat_protocol::frames::{self, HelloFrame};
use chat_protocol::snowflake::SnowflakeGenerator;
use chat_protocol::token::TokenVerifier;
use chat_protocol::{handshake, ws, PROTOCOL_VERSION};
use monoio::net::TcpStream;
use slab::Slab;

use self::connection::Conn;
use self::dedup::IdempotencyTable;
use self::durable::Durability;
use self::limits::{Limit, TokenBucket};
use self::store_client::StoreClient;
use self::users::{UserLimits, UserTable};
use crate::config::{Config, IoDriver, IoUringTaskRun};
use crate::mesh::{Handoff, Mesh, ShardMessage};
use crate::metrics::{bump, NodeState, Refusal, ShardMetrics};
use crate::sock;

/// Bytes of the buffer every connection on a shard reads into. One per shard,
/// so idle connections hold none. 64 KiB drains a busy socket in few calls.
const SCRATCH_BYTES: usize = 64 * 1024;
/// The storage-writer's read-path socket, in the ring directory.
pub const WRITER_SOCKET: &str = "writer.sock";
/// Cross-shard messages handled per inbox turn before yielding to connections.
const INBOX_BUDGET: usize = 1024;
/// Longest pause between heartbeat sweeps.
const SWEEP_INTERVAL_MS_MAX: u64 = 1_000;

/// What the node hands a shard thread at start-up (all `Send`).
pub struct ShardSetup {
    pub id: usize,
    pub config: Arc<Config>,
    pub node: Arc<NodeState>,
    pub mesh: Arc<Mesh>,
    pub secret: Arc<Vec<u8>>,
    pub listener: std::net::TcpListener,
    pub core: Option<core_affinity::CoreId>,
    /// The NATS bridge, when this node is part of a fleet.
    pub backplane: Option<Arc<Backplane>>,
}

/// The shard's state, shared by its tasks on its one thread.
pub struct Shard {
    pub id: usize,
    pub config: Arc<Config>,
    pub node: Arc<NodeState>,
    pub mesh: Arc<Mesh>,
    verifier: TokenVerifier,
    /// Users homed here, with their live devices.
    users: RefCell<UserTable>,
    /// Every registered connection, for heartbeat sweeps and draining.
    conns: RefCell<Slab<Rc<Conn>>>,
    snowflake: RefCell<SnowflakeGenerator>,
    idempotency: RefCell<IdempotencyTable>,
    /// The read buffer all connections share; taken and put back around each read.
    scratch: RefCell<Vec<u8>>,
    /// `{"type":"pong"}`, encoded once.
    pong_frame: Bytes,
    draining: Cell<bool>,
    /// Fired when draining starts (stops the accept loop).
    drain_started: LocalSignal,
    /// Fired when the shard has closed everything and may exit.
    finished: LocalSignal,
    /// Origin of the shard clock used for liveness.
    started: Instant,
    /// This shard's ring and the `sent` frames waiting for durability.
    durability: Durability,
    /// The read path to the storage-writer.
    store: StoreClient,
    pub(super) backplane: Option<Arc<Backplane>>,
    /// Users whose backplane subscription is being set up, with the
    /// connections waiting for it before their connect-time sync.
    interest_pending: RefCell<HashMap<Rc<str>, Rc<Waiters>>>,
    /// Group member lists loaded from storage.
    groups: RefCell<groups::GroupCache>,
    /// Receipts waiting for the end of their batching window.
    receipts: RefCell<receipts::ReceiptBatcher>,
    /// What was written about who is online.
    presence: RefCell<presence::PresenceLog>,
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

    /// Milliseconds on this shard's monotonic clock.
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Registers an authenticated socket whose user is homed here, answers the
    /// upgrade, says hello and starts serving it.
    fn adopt(
        self: &Rc<Self>,
        socket: TcpStream,
        user_id: &str,
        device_id: &str,
        accept_key: &str,
        early_bytes: Vec<u8>,
    ) {
        if self.draining.get() {
            self.metrics().refused(Refusal::Draining);
            sock::send_best_effort(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                &refusal_503("node is draining"),
            );
            self.node.release_connection();
            return;
        }
        let fd = std::os::fd::AsRawFd::as_raw_fd(&socket);
        let _ = socket.set_nodelay(true);
        if self.config.socket_send_buffer_bytes > 0 {
            if let Err(error) = sock::set_send_buffer(fd, self.config.socket_send_buffer_bytes) {
                tracing::debug!(%error, "SO_SNDBUF not set");
            }
        }
        let user_id = self
            .users
            .borrow()
            .interned(user_id)
            .unwrap_or_else(|| Rc::from(user_id));
        let conn = {
            let mut conns = self.conns.borrow_mut();
            let slot = conns.vacant_key();
            let frames = TokenBucket::full(self.frames_limit(), self.now_ms());
            let conn = Rc::new(Conn::new(
                slot,
                user_id,
                device_id,
                self.config.send_queue_bytes_max,
                frames,
                self.now_ms(),
            ));
            conns.insert(conn.clone());
            conn
        };
        let hello = frames::encode_hello(&HelloFrame {
            kind: "hello",
            protocol: PROTOCOL_VERSION,
            user: &conn.user_id,
            device: &conn.device_id,
            heartbeat_interval_ms: self.config.heartbeat_interval_ms,
            heartbeat_timeout_ms: self.config.heartbeat_timeout_ms,
            body_bytes_max: self.config.body_bytes_max,
            message_bytes_max: self.config.message_bytes_max,
        });
        conn.enqueue(Bytes::from(handshake::switching_protocols(accept_key)));
        conn.enqueue(Bytes::from(ws::text_frame(&hello)));
        // Registered before the client can see `hello`, so anything sent to the
        // user after the client reads `hello` reaches this device: live, or
        // held while the connect-time sync runs (then de-duplicated against it).
        conn.begin_sync();
        let first_here = self.users.borrow_mut().add(conn.clone(), self.now_ms());
        if first_here {
            self.interest(&conn.user_id, true);
            let mut users = self.users.borrow_mut();
            let mut presence = self.presence.borrow_mut();
            presence.came_online(&conn.user_id, &mut users);
        }
        let metrics = self.metrics();
        bump(&metrics.handshakes_accepted, 1);
        bump(&metrics.connections, 1);
        monoio::spawn(connection::serve(self.clone(), socket, conn, early_bytes));
    }

    /// Removes a connection from every table; nothing is delivered to it after.
    fn unregister(&self, conn: &Conn) {
        let last_here = self.users.borrow_mut().remove(conn);
        if let Some(written) = last_here {
            self.interest(&conn.user_id, false);
            let now = crate::clock::unix_ms();
            let mut presence = self.presence.borrow_mut();
            presence.went_offline(&conn.user_id, now, written);
        }
        self.conns.borrow_mut().try_remove(conn.slot);
        let connections = &self.metrics().connections;
        connections.store(connections.load(Relaxed).saturating_sub(1), Relaxed);
    }

    fn handle(self: &Rc<Self>, message: ShardMessage) {
        match message {
            ShardMessage::Deliver(delivery) => {
                bump(&self.metrics().messages_received_cross_shard, 1);
                self.users.borrow().deliver(
                    &delivery.to_user,
                    delivery.message_id,
                    &delivery.frame,
                    None,
                );
            }
            ShardMessage::DeliverMany(many) => {
                bump(&self.metrics().messages_received_cross_shard, 1);
                let users = self.users.borrow();
                for user in &many.to_users {
                    users.deliver(user, many.message_id, &many.frame, None);
                }
            }
            ShardMessage::DeliverPerDevice(delivery) => {
                bump(&self.metrics().messages_received_cross_shard, 1);
                self.users.borrow().deliver_per_device(
                    &delivery.to_user,
                    delivery.message_id,
                    &delivery.frames,
                    None,
                );
            }
            ShardMessage::GroupChanged(group) => self.groups.borrow_mut().forget(&group),
            ShardMessage::Adopt(handoff) => self.adopt_handoff(*handoff),
            ShardMessage::InterestActive(user) => {
                let waiters = self.interest_pending.borrow_mut().remove(&*user);
                if let Some(waiters) = waiters {
                    waiters.fire();
                }
            }
            ShardMessage::Resync => {
                // Group changes may have been missed while away.
                self.groups.borrow_mut().clear();
                monoio::spawn(resync(self.clone()));
            }
            ShardMessage::Drain => {
                if !self.draining.replace(true) {
                    self.drain_started.fire();
                    monoio::spawn(drain(self.clone()));
                }
            }
        }
    }

    /// The storage-writer committed this shard's ring up to `position`.
    fn on_durable(&self, position: u64) {
        self.durability
            .on_durable(position, self.metrics(), |publish| self.publish(*publish));
    }

    /// Hands a durable message to the backplane for other nodes.
    pub(super) fn publish(&self, publish: Outbound) {
        if let Some(backplane) = &self.backplane {
            if backplane.send(self.id, publish).is_err() {
                // Durable anyway: remote devices get it on their next sync.
                bump(&self.metrics().backplane_queue_full, 1);
            }
        }
    }

    /// Subscribes or unsubscribes this node for `user` on the backplane.
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

    /// Waits (bounded) until this node's backplane subscription for `user` is
    /// in place, so a sync that starts after it cannot miss a message that
    /// was published before it.
    pub(super) async fn interest_ready(&self, user: &str) {
        let waiters = self.interest_pending.borrow().get(user).cloned();
        if let Some(waiters) = waiters {
            let timeout = Duration::from_millis(self.config.storage_timeout_ms);
            let _ = monoio::time::timeout(timeout, waiters.wait()).await;
        }
    }

    fn adopt_handoff(self: &Rc<Self>, handoff: Handoff) {
        bump(&self.metrics().handoffs_received, 1);
        let Handoff {
            socket,
            user_id,
            device_id,
            accept_key,
            early_bytes,
        } = handoff;
        match TcpStream::from_std(socket) {
            Ok(socket) => self.adopt(socket, &user_id, &device_id, &accept_key, early_bytes),
            Err(error) => {
                tracing::warn!(%error, "could not adopt a handed-off socket");
                self.node.release_connection();
            }
        }
    }
}

/// A 503 refusal, sent when the node is full or draining.
fn refusal_503(body: &str) -> Vec<u8> {
    handshake::refusal(503, "Service Unavailable", body)
}

/// The io_uring setup flags for `mode` (see `IoUringTaskRun`).
fn ring_builder(mode: IoUringTaskRun) -> io_uring::Builder {
    let mut builder = io_uring::IoUring::builder();
    match mode {
        IoUringTaskRun::Kernel => {}
        IoUringTaskRun::Coop => {
            builder.setup_coop_taskrun().setup_single_issuer();
        }
        IoUringTaskRun::Defer => {
            builder
                .setup_coop_taskrun()
                .setup_single_issuer()
                .setup_defer_taskrun();
        }
    }
    builder
}

/// Runs shard `setup.id` on the current thread until it has drained.
pub fn run(setup: ShardSetup) -> anyhow::Result<()> {
    if let Some(core) = setup.core {
        if !core_affinity::set_for_current(core) {
            tracing::warn!(
                shard = setup.id,
                core = core.id,
                "could not pin shard to its core"
            );
        }
    }
    let use_io_uring = match setup.config.io_driver {
        IoDriver::Auto => monoio::utils::detect_uring(),
        IoDriver::IoUring => {
            anyhow::ensure!(
                monoio::utils::detect_uring(),
                "io_driver = io_uring, but io_uring is unavailable here"
            );
            true
        }
        IoDriver::Epoll => false,
    };
    // The epoll driver accepts with plain non-blocking syscalls (a blocking
    // listener would stall the whole shard); io_uring's accept waits in the kernel.
    setup.listener.set_nonblocking(!use_io_uring)?;
    let entries = setup.config.io_uring_entries;
    if use_io_uring {
        let build = |mode| {
            monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                .uring_builder(ring_builder(mode))
                .with_entries(entries)
                .enable_timer()
                .build()
        };
        let mode = setup.config.io_uring_task_run;
        let mut runtime = match build(mode) {
            Ok(runtime) => runtime,
            // Kernels before 6.0 reject these flags: a plain ring still works.
            Err(error) if mode != IoUringTaskRun::Kernel => {
                tracing::warn!(shard = setup.id, %error, ?mode, "io_uring task-run flags refused; using a plain ring");
                build(IoUringTaskRun::Kernel)?
            }
            Err(error) => return Err(error.into()),
        };
        runtime.block_on(shard_main(setup, "io_uring"))
    } else {
        let mut runtime = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .with_entries(entries)
            .enable_timer()
            .build()?;
        runtime.block_on(shard_main(setup, "epoll"))
    }
}

async fn shard_main(setup: ShardSetup, driver: &'static str) -> anyhow::Result<()> {
    let listener = monoio::net::TcpListener::from_std(setup.listener)?;
    let config = setup.config;
    let ring_path = config.ring_dir.join(format!("shard-{}.ring", setup.id));
    let producer = chat_ring::attach_producer(
        &ring_path,
        chat_ring::RingOptions {
            capacity_bytes: config.ring_bytes,
            shard_id: setup.id as u32,
        },
    )
    .with_context(|| format!("shard {}: attaching its ring", setup.id))?;
    let ring_path = ring_path.canonicalize()?;
    let store = StoreClient::new(
        setup.id as u16,
        ring_path.display().to_string(),
        config.ring_dir.join(WRITER_SOCKET),
    );
    let shard = Rc::new(Shard {
        id: setup.id,
        verifier: TokenVerifier::new(&setup.secret),
        users: RefCell::new(UserTable::new(UserLimits {
            sends: Limit {
                per_s: config.sends_per_s,
                burst: config.sends_burst,
            },
            typing: Limit {
                per_s: config.typing_per_s,
                burst: config.typing_burst,
            },
            fetches: Limit {
                per_s: config.prekey_fetches_per_s,
                burst: config.prekey_fetches_burst,
            },
            presence: Limit {
                per_s: config.presence_per_s,
                burst: config.presence_burst,
            },
        })),
        conns: RefCell::new(Slab::new()),
        snowflake: RefCell::new(SnowflakeGenerator::new(config.node_id, setup.id as u16)),
        idempotency: RefCell::new(IdempotencyTable::new(
            config.idempotency_window_ms,
            config.idempotency_entries_max,
        )),
        scratch: RefCell::new(vec![0; SCRATCH_BYTES]),
        pong_frame: Bytes::from(ws::text_frame(frames::PONG_JSON)),
        draining: Cell::new(false),
        drain_started: LocalSignal::default(),
        finished: LocalSignal::default(),
        started: Instant::now(),
        durability: Durability::new(producer),
        store,
        backplane: setup.backplane,
        interest_pending: RefCell::new(HashMap::new()),
        groups: RefCell::default(),
        receipts: RefCell::default(),
        presence: RefCell::default(),
        config,
        node: setup.node,
        mesh: setup.mesh,
    });
    let _ = shard.node.io_driver.set(driver);
    tracing::info!(shard = shard.id, driver, core = ?setup.core.map(|c| c.id), "shard started");

    monoio::spawn(store_client::run(shard.clone()));
    monoio::spawn(inbox(shard.clone()));
    monoio::spawn(sweep(shard.clone()));
    monoio::spawn(receipts::flush_loop(shard.clone()));
    monoio::spawn(presence::write_loop(shard.clone()));
    monoio::spawn(accept::accept_loop(shard.clone(), listener));
    shard.node.shards_ready.fetch_add(1, Relaxed);

    shard.finished.wait().await;
    tracing::info!(shard = shard.id, "shard drained");
    Ok(())
}

/// Handles what other shards (and the control thread) send this one.
async fn inbox(shard: Rc<Shard>) {
    loop {
        shard.mesh.wait(shard.id).await;
        let taken = shard
            .mesh
            .drain(shard.id, INBOX_BUDGET, |message| shard.handle(message));
        if taken == INBOX_BUDGET {
            yield_now().await;
        }
    }
}

/// Closes connections silent for longer than the heartbeat timeout (4000).
async fn sweep(shard: Rc<Shard>) {
    let timeout_ms = shard.config.heartbeat_timeout_ms;
    let interval = Duration::from_millis((timeout_ms / 4).clamp(10, SWEEP_INTERVAL_MS_MAX));
    loop {
        monoio::time::sleep(interval).await;
        let now_ms = shard.now_ms();
        for (_, conn) in shard.conns.borrow().iter() {
            if now_ms.saturating_sub(conn.last_seen_ms()) > timeout_ms {
                conn.request_close(CloseCode::HeartbeatTimeout);
            }
        }
        let metrics = shard.metrics();
        metrics
            .users
            .store(shard.users.borrow().user_count() as u64, Relaxed);
        metrics
            .idempotency_entries
            .store(shard.idempotency.borrow().len() as u64, Relaxed);
        metrics
            .durable_waiting
            .store(shard.durability.waiting() as u64, Relaxed);
    }
}

/// Closes every connection with 1012, each at a random moment within the drain
/// window (so a fleet drain is no reconnect storm), then lets the shard exit.
async fn drain(shard: Rc<Shard>) {
    let window_ms = shard.config.drain_window_ms.max(1);
    tracing::info!(
        shard = shard.id,
        connections = shard.conns.borrow().len(),
        window_ms,
        "draining"
    );
    over_window(&shard, window_ms, |conn| {
        conn.request_close(CloseCode::ServiceRestart)
    })
    .await;
    // Anything adopted while the schedule ran.
    for (_, conn) in shard.conns.borrow().iter() {
        conn.request_close(CloseCode::ServiceRestart);
    }
    let deadline = Instant::now() + Duration::from_millis(shard.config.close_grace_ms + 1_000);
    while !shard.conns.borrow().is_empty() && Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(10)).await;
    }
    shard.finished.fire();
}

/// After the backplane was away: every device syncs (it may have missed
/// messages from other nodes), at random moments within `resync_window_ms`
/// so storage is not hit by all of them at once.
async fn resync(shard: Rc<Shard>) {
    let window_ms = shard.config.resync_window_ms.max(1);
    tracing::info!(
        shard = shard.id,
        window_ms,
        "backplane back: resyncing devices"
    );
    let syncing = shard.clone();
    over_window(&shard, window_ms, move |conn| {
        if !conn.is_closing() && conn.begin_sync() {
            monoio::spawn(sync::sync_device(syncing.clone(), conn, None));
        }
    })
    .await;
}

/// Calls `each` for every connection registered now, each at a random moment
/// within `window_ms` (skipping connections that closed meanwhile).
async fn over_window(shard: &Shard, window_ms: u64, mut each: impl FnMut(Rc<Conn>)) {
    let start = Instant::now();
    let mut schedule: Vec<(u64, Weak<Conn>)> = shard
        .conns
        .borrow()
        .iter()
        .map(|(_, conn)| (fastrand::u64(0..window_ms), Rc::downgrade(conn)))
        .collect();
    schedule.sort_unstable_by_key(|(at_ms, _)| *at_ms);
    for (at_ms, conn) in schedule {
        let due = start + Duration::from_millis(at_ms);
        let wait = due.saturating_duration_since(Instant::now());
        if !wait.is_zero() {
            monoio::time::sleep(wait).await;
        }
        if let Some(conn) = conn.upgrade() {
            each(conn);
        }
    }
}

/// Lets other tasks run once.
async fn yield_now() {
    let mut yielded = false;
    poll_fn(|cx| {
        if yielded {
            return Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}

/// A one-shot, single-thread event with one waiter (the latest poll wins).
#[derive(Default)]
struct LocalSignal {
    fired: Cell<bool>,
    waiter: Cell<Option<Waker>>,
}

impl LocalSignal {
    fn fire(&self) {
        self.fired.set(true);
        if let Some(waker) = self.waiter.take() {
            waker.wake();
        }
    }

    async fn wait(&self) {
        poll_fn(|cx| {
            if self.fired.get() {
                return Poll::Ready(());
            }
            self.waiter.set(Some(cx.waker().clone()));
            Poll::Pending
        })
        .await
    }
}

/// A one-shot, single-thread event with any number of waiters.
#[derive(Default)]
struct Waiters {
    fired: Cell<bool>,
    wakers: RefCell<Vec<Waker>>,
}

impl Waiters {
    fn fire(&self) {
        self.fired.set(true);
        for waker in self.wakers.take() {
            waker.wake();
        }
    }

    async fn wait(&self) {
        poll_fn(|cx| {
            if self.fired.get() {
                return Poll::Ready(());
            }
            self.wakers.borrow_mut().push(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}
