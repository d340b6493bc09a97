//! `storage-writer`: drains every gateway shard's shared-memory ring into
//! storage in batches, and serves the gateway's reads.
//!
//! Owns start-up and shutdown: parse the flags, open the backend, attach the
//! rings already in the ring directory, start the commit thread and the read
//! path, tell systemd it is ready, and on SIGTERM finish the batch in hand
//! (or, when storage cannot take it, leave it in the rings for the next
//! writer) and exit. Never serves clients directly; the gateway does.

#![forbid(unsafe_code)]

mod backend;
mod cleanup;
mod commit;
mod lock;
mod metrics;
mod push;
mod rings;
mod serve;
mod sessions;
mod stats;
mod store;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;

use crate::backend::{BackendKind, BackendOptions};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use crate::store::embedded::Fsync;

/// How long a new writer waits for the previous one to let go of the data directory.
const LOCK_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Directory holding the shards' ring files (`shard-N.ring`).
    #[arg(long, env = "STORAGE_WRITER_RING_DIR", default_value = "data/rings")]
    ring_dir: PathBuf,
    /// The read-path socket gateways connect to.
    #[arg(
        long,
        env = "STORAGE_WRITER_SOCKET",
        default_value = "data/rings/writer.sock"
    )]
    socket: PathBuf,
    #[arg(
        long,
        value_enum,
        env = "STORAGE_WRITER_BACKEND",
        default_value = "embedded"
    )]
    backend: BackendKind,
    /// Where the embedded store lives (`<data-dir>/store`).
    #[arg(long, env = "STORAGE_WRITER_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
    /// Embedded store: when the journal is fsynced.
    #[arg(long, value_enum, default_value = "batch")]
    fsync: Fsync,
    /// Embedded store: block cache size.
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    cache_bytes: u64,
    /// e.g. `host=127.0.0.1 port=5432 user=chat dbname=chat`.
    #[arg(long, env = "STORAGE_WRITER_POSTGRES_URL", hide_env_values = true)]
    postgres_url: Option<String>,
    /// e.g. `127.0.0.1:9042`.
    #[arg(long, env = "SCYLLA_URI")]
    scylla_uri: Option<String>,
    #[arg(long, default_value = "chat")]
    scylla_keyspace: String,
    /// Replication factor of the keyspace the writer creates if it is missing.
    #[arg(long, default_value_t = 3)]
    scylla_replication_factor: u8,
    /// Consistency for ScyllaDB writes and reads (one, quorum, local_quorum, ...).
    #[arg(long, default_value = "local_quorum")]
    scylla_consistency: String,
    /// Most records in one batch (a batch is also cut when the rings are empty).
    #[arg(long, default_value_t = 4096)]
    batch_records_max: usize,
    /// How long one batch should take to commit, in µs: a writer that is
    /// behind cuts its batches at the records that take about this long
    /// (at the recent cost per record), so every `sent` waits about a
    /// batch time and the gateway's `sent_wait_ms_max` can hold. 0: batches
    /// are cut only at `--batch-records-max`.
    #[arg(long, default_value_t = 10_000)]
    batch_time_target_us: u64,
    /// Adaptive linger, in µs: while records keep coming (the last batch
    /// was made durable less than this long ago), a batch of fewer than 64
    /// records waits this long for more before it is written, so a busy
    /// writer pays one fsync per linger instead of one per few records; an
    /// idle writer (a record after a quiet spell) and a saturated one (its
    /// batches already large) commit at once. 0: never wait.
    #[arg(long, default_value_t = 1000)]
    batch_linger_us: u64,
    /// The most members a group may have (the gateway's
    /// `group_members_max`, which it passes to a writer it starts): a
    /// membership change that would pass it is not stored and its sender
    /// is told, even when changes made on two nodes at once each passed
    /// their node's check.
    #[arg(long, default_value_t = 1024)]
    group_members_max: usize,
    /// How long a send's idempotency key is kept (the gateway's
    /// `idempotency_window_ms`, which it passes to a writer it starts);
    /// older keys are removed, so a retry after it is a new message.
    #[arg(long, default_value_t = 24 * 60 * 60 * 1000)]
    idempotency_window_ms: u64,
    /// Presence rows of users offline for longer than this are removed (their
    /// "last seen" is then unknown); 0 keeps them. ScyllaDB: the TTL of an
    /// offline row.
    #[arg(long, default_value_t = 30 * 24 * 60 * 60 * 1000)]
    presence_retention_ms: u64,
    /// A device not seen (connecting or leaving) for longer than this loses
    /// its cursor, keys, one-time prekeys and push target: senders stop
    /// encrypting for it, and if it comes back it syncs from the start of
    /// the retention and uploads keys again. 0 keeps them. ScyllaDB: also
    /// sizes the time buckets of `devices_by_seen` (a sixteenth, 1 s to
    /// 1 h) when a keyspace first gets them.
    #[arg(long, default_value_t = 120 * 24 * 60 * 60 * 1000)]
    device_retention_ms: u64,
    /// Hot retention: messages (and their inbox entries) older than this
    /// leave history and sync at once and are removed by the cleanup; a
    /// device that had not received them is told how many it missed. 0
    /// keeps them forever. ScyllaDB: the TTL of each message row and inbox
    /// entry written.
    #[arg(long, default_value_t = 90 * 24 * 60 * 60 * 1000)]
    message_retention_ms: u64,
    /// PostgreSQL: the time window of one partition of `messages` and
    /// `inbox` (every writer of a database must use the same).
    #[arg(long, default_value_t = store::POSTGRES_PARTITION_MS_DEFAULT)]
    postgres_partition_ms: u64,
    /// How often the cleanup runs (expired idempotency keys, old presence), in seconds.
    #[arg(long, default_value_t = 60)]
    cleanup_interval_s: u64,
    /// Log batch statistics this often (0: never).
    #[arg(long, default_value_t = 60)]
    stats_interval_s: u64,
    /// Serve Prometheus metrics (`GET /metrics`: batches, push) on this
    /// address. Unset: no listener.
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    #[command(flatten)]
    push: push::PushArgs,
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    if let Err(error) = run(Args::parse()) {
        tracing::error!("{error:#}");
        std::process::exit(1);
    }
}

/// `--message-retention-ms` (0: forever).
fn message_retention(args: &Args) -> Option<Duration> {
    (args.message_retention_ms > 0).then(|| Duration::from_millis(args.message_retention_ms))
}

fn run(args: Args) -> Result<()> {
    anyhow::ensure!(
        (1..=1 << 20).contains(&args.batch_records_max),
        "--batch-records-max must be 1 to 1048576"
    );
    std::fs::create_dir_all(&args.ring_dir)
        .with_context(|| format!("creating {}", args.ring_dir.display()))?;
    // One writer per data directory: the embedded store has no lock of its
    // own, and a writer restarted while the previous one finishes its batch
    // must not open the store under it.
    let message_retention = message_retention(&args);
    let _lock = lock::exclusive(&args.data_dir.join("storage-writer.lock"), LOCK_WAIT)?;
    let backend: Arc<dyn store::Backend> = Arc::from(backend::open(&BackendOptions {
        kind: args.backend,
        data_dir: args.data_dir.clone(),
        fsync: args.fsync,
        cache_bytes: args.cache_bytes,
        postgres_url: args.postgres_url.clone(),
        scylla_uri: args.scylla_uri.clone(),
        scylla_keyspace: args.scylla_keyspace.clone(),
        scylla_replication_factor: args.scylla_replication_factor,
        scylla_consistency: args.scylla_consistency.clone(),
        idempotency_window: Duration::from_millis(args.idempotency_window_ms),
        presence_retention: Duration::from_millis(args.presence_retention_ms),
        message_retention,
        device_retention: Duration::from_millis(args.device_retention_ms),
        postgres_partition_ms: args.postgres_partition_ms,
    })?);
    // Before anything can say READY: a SIGTERM right after it must find the
    // handler in place (the default action would kill the batch in hand).
    let term = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, term.clone())?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(rings::Progress::default());
    let (rings, drains) = rings::Rings::new(progress.clone());
    let rings = Arc::new(rings);
    rings.attach_dir(&args.ring_dir)?;
    let sessions = Arc::new(sessions::Sessions::default());
    let stats = Arc::new(stats::Stats::default());
    let push = push::start(&args.push, backend.clone())?;
    if let Some(address) = args.metrics_listen {
        metrics::spawn(
            address,
            stats.clone(),
            push.as_ref().map(|p| p.stats.clone()),
        )?;
    }

    let commit = commit::CommitLoop {
        drains,
        writer: backend.writer()?,
        progress: progress.clone(),
        sessions: sessions.clone(),
        stats: stats.clone(),
        batch_records_max: args.batch_records_max,
        batch_time_target: Duration::from_micros(args.batch_time_target_us),
        group_members_max: args.group_members_max,
        batch_linger: Duration::from_micros(args.batch_linger_us),
        stop: stop.clone(),
        push,
    };
    let commit_thread = std::thread::Builder::new()
        .name("commit".into())
        .spawn(move || commit.run())?;

    anyhow::ensure!(
        args.cleanup_interval_s >= 1,
        "--cleanup-interval-s must be at least 1"
    );
    let cleanup_thread = cleanup::Cleanup {
        backend: backend.clone(),
        idempotency_window: Duration::from_millis(args.idempotency_window_ms),
        presence_retention: Duration::from_millis(args.presence_retention_ms),
        device_retention: Duration::from_millis(args.device_retention_ms),
        message_retention,
        interval: Duration::from_secs(args.cleanup_interval_s),
        stats: stats.clone(),
        stop: stop.clone(),
    }
    .spawn()?;

    let listener = serve::bind(&args.socket)?;
    let server = Arc::new(serve::Server {
        backend: backend.clone(),
        rings: rings.clone(),
        sessions: sessions.clone(),
        stop: stop.clone(),
        ring_dir: args.ring_dir.clone(),
        sessions_open: Default::default(),
        message_retention,
    });
    std::thread::Builder::new()
        .name("accept".into())
        .spawn(move || server.run(listener))?;

    tracing::info!(
        backend = backend.name(),
        socket = %args.socket.display(),
        ring_dir = %args.ring_dir.display(),
        "storage-writer ready"
    );
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);

    wait_for_signal(&term, &stats, args.stats_interval_s);
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    stop.store(true, Ordering::Relaxed);
    rings.wake();
    // Shards reconnect to the next writer; nothing new is read here. (The next
    // writer binds only after it holds the data directory's lock, so this
    // removes our socket, not its.)
    let _ = std::fs::remove_file(&args.socket);
    sessions.close_all();
    // The commit thread finishes the batch in hand, then stops reading.
    let _ = commit_thread.join();
    let _ = cleanup_thread.join();
    log_stats(&stats);
    Ok(())
}

/// Blocks until SIGTERM or SIGINT, logging statistics and feeding the
/// systemd watchdog meanwhile.
fn wait_for_signal(term: &AtomicBool, stats: &stats::Stats, interval_s: u64) {
    let tick = Duration::from_millis(100);
    let mut ticks = 0u64;
    while !term.load(Ordering::Relaxed) {
        std::thread::sleep(tick);
        ticks += 1;
        if ticks.is_multiple_of(50) {
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
        }
        if interval_s > 0 && ticks.is_multiple_of(interval_s * 10) {
            log_stats(stats);
        }
    }
    tracing::info!("signal received; finishing the batch in hand");
}

fn log_stats(stats: &stats::Stats) {
    use std::sync::atomic::Ordering::Relaxed;
    tracing::info!(
        batches = stats.batches.load(Relaxed),
        records = stats.records.load(Relaxed),
        commit_ms = stats.commit_ns.load(Relaxed) / 1_000_000,
        sizes = %stats.size_histogram(),
        commit_times = %stats.commit_time.summary(),
        "writer statistics"
    );
}
