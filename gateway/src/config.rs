//! The gateway's one typed configuration: defaults, TOML file, command-line flags.
//!
//! Owns every tunable number, its default and the start-up checks that refuse a
//! bad combination. `docs/config.md` documents each field (name, default, unit, why).
//! Read once on the main thread, then shared read-only with every shard.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// The default and the most devices a user may have connected: a
/// per-device send must carry a ciphertext for every device of both users,
/// and `BODIES_DEVICES_MAX` (32) holds 16 of each. The Signal server links at
/// most 6 devices; 16 leaves room for browser tabs, each its own device.
pub const DEVICES_PER_USER_MAX: usize = chat_protocol::limits::BODIES_DEVICES_MAX / 2;

/// Which io driver the shards run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum IoDriver {
    /// io_uring where the kernel allows it, epoll otherwise.
    Auto,
    /// io_uring only; refuse to start without it.
    IoUring,
    /// epoll only (also what valgrind needs).
    Epoll,
}

/// How the kernel runs io_uring completion work for a shard's ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum IoUringTaskRun {
    /// The kernel's default: completions may interrupt the shard at any time.
    Kernel,
    /// COOP_TASKRUN + SINGLE_ISSUER: completion work waits for the shard's next
    /// kernel entry, and the ring knows one thread submits. Measured here: about
    /// 10% less CPU per message and a lower tail at 5,000 msgs/s. Linux 6.0+.
    Coop,
    /// Coop plus DEFER_TASKRUN: completion work runs only when the shard waits.
    /// Mixed results here. Linux 6.1+.
    Defer,
}

/// Who runs the storage-writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum WriterMode {
    /// The gateway starts it as a child, restarts it if it dies, and stops it
    /// after draining: one command runs a whole node.
    Spawn,
    /// Someone else runs it (systemd's storage-writer unit, or a test).
    External,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// WebSocket listener; every shard binds it with SO_REUSEPORT.
    pub listen: SocketAddr,
    /// Admin HTTP listener: /healthz, /readyz, /metrics.
    pub admin_listen: SocketAddr,
    /// Where the generated development secret (and later, local state) lives.
    pub data_dir: PathBuf,
    /// Shards (threads); 0 means one per available core.
    pub shards: usize,
    /// This node's id (0-4095); part of every message id. In a fleet
    /// (`nats_url` set) it is leased from NATS unless `node_id_lease` is off.
    pub node_id: u16,
    /// In a fleet, lease `node_id` from NATS (JetStream) instead of taking
    /// it from the config: no two live nodes ever share an id.
    pub node_id_lease: bool,
    /// How long a leased id outlives its node's last refresh (a node killed
    /// with `kill -9` frees its id this long after). Refreshed every third.
    pub node_id_lease_ttl_ms: u64,
    /// Copies JetStream keeps of the lease bucket: 1 for one NATS server,
    /// 3 for a three-server cluster (a lost server then keeps the ids).
    pub node_id_lease_replicas: usize,
    pub io_driver: IoDriver,
    /// Pin shard N to core N.
    pub pin_shards: bool,
    /// Entries in each shard's io_uring submission queue.
    pub io_uring_entries: u32,
    /// io_uring task-run mode; falls back to `kernel` where refused.
    pub io_uring_task_run: IoUringTaskRun,
    /// HS256 secret for bearer tokens (at least 32 bytes). Prefer the
    /// GATEWAY_AUTH_SECRET environment variable to writing it here.
    pub auth_secret: Option<String>,
    /// Bearer token for the admin listener's write calls (`POST /revoke`);
    /// at least 32 bytes. Unset: those calls are refused (403). Prefer the
    /// GATEWAY_ADMIN_TOKEN environment variable to writing it here.
    pub admin_token: Option<String>,
    /// Most simultaneous connections; 0 means as many as RLIMIT_NOFILE allows.
    pub connections_max: usize,
    pub handshake_timeout_ms: u64,
    pub handshake_bytes_max: usize,
    /// How often clients are told to ping.
    pub heartbeat_interval_ms: u64,
    /// Silence after which a connection is closed (4000).
    pub heartbeat_timeout_ms: u64,
    /// Largest WebSocket message (frame or joined fragments); larger closes with 1009.
    pub message_bytes_max: usize,
    /// Largest `body`; larger gets `body_too_large` and the connection stays.
    pub body_bytes_max: usize,
    /// Bytes queued to one connection before it is closed as a slow consumer (4001).
    pub send_queue_bytes_max: usize,
    /// Kernel send buffer per client socket; 0 keeps the kernel's autotuning.
    pub socket_send_buffer_bytes: usize,
    /// Slots in each shard-to-shard queue.
    pub cross_shard_queue_capacity: usize,
    /// How long a `send` id is remembered for idempotency.
    pub idempotency_window_ms: u64,
    /// How long after sending it a user may delete a message for everyone.
    pub delete_window_ms: u64,
    /// Most remembered `send` ids per shard; the oldest are forgotten first.
    pub idempotency_entries_max: usize,
    /// Client errors within one minute after which the connection closes (1008).
    pub protocol_errors_max: u32,
    /// Text frames per second per connection (token bucket rate).
    pub frames_per_s: f32,
    /// Text frames a connection may send at once before `frames_per_s` applies.
    pub frames_burst: f32,
    /// Sends per second per user, across all of the user's devices.
    pub sends_per_s: f32,
    /// Sends a user may make at once before `sends_per_s` applies.
    pub sends_burst: f32,
    /// Back-pressure by lag: while the storage-writer commits but the
    /// oldest `sent` has waited longer than this and through whole batches,
    /// with at least `LAG_BACKLOG_RECORDS_MIN` records waiting on the shard,
    /// new sends are refused with `overloaded`. 0 turns it off.
    pub sent_wait_ms_max: u64,
    /// Outage bound: once nothing has become durable for this long while a
    /// `sent` waits (the writer or its database away, a full disk), new
    /// sends get `unavailable` with `retry_after_ms` and `/readyz` says
    /// why; what was accepted rides on the ring. 0: ride out any outage.
    pub storage_stall_ms_max: u64,
    /// Devices (distinct device ids) one user may have connected to this
    /// node at once; another is refused at the upgrade with 403.
    pub devices_per_user_max: usize,
    /// `typing` frames per second per user, across devices (token bucket rate).
    pub typing_per_s: f32,
    /// `typing` frames a user may send at once.
    pub typing_burst: f32,
    /// How long a recipient shows a typing indicator without a new `typing`.
    pub typing_expires_ms: u64,
    /// `keys_fetch` frames per second per user, across devices (token bucket rate).
    pub prekey_fetches_per_s: f32,
    /// `keys_fetch` frames a user may send at once.
    pub prekey_fetches_burst: f32,
    /// A device is told (`keys_low`) when a fetch leaves it fewer one-time prekeys than this.
    pub prekeys_low_threshold: u32,
    /// Most members of a group (at most 4096).
    pub group_members_max: usize,
    /// How long a shard trusts a group's member list it loaded without hearing
    /// of a change (changes are also announced to every shard and node).
    pub group_cache_ms: u64,
    /// Receipts for one sender and conversation are batched over this window.
    pub receipt_window_ms: u64,
    /// Presence is written this often (online users refreshed, departures
    /// recorded); a node that stops writing shows its users offline after 2.5×.
    pub presence_interval_ms: u64,
    /// Each connected device is told to storage as seen this often (and when
    /// it connects and leaves), so the writer's `--device-retention-ms`
    /// (120 days) never removes the rows of a device that stays connected.
    pub device_seen_interval_ms: u64,
    /// `presence` requests per second per user, across devices (token bucket rate).
    pub presence_per_s: f32,
    /// `presence` requests a user may send at once.
    pub presence_burst: f32,
    /// Window over which a draining node spreads its 1012 closes.
    pub drain_window_ms: u64,
    /// How long to wait for a client's close reply before dropping the socket.
    pub close_grace_ms: u64,
    /// Where the shards' ring files and the writer's socket live; empty means
    /// `<data_dir>/rings`. Both processes must reach it (tmpfs is best).
    pub ring_dir: PathBuf,
    /// Bytes of each shard's ring: a power of two from 64 KiB to 1 GiB.
    pub ring_bytes: u64,
    pub storage_writer: WriterMode,
    /// The storage-writer binary to spawn; empty means the one next to this binary.
    pub storage_writer_path: PathBuf,
    /// Extra arguments for a spawned storage-writer (its backend, for example).
    pub storage_writer_args: Vec<String>,
    /// How long a read from storage may take before the client gets `unavailable`.
    pub storage_timeout_ms: u64,
    /// Messages per sync page read from storage.
    pub sync_page_messages: u16,
    /// Most messages one sync sends; past it, `synced` says `more`.
    pub sync_messages_max: u32,
    /// A device's recent sends loaded when it connects, so a retry after a
    /// gateway restart gets its first message id.
    pub idempotency_warm_max: u16,
    /// NATS server of the backplane (e.g. `nats://127.0.0.1:4222`); empty
    /// means a single node with no cross-node delivery.
    pub nats_url: String,
    /// Subject prefix on NATS (fleets sharing one NATS use different ones).
    pub nats_subject_prefix: String,
    /// Slots in each shard's queue to the backplane thread.
    pub backplane_queue_capacity: usize,
    /// When the backplane comes back, devices resync at random moments within this window.
    pub resync_window_ms: u64,
    /// How often a fleet node says it is live on NATS; unheard for three
    /// intervals, it leaves every node's membership and its users' homes move.
    pub membership_heartbeat_ms: u64,
    /// Where clients reach this node from outside (`ws://` or `wss://` URL),
    /// advertised to the fleet: a device that connects to another node is
    /// told in `hello` to reconnect here if this is its user's home. Empty:
    /// not advertised (devices are served wherever they land).
    pub public_url: String,
    /// Serve the browser chat client at `/` on the client listener.
    pub web_client: bool,
    /// Development only: `/dev/sign-in` mints a token for any user name, so
    /// anyone who reaches the listener can sign in as anyone. Off by default.
    pub dev_sign_in: bool,
    /// PEM certificate chain (leaf first) for `wss://` on `listen`; with
    /// `tls_key`, the listener speaks only TLS. Empty: plain `ws://`.
    /// SIGHUP reads both files again.
    pub tls_cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `tls_cert`.
    pub tls_key: PathBuf,
    /// Accept Web Push endpoints that are plain `http://` on a loopback
    /// host (a push service run locally for development or tests). Off:
    /// endpoints must be `https://`.
    pub push_loopback_endpoints: bool,
    /// Test only: `/echo` upgrades without a token and echoes every message
    /// (for the Autobahn conformance run). Never on a node anyone else reaches.
    pub echo_endpoint: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".parse().expect("literal"),
            admin_listen: "127.0.0.1:9090".parse().expect("literal"),
            data_dir: PathBuf::from("data"),
            shards: 0,
            node_id: 0,
            node_id_lease: true,
            node_id_lease_ttl_ms: 15_000,
            node_id_lease_replicas: 1,
            io_driver: IoDriver::Auto,
            pin_shards: true,
            io_uring_entries: 4096,
            io_uring_task_run: IoUringTaskRun::Coop,
            auth_secret: None,
            admin_token: None,
            connections_max: 0,
            handshake_timeout_ms: 5_000,
            handshake_bytes_max: 8 * 1024,
            heartbeat_interval_ms: 30_000,
            heartbeat_timeout_ms: 90_000,
            message_bytes_max: 96 * 1024,
            body_bytes_max: 64 * 1024,
            send_queue_bytes_max: 1024 * 1024,
            socket_send_buffer_bytes: 0,
            cross_shard_queue_capacity: 8 * 1024,
            idempotency_window_ms: 24 * 60 * 60 * 1000,
            delete_window_ms: 2 * 24 * 60 * 60 * 1000,
            idempotency_entries_max: 256 * 1024,
            protocol_errors_max: 20,
            frames_per_s: 100.0,
            frames_burst: 300.0,
            sends_per_s: 20.0,
            sends_burst: 100.0,
            sent_wait_ms_max: 50,
            storage_stall_ms_max: 5_000,
            devices_per_user_max: DEVICES_PER_USER_MAX,
            typing_per_s: 1.0,
            typing_burst: 5.0,
            typing_expires_ms: 5_000,
            prekey_fetches_per_s: 2.0,
            prekey_fetches_burst: 10.0,
            prekeys_low_threshold: 10,
            group_members_max: 1024,
            group_cache_ms: 5_000,
            receipt_window_ms: 1_000,
            presence_interval_ms: 30_000,
            device_seen_interval_ms: 6 * 60 * 60 * 1000,
            presence_per_s: 2.0,
            presence_burst: 10.0,
            drain_window_ms: 60_000,
            close_grace_ms: 1_000,
            ring_dir: PathBuf::new(),
            ring_bytes: 64 * 1024 * 1024,
            storage_writer: WriterMode::Spawn,
            storage_writer_path: PathBuf::new(),
            storage_writer_args: Vec::new(),
            storage_timeout_ms: 5_000,
            sync_page_messages: 200,
            sync_messages_max: 10_000,
            idempotency_warm_max: 256,
            nats_url: String::new(),
            nats_subject_prefix: "chat".into(),
            backplane_queue_capacity: 64 * 1024,
            resync_window_ms: 2_000,
            membership_heartbeat_ms: 1_000,
            public_url: String::new(),
            web_client: true,
            dev_sign_in: false,
            tls_cert: PathBuf::new(),
            tls_key: PathBuf::new(),
            push_loopback_endpoints: false,
            echo_endpoint: false,
        }
    }
}

/// Declares the command-line overrides: one optional flag per config field.
macro_rules! overrides {
    ($($(#[$meta:meta])* $field:ident: $ty:ty),* $(,)?) => {
        /// Every config field as a flag; a flag wins over the file.
        #[derive(Debug, Default, Clone, clap::Args)]
        pub struct Overrides {
            $($(#[$meta])* #[arg(long)] pub $field: Option<$ty>,)*
        }

        impl Overrides {
            pub fn apply(&self, config: &mut Config) {
                $(if let Some(value) = &self.$field { config.$field = value.clone(); })*
            }
        }
    };
}

overrides! {
    listen: SocketAddr,
    admin_listen: SocketAddr,
    data_dir: PathBuf,
    shards: usize,
    node_id: u16,
    node_id_lease: bool,
    node_id_lease_ttl_ms: u64,
    node_id_lease_replicas: usize,
    #[arg(value_enum)]
    io_driver: IoDriver,
    pin_shards: bool,
    io_uring_entries: u32,
    #[arg(value_enum)]
    io_uring_task_run: IoUringTaskRun,
    connections_max: usize,
    handshake_timeout_ms: u64,
    handshake_bytes_max: usize,
    heartbeat_interval_ms: u64,
    heartbeat_timeout_ms: u64,
    message_bytes_max: usize,
    body_bytes_max: usize,
    send_queue_bytes_max: usize,
    socket_send_buffer_bytes: usize,
    cross_shard_queue_capacity: usize,
    idempotency_window_ms: u64,
    delete_window_ms: u64,
    idempotency_entries_max: usize,
    protocol_errors_max: u32,
    frames_per_s: f32,
    frames_burst: f32,
    sends_per_s: f32,
    sends_burst: f32,
    sent_wait_ms_max: u64,
    storage_stall_ms_max: u64,
    devices_per_user_max: usize,
    typing_per_s: f32,
    typing_burst: f32,
    typing_expires_ms: u64,
    prekey_fetches_per_s: f32,
    prekey_fetches_burst: f32,
    prekeys_low_threshold: u32,
    group_members_max: usize,
    group_cache_ms: u64,
    receipt_window_ms: u64,
    presence_interval_ms: u64,
    device_seen_interval_ms: u64,
    presence_per_s: f32,
    presence_burst: f32,
    drain_window_ms: u64,
    close_grace_ms: u64,
    ring_dir: PathBuf,
    ring_bytes: u64,
    #[arg(value_enum)]
    storage_writer: WriterMode,
    storage_writer_path: PathBuf,
    storage_timeout_ms: u64,
    sync_page_messages: u16,
    sync_messages_max: u32,
    idempotency_warm_max: u16,
    nats_url: String,
    nats_subject_prefix: String,
    backplane_queue_capacity: usize,
    resync_window_ms: u64,
    membership_heartbeat_ms: u64,
    public_url: String,
    web_client: bool,
    dev_sign_in: bool,
    tls_cert: PathBuf,
    tls_key: PathBuf,
    push_loopback_endpoints: bool,
    echo_endpoint: bool,
}

/// The `--config` file and the flags over it.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct ConfigArgs {
    /// TOML config file; flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// HS256 token secret (at least 32 bytes).
    #[arg(long, env = "GATEWAY_AUTH_SECRET", hide_env_values = true)]
    pub auth_secret: Option<String>,
    /// Bearer token for the admin API's write calls (at least 32 bytes).
    #[arg(long, env = "GATEWAY_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// An argument for a spawned storage-writer (repeat for several); added
    /// after the file's `storage_writer_args`.
    #[arg(long = "storage-writer-arg", allow_hyphen_values = true)]
    pub storage_writer_args: Vec<String>,
    #[command(flatten)]
    pub overrides: Overrides,
}

impl ConfigArgs {
    /// Defaults, then the file, then the environment and flags; then checked.
    pub fn load(&self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => read_file(path)?,
            None => Config::default(),
        };
        self.overrides.apply(&mut config);
        if let Some(secret) = &self.auth_secret {
            config.auth_secret = Some(secret.clone());
        }
        if let Some(token) = &self.admin_token {
            config.admin_token = Some(token.clone());
        }
        config
            .storage_writer_args
            .extend(self.storage_writer_args.iter().cloned());
        if config.ring_dir.as_os_str().is_empty() {
            config.ring_dir = config.data_dir.join("rings");
        }
        if config.shards == 0 {
            // One shard per core, up to what message ids can name (a bigger
            // machine runs a second process; see `docs/operations.md`).
            let shard_limit = usize::from(chat_protocol::snowflake::SHARD_ID_MAX) + 1;
            config.shards = std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .min(shard_limit);
        }
        config.validate()?;
        Ok(config)
    }
}

fn read_file(path: &Path) -> anyhow::Result<Config> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing config {}", path.display()))
}

impl Config {
    /// How long the gateway waits for storage to delete an account: the
    /// writer first lets every record already in its rings commit (up to
    /// 10 s), then removes the rows, so a few storage timeouts.
    pub fn account_deletion_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.storage_timeout_ms.saturating_mul(4))
    }

    /// Whether the client listener speaks TLS.
    pub fn tls(&self) -> bool {
        !self.tls_cert.as_os_str().is_empty()
    }

    /// Whether this node leases its id from NATS (a fleet member with leases on).
    pub fn leases_node_id(&self) -> bool {
        !self.nats_url.is_empty() && self.node_id_lease
    }

    /// Refuses combinations that cannot work, at start-up rather than at run time.
    pub fn validate(&self) -> anyhow::Result<()> {
        let group_limit = chat_protocol::records::RECIPIENTS_MAX;
        if self.group_members_max < 2 || self.group_members_max > group_limit {
            bail!("group_members_max must be 2-{group_limit}");
        }
        if self.receipt_window_ms == 0 || self.presence_interval_ms < 100 {
            bail!("receipt_window_ms must be > 0 and presence_interval_ms >= 100");
        }
        if self.device_seen_interval_ms < 1_000 {
            bail!("device_seen_interval_ms must be at least 1000");
        }
        let shard_limit = usize::from(chat_protocol::snowflake::SHARD_ID_MAX) + 1;
        if self.shards == 0 || self.shards > shard_limit {
            bail!(
                "shards must be 1-{shard_limit} (message ids have {} shard bits), got {}",
                chat_protocol::snowflake::SHARD_BITS,
                self.shards
            );
        }
        if self.node_id > chat_protocol::snowflake::NODE_ID_MAX {
            bail!(
                "node_id must be 0-{}, got {}",
                chat_protocol::snowflake::NODE_ID_MAX,
                self.node_id
            );
        }
        if self.devices_per_user_max == 0 || self.devices_per_user_max > DEVICES_PER_USER_MAX {
            bail!("devices_per_user_max must be 1-{DEVICES_PER_USER_MAX} (a per-device send carries at most {} ciphertexts, for both users' devices)", chat_protocol::limits::BODIES_DEVICES_MAX);
        }
        if !self.public_url.is_empty()
            && (!(self.public_url.starts_with("ws://") || self.public_url.starts_with("wss://"))
                || self.public_url.len() > backplane_bridge::envelope::URL_BYTES_MAX
                || self
                    .public_url
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control()))
        {
            bail!(
                "public_url must be a ws:// or wss:// URL of at most {} bytes",
                backplane_bridge::envelope::URL_BYTES_MAX
            );
        }
        if self.tls_cert.as_os_str().is_empty() != self.tls_key.as_os_str().is_empty() {
            bail!("tls_cert and tls_key go together: set both for wss://, or neither for ws://");
        }
        if !(100..=60_000).contains(&self.membership_heartbeat_ms) {
            bail!("membership_heartbeat_ms must be 100-60000");
        }
        if !(1..=5).contains(&self.node_id_lease_replicas) {
            bail!("node_id_lease_replicas must be 1-5 (JetStream's limit)");
        }
        if !self.nats_url.is_empty() {
            if let Err(error) = backplane_bridge::server_addrs(&self.nats_url) {
                bail!("nats_url: {error}");
            }
        }
        if self.node_id_lease_ttl_ms < 3_000 {
            bail!("node_id_lease_ttl_ms must be at least 3000 (it is refreshed every third)");
        }
        if self.heartbeat_timeout_ms <= self.heartbeat_interval_ms {
            bail!("heartbeat_timeout_ms must exceed heartbeat_interval_ms");
        }
        if self.body_bytes_max + 1024 > self.message_bytes_max {
            bail!("message_bytes_max must leave at least 1 KiB of room above body_bytes_max for the JSON envelope");
        }
        if self.send_queue_bytes_max < self.message_bytes_max {
            bail!("send_queue_bytes_max must hold at least one message_bytes_max message");
        }
        if !(1..=32_768).contains(&self.io_uring_entries) {
            bail!(
                "io_uring_entries must be 1-32768 (the kernel's limit), got {}",
                self.io_uring_entries
            );
        }
        if self.send_queue_bytes_max > u32::MAX as usize {
            bail!("send_queue_bytes_max must be below 4 GiB");
        }
        for (name, value) in [
            ("frames_per_s", self.frames_per_s),
            ("frames_burst", self.frames_burst),
            ("sends_per_s", self.sends_per_s),
            ("sends_burst", self.sends_burst),
            ("typing_per_s", self.typing_per_s),
            ("typing_burst", self.typing_burst),
            ("prekey_fetches_per_s", self.prekey_fetches_per_s),
            ("prekey_fetches_burst", self.prekey_fetches_burst),
        ] {
            if !(value.is_finite() && value >= 1.0) {
                bail!("{name} must be at least 1");
            }
        }
        if self.cross_shard_queue_capacity < 16 {
            bail!("cross_shard_queue_capacity must be at least 16");
        }
        if self.handshake_bytes_max < 512 {
            bail!("handshake_bytes_max must be at least 512");
        }
        if !self.ring_bytes.is_power_of_two()
            || !(chat_ring::CAPACITY_BYTES_MIN..=chat_ring::CAPACITY_BYTES_MAX)
                .contains(&self.ring_bytes)
        {
            bail!("ring_bytes must be a power of two from 64 KiB to 1 GiB");
        }
        // A ring must hold a few of the largest records (a body plus its ids).
        if self.ring_bytes < 4 * (self.body_bytes_max as u64 + 2048) {
            bail!("ring_bytes must hold at least four messages of body_bytes_max");
        }
        if self.backplane_queue_capacity < 16 {
            bail!("backplane_queue_capacity must be at least 16");
        }
        if !self.nats_subject_prefix.is_empty()
            && !self
                .nats_subject_prefix
                .split('.')
                .all(chat_protocol::ids::is_valid_id)
        {
            bail!("nats_subject_prefix must be dot-separated ids");
        }
        if self.sync_page_messages == 0 || self.sync_messages_max == 0 {
            bail!("sync_page_messages and sync_messages_max must be at least 1");
        }
        if let Some(secret) = &self.auth_secret {
            if secret.len() < 32 {
                bail!("auth_secret must be at least 32 bytes (HS256 keys shorter than the hash are weak)");
            }
        }
        if self
            .admin_token
            .as_ref()
            .is_some_and(|token| token.len() < 32)
        {
            bail!("admin_token must be at least 32 bytes");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_per_user_max_fits_a_per_device_send() {
        let mut config: Config = toml::from_str("shards = 1\n").unwrap();
        config.devices_per_user_max = DEVICES_PER_USER_MAX;
        config.validate().unwrap();
        config.devices_per_user_max = DEVICES_PER_USER_MAX + 1;
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("devices_per_user_max"), "{error}");
        config.devices_per_user_max = 0;
        assert!(config.validate().is_err());
    }

    #[test]
    fn defaults_are_valid_once_shards_are_resolved() {
        let config = Config {
            shards: 2,
            ..Config::default()
        };
        config.validate().unwrap();
    }

    #[test]
    fn unknown_fields_in_the_file_are_refused() {
        let error =
            toml::from_str::<Config>("listen = \"127.0.0.1:1\"\nlisten_typo = 3\n").unwrap_err();
        assert!(error.to_string().contains("unknown field"), "{error}");
    }

    #[test]
    fn flags_override_the_file() {
        let mut config: Config = toml::from_str("shards = 3\nnode_id = 7\n").unwrap();
        Overrides {
            shards: Some(1),
            ..Overrides::default()
        }
        .apply(&mut config);
        assert_eq!((config.shards, config.node_id), (1, 7));
    }

    #[test]
    fn bad_combinations_are_refused() {
        let short_secret = Config {
            shards: 1,
            auth_secret: Some("short".into()),
            ..Config::default()
        };
        assert!(short_secret.validate().is_err());
        let too_many_shards = Config {
            shards: 65,
            ..Config::default()
        };
        assert!(too_many_shards.validate().is_err());
        let heartbeat = Config {
            shards: 1,
            heartbeat_timeout_ms: 10,
            heartbeat_interval_ms: 10,
            ..Config::default()
        };
        assert!(heartbeat.validate().is_err());
        let ring = Config {
            shards: 1,
            io_uring_entries: 65_536,
            ..Config::default()
        };
        assert!(ring
            .validate()
            .unwrap_err()
            .to_string()
            .contains("io_uring_entries"));
        let rate = Config {
            shards: 1,
            sends_per_s: 0.0,
            ..Config::default()
        };
        assert!(rate
            .validate()
            .unwrap_err()
            .to_string()
            .contains("sends_per_s"));
    }
}
