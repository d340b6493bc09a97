//! A shard's life: one pinned thread running one monoio runtime, from
//! start-up to the end of its drain.
//!
//! Owns building the runtime (io_uring with its task-run flags, or epoll),
//! building the shard's state, its long-lived tasks (the read-path client,
//! the cross-shard inbox, heartbeat sweeps, the receipt and presence
//! loops, the accept loop), handling what other shards and the control
//! thread send (`ShardMessage`), draining on shutdown and resyncing after a
//! backplane outage. The top of the shard: it imports every layer below
//! and nothing imports it but `mod.rs`.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use backplane_bridge::Backplane;
use bytes::Bytes;
use chat_protocol::codes::CloseCode;
use chat_protocol::frames;
use chat_protocol::snowflake::SnowflakeGenerator;
use chat_protocol::token::TokenVerifier;
use chat_protocol::ws;
use slab::Slab;

use super::accept;
use super::features::{presence, receipts, revocation, sync};
use super::send::pipeline;
use super::state::conn::Conn;
use super::state::durable::Durability;
use super::state::idempotency::IdempotencyTable;
use super::state::signal::{yield_now, LocalSignal};
use super::state::store_client::{self, StoreClient};
use super::state::token_bucket::Limit;
use super::state::users::{UserLimits, UserTable};
use super::state::Shard;
use crate::config::{Config, IoDriver, IoUringTaskRun};
use crate::limits::{DRAIN_EXIT_SLACK_MS, INBOX_BUDGET, SCRATCH_BYTES, SWEEP_INTERVAL_MS_MAX};
use crate::mesh::{Mesh, ShardMessage};
use crate::metrics::{bump, NodeState};

/// The storage-writer's read-path socket, in the ring directory.
pub const WRITER_SOCKET: &str = "writer.sock";

/// What the node hands a shard thread at start-up (all `Send`).
pub struct ShardSetup {
    pub id: usize,
    pub config: Arc<Config>,
    pub node: Arc<NodeState>,
    pub mesh: Arc<Mesh>,
    pub secret: Arc<Vec<u8>>,
    pub web: Arc<crate::web::WebClient>,
    /// The listener's TLS configuration, when it serves `wss://`.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub listener: std::net::TcpListener,
    pub core: Option<core_affinity::CoreId>,
    /// The NATS bridge, when this node is part of a fleet.
    pub backplane: Option<Arc<Backplane>>,
}

/// Handles what other shards (and the control thread) send this one.
fn handle(shard: &Rc<Shard>, message: ShardMessage) {
    match message {
        ShardMessage::Deliver(delivery) => {
            bump(&shard.metrics().messages_received_cross_shard, 1);
            shard.users.borrow().deliver(
                &delivery.to_user,
                delivery.message_id,
                &delivery.frame,
                None,
            );
        }
        ShardMessage::DeliverMany(many) => {
            bump(&shard.metrics().messages_received_cross_shard, 1);
            let users = shard.users.borrow();
            for user in &many.to_users {
                users.deliver(user, many.message_id, &many.frame, None);
            }
        }
        ShardMessage::DeliverPerDevice(delivery) => {
            bump(&shard.metrics().messages_received_cross_shard, 1);
            shard.users.borrow().deliver_per_device(
                &delivery.to_user,
                delivery.message_id,
                &delivery.frames,
                None,
            );
        }
        ShardMessage::GroupChanged(group) => shard.groups.borrow_mut().forget(&group),
        ShardMessage::Adopt(handoff) => accept::adopt_handoff(shard, *handoff),
        ShardMessage::InterestActive(user) => shard.interest_active(&user),
        ShardMessage::Resync { since_unix_ms } => {
            // Group changes may have been missed while away.
            shard.groups.borrow_mut().clear();
            monoio::spawn(resync(shard.clone(), since_unix_ms));
        }
        ShardMessage::ResyncUser {
            user,
            since_unix_ms,
        } => {
            // A node's death moves many users at once: spread their syncs
            // over the resync window, as after an outage.
            let delay =
                Duration::from_millis(fastrand::u64(0..shard.config.resync_window_ms.max(1)));
            let shard = shard.clone();
            monoio::spawn(async move {
                monoio::time::sleep(delay).await;
                let devices = shard.users.borrow().devices_of(&user);
                for conn in devices.iter().filter(|conn| !conn.is_closing()) {
                    sync::resync(&shard, conn, since_unix_ms);
                }
            });
        }
        ShardMessage::Revoke(revocation) => revocation::on_revoke(shard, *revocation),
        ShardMessage::Drain => {
            if !shard.draining.replace(true) {
                shard.drain_started.fire();
                monoio::spawn(drain(shard.clone()));
            }
        }
    }
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
        web: setup.web.clone(),
        tls: setup.tls,
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
        held_released: Default::default(),
        config,
        node: setup.node,
        mesh: setup.mesh,
    });
    let _ = shard.node.io_driver.set(driver);
    tracing::info!(shard = shard.id, driver, core = ?setup.core.map(|c| c.id), "shard started");

    monoio::spawn(store_client::run(shard.clone()));
    monoio::spawn(inbox(shard.clone()));
    monoio::spawn(sweep(shard.clone()));
    monoio::spawn(devices_seen(shard.clone()));
    monoio::spawn(release_held(shard.clone()));
    monoio::spawn(receipts::flush_loop(shard.clone()));
    monoio::spawn(presence::write_loop(shard.clone()));
    monoio::spawn(accept::accept_loop(shard.clone(), listener));
    shard.node.shards_ready.fetch_add(1, Relaxed);

    shard.finished.wait().await;
    tracing::info!(shard = shard.id, "shard drained");
    Ok(())
}

/// Drains the cross-shard inbox, a bounded batch per turn.
async fn inbox(shard: Rc<Shard>) {
    loop {
        shard.mesh.wait(shard.id).await;
        let taken = shard
            .mesh
            .drain(shard.id, INBOX_BUDGET, |message| handle(&shard, message));
        if taken == INBOX_BUDGET {
            yield_now().await;
        }
    }
}

/// Delivers held records (group changes) once durable, or tells their
/// senders the writer refused them.
async fn release_held(shard: Rc<Shard>) {
    loop {
        shard.held_released.wait().await;
        for released in shard.durability.take_released() {
            pipeline::release(&shard, released);
        }
    }
}

/// Closes connections silent for longer than the heartbeat timeout (4000).
async fn sweep(shard: Rc<Shard>) {
    let timeout_ms = shard.config.heartbeat_timeout_ms;
    let interval = Duration::from_millis((timeout_ms / 4).clamp(10, SWEEP_INTERVAL_MS_MAX));
    loop {
        monoio::time::sleep(interval).await;
        let now_ms = shard.monotonic_ms();
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
        let stalled = shard.durability.stalled_for().unwrap_or_default();
        metrics
            .storage_stalled_ms
            .store(stalled.as_millis() as u64, Relaxed);
        let failure = shard.durability.failure().unwrap_or_default();
        let mut said = metrics.storage_failure.lock().expect("failure lock");
        if *said != failure {
            *said = failure;
        }
    }
}

/// Tells storage, every `device_seen_interval_ms`, that each device
/// connected here is still seen (one small request per device, spread over
/// the interval's first tenth so a big shard sends no burst).
async fn devices_seen(shard: Rc<Shard>) {
    let interval = Duration::from_millis(shard.config.device_seen_interval_ms);
    loop {
        monoio::time::sleep(interval).await;
        let conns: Vec<Rc<Conn>> = shard
            .conns
            .borrow()
            .iter()
            .map(|(_, conn)| conn.clone())
            .collect();
        let pause = interval / 10 / (conns.len().max(1) as u32);
        for conn in conns {
            if !conn.is_closing() {
                shard.note_device_seen(&conn);
            }
            if !pause.is_zero() {
                monoio::time::sleep(pause).await;
            }
        }
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
    let deadline =
        Instant::now() + Duration::from_millis(shard.config.close_grace_ms + DRAIN_EXIT_SLACK_MS);
    while !shard.conns.borrow().is_empty() && Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(10)).await;
    }
    shard.finished.fire();
}

/// After the backplane was away: every device syncs what was made since it
/// went (it may have missed messages from other nodes), at random moments
/// within `resync_window_ms` so storage is not hit by all of them at once.
async fn resync(shard: Rc<Shard>, since_unix_ms: u64) {
    let window_ms = shard.config.resync_window_ms.max(1);
    tracing::info!(
        shard = shard.id,
        window_ms,
        "backplane back: resyncing devices"
    );
    let syncing = shard.clone();
    over_window(&shard, window_ms, move |conn| {
        if !conn.is_closing() {
            sync::resync(&syncing, &conn, since_unix_ms);
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
