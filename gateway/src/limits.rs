//! Every fixed limit of the node, in one place, each with one name and the
//! reason for its value.
//!
//! Owns the bounds that are deliberately *not* configuration: sizes and
//! timings that follow from the design (a buffer shared per shard, a loop's
//! fairness budget) rather than from a deployment. What an operator may
//! tune is in `config.rs` (documented in `docs/config.md`); wire limits are
//! in `chat_protocol::limits`. Never imported by `protocol/`.

// --- connections and the socket task ------------------------------------

/// Bytes of the read buffer every connection of a shard shares (one per
/// shard, so an idle connection holds none). 64 KiB drains a busy socket in
/// few calls and is the loopback MSS-rounded read the kernel hands back.
pub const SCRATCH_BYTES: usize = 64 * 1024;
/// Reads per readiness wake-up before a connection's task yields to the
/// others on its shard: a fast sender cannot starve its neighbours.
pub const READS_PER_WAKE_MAX: usize = 4;
/// Outbox entries written per `sendmsg` call (Linux `UIO_MAXIOV` is 1,024;
/// 64 already fills a socket buffer with small frames).
pub const IOVECS_PER_WRITE_MAX: usize = 64;
/// Bytes read at once into a frame that arrives in pieces, when its header
/// does not yet say how long it is.
pub const PARTIAL_READ_BYTES: usize = 16 * 1024;
/// Pause after the process runs out of file descriptors, so the accept loop
/// does not spin while connections close (about one heartbeat sweep).
pub const FD_EXHAUSTED_PAUSE_MS: u64 = 50;
/// Longest pause between heartbeat sweeps; shorter when the timeout is short.
pub const SWEEP_INTERVAL_MS_MAX: u64 = 1_000;
/// Past the close grace, how much longer a draining shard waits for its last
/// connections' tasks to finish before it exits anyway.
pub const DRAIN_EXIT_SLACK_MS: u64 = 1_000;
/// The pending connection queue of every listener. `tuning/` raises
/// `net.core.somaxconn` to at least this; `gateway doctor` checks it.
pub const LISTEN_BACKLOG: u32 = 4096;

// --- the shard's queues and tables ---------------------------------------

/// Cross-shard messages handled per inbox turn before the shard yields to
/// its connections (one mesh lane's capacity is of the same order).
pub const INBOX_BUDGET: usize = 1024;
/// Group member lists a shard caches; past it the cache starts over (a
/// list is reloaded on demand). 16k lists of 100 members is ~20 MB.
pub const GROUP_CACHE_ENTRIES_MAX: usize = 16_384;
/// (sender, conversation) receipt batches waiting at once on a shard; past
/// it every batch is flushed early rather than the map growing.
pub const RECEIPTS_PENDING_MAX: usize = 65_536;
/// Read-path requests in flight per shard; past it new ones are answered
/// `unavailable` (the storage-writer is far behind; waiting would not help).
pub const STORE_INFLIGHT_MAX: usize = 4096;

// --- the read path to the storage-writer ----------------------------------

/// First and longest pause between attempts to reach the storage-writer.
pub const STORE_RECONNECT_BACKOFF_MIN_MS: u64 = 50;
pub const STORE_RECONNECT_BACKOFF_MAX_MS: u64 = 1_000;
/// Bytes read from the read-path socket at once (a sync page is up to
/// `SYNC_PAGE_BYTES`: a few reads).
pub const STORE_READ_CHUNK_BYTES: usize = 64 * 1024;
/// How long after start an unreachable writer is expected (it is spawned
/// alongside the gateway) and not warned about.
pub const STORE_STARTUP_GRACE_MS: u64 = 3_000;
/// Bytes of one sync page asked from storage: a page is read only once the
/// device's outbox is half empty, so it never overruns the send queue.
pub const SYNC_PAGE_BYTES: u32 = 512 * 1024;
/// How often a sync checks whether the device's outbox has drained.
pub const SYNC_OUTBOX_POLL_MS: u64 = 5;
/// A sync that storage failed is tried again after about
/// this long, doubling per failure up to `SYNC_RETRY_MS_MAX` (jittered by
/// half, so devices that failed together do not retry together): short
/// enough that a storage restart costs seconds of delay, long enough that
/// an outage with many devices is not a request storm.
pub const SYNC_RETRY_MS: u64 = 500;
pub const SYNC_RETRY_MS_MAX: u64 = 10_000;
/// Bytes a history page counts per message on top of its record (the JSON
/// field names and quoting), when it cuts a page to half a send queue.
pub const HISTORY_FRAME_OVERHEAD_BYTES: usize = 160;

// --- presence --------------------------------------------------------------

/// How often users who came online are written (the debounce of a flapping
/// connection; presence is "within a second").
pub const PRESENCE_ONLINE_TICK_MS: u64 = 1_000;
/// A user stays "online" this many intervals after its node last said so: a
/// node that died stops refreshing, and one late refresh is not a departure.
pub const PRESENCE_STALE_AFTER_INTERVALS: f64 = 2.5;

/// Records waiting for durability on one shard below which
/// `sent_wait_ms_max` never refuses: a few slow commits with little waiting
/// are a starved machine, not load the writer cannot keep up with (at 20,000
/// msgs/s on two shards, 50 ms of backlog is 500 records per shard).
pub const LAG_BACKLOG_RECORDS_MIN: usize = 256;
/// The writer counts as committing (a long wait for `sent` is then lag, and
/// `sent_wait_ms_max` refuses) while the durable watermark moved within
/// this long; after it, nothing commits (a restart), the ring rides it out,
/// and `storage_stall_ms_max` decides. A writer that is behind commits
/// large batches: about 10 ms each with its `--batch-time-target-us`, and up
/// to ~100 ms on this machine without it (4,096 records).
pub const LAG_COMMITTING_WITHIN_MS: u64 = 1_000;

// --- what clients are told to wait ----------------------------------------

/// `retry_after_ms` of `overloaded`: a full queue or ring drains in well
/// under this at the rates a node sustains.
pub const OVERLOADED_RETRY_AFTER_MS: u64 = 100;
/// `retry_after_ms` of `unavailable`: storage did not answer within
/// `storage_timeout_ms`; a restarting writer is back in about this long.
pub const UNAVAILABLE_RETRY_AFTER_MS: u64 = 1_000;

// --- memory budget (what `gateway doctor` assumes) -------------------------

/// Kernel bytes per idle connection: one socket (~3,700) plus a pending
/// io_uring read (~860), measured at 100k loopback connections.
pub const KERNEL_BYTES_PER_IDLE_CONNECTION: u64 = 3_700 + 860;
/// User-space bytes per idle connection (BENCHMARKS.md: 1,155-1,198 measured).
pub const USER_BYTES_PER_IDLE_CONNECTION: u64 = 1_100;
/// Socket buffer bytes a connection may hold under load (doctor's worst case).
pub const BUFFER_BYTES_PER_CONNECTION: u64 = 8 * 1024;
