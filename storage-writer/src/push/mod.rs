//! Push for devices that are not connected: after a message is durable,
//! each recipient device with a push target that has not acknowledged it
//! within `ack_wait` is woken through APNs, FCM or Web Push.
//!
//! Owns the push settings, the bounded hand-off from the commit thread
//! (`PushHandle::offer`: never blocks, a full queue is counted), and the
//! per-provider counters. The deciding (`worker.rs`: waits, checks
//! acknowledgements, coalesces, prunes) runs on its own thread with its own
//! storage handle; the sending (`send.rs` and one file per provider) on its
//! own thread's async runtime. Neither ever touches the commit path beyond
//! the offer, and no credential is ever logged.

mod apns;
mod fcm;
mod job;
mod send;
mod webpush;
mod worker;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chat_protocol::records::MessageRecord;

use crate::store::Backend;

/// The push flags of the storage-writer (credentials are files, never values).
#[derive(Debug, Clone, clap::Args)]
pub struct PushArgs {
    /// Web Push: the VAPID private key (PEM, P-256), RFC 8292.
    #[arg(long)]
    pub push_vapid_key: Option<PathBuf>,
    /// Web Push: the VAPID contact (`mailto:` or `https:` URL) push services see.
    #[arg(long, default_value = "mailto:push@localhost")]
    pub push_vapid_subject: String,
    /// APNs: the token-signing key from Apple (`AuthKey_<id>.p8`).
    #[arg(long)]
    pub push_apns_key: Option<PathBuf>,
    /// APNs: the key's id (10 characters, from the Apple developer account).
    #[arg(long, default_value = "")]
    pub push_apns_key_id: String,
    /// APNs: the developer team id.
    #[arg(long, default_value = "")]
    pub push_apns_team_id: String,
    /// APNs: base URL for production tokens.
    #[arg(long, default_value = "https://api.push.apple.com")]
    pub push_apns_url: String,
    /// APNs: base URL for sandbox (development) tokens.
    #[arg(long, default_value = "https://api.sandbox.push.apple.com")]
    pub push_apns_sandbox_url: String,
    /// FCM: the service-account key file (JSON) of the Firebase project.
    #[arg(long)]
    pub push_fcm_service_account: Option<PathBuf>,
    /// FCM: base URL of the HTTP v1 API.
    #[arg(long, default_value = "https://fcm.googleapis.com")]
    pub push_fcm_url: String,
    /// Extra CA certificates (PEM) to trust for push endpoints, besides the
    /// web's roots: a proxy in front of the providers, or a test stand-in.
    #[arg(long)]
    pub push_ca_file: Option<PathBuf>,
    /// How long a connected device has to acknowledge a message before it
    /// counts as not delivered and is pushed.
    #[arg(long, default_value_t = 2_000)]
    pub push_ack_wait_ms: u64,
    /// At most one push per device per this window; messages within it are
    /// one notification with their count.
    #[arg(long, default_value_t = 10_000)]
    pub push_coalesce_ms: u64,
    /// How long the providers keep an undelivered push (TTL, apns-expiration).
    #[arg(long, default_value_t = 86_400)]
    pub push_ttl_s: u64,
    /// Put the sender and conversation ids in the notification (the push
    /// services see them). Off: the payload says only how many messages wait.
    #[arg(long, default_value_t = false)]
    pub push_include_sender: bool,
    /// Messages waiting to be checked for push, at most (beyond: counted, dropped).
    #[arg(long, default_value_t = 65_536)]
    pub push_queue: usize,
    /// Push requests in flight at once, over all providers.
    #[arg(long, default_value_t = 256)]
    pub push_in_flight: usize,
}

impl PushArgs {
    pub fn enabled(&self) -> bool {
        self.push_vapid_key.is_some()
            || self.push_apns_key.is_some()
            || self.push_fcm_service_account.is_some()
    }
}

/// A recipient of a durable message, to be checked for push once the
/// connected devices have had `ack_wait` to acknowledge it.
#[derive(Debug)]
pub struct Candidate {
    pub user: String,
    pub from: String,
    pub message_id: u64,
    pub durable_at: Instant,
}

/// The providers, in the order of the counters' index.
pub const PROVIDERS: [&str; 3] = ["apns", "fcm", "webpush"];

pub fn provider_index(kind: &str) -> usize {
    PROVIDERS.iter().position(|p| *p == kind).unwrap_or(0)
}

/// Why a push failed, for `storage_writer_push_failed_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The provider said the target is gone (it is pruned).
    Invalid,
    /// 429 after the retries.
    RateLimited,
    /// 5xx or no answer after the retries.
    Unavailable,
    /// Our credentials were refused (a configuration problem).
    Auth,
    /// Any other refusal (a bad request: a bug or a bad target).
    Refused,
    /// The target's provider is not configured on this writer.
    NotConfigured,
}

pub const FAILURES: [(&str, Failure); 6] = [
    ("invalid_target", Failure::Invalid),
    ("rate_limited", Failure::RateLimited),
    ("unavailable", Failure::Unavailable),
    ("auth", Failure::Auth),
    ("refused", Failure::Refused),
    ("not_configured", Failure::NotConfigured),
];

#[derive(Default)]
pub struct ProviderStats {
    pub sent: AtomicU64,
    pub failed: [AtomicU64; FAILURES.len()],
    pub pruned: AtomicU64,
    pub retries: AtomicU64,
    /// Durable to the request leaving, summed and counted (mean), and by bucket.
    pub latency: crate::stats::Histogram,
}

/// Counters the metrics endpoint shows.
#[derive(Default)]
pub struct PushStats {
    pub providers: [ProviderStats; PROVIDERS.len()],
    /// Recipients offered by the commit thread, and dropped on a full queue.
    pub offered: AtomicU64,
    pub dropped: AtomicU64,
    /// Devices whose push waits for the coalescing window, and coalesced messages.
    pub pending: AtomicU64,
    pub coalesced: AtomicU64,
    /// Checks that found the message acknowledged (no push needed).
    pub acknowledged: AtomicU64,
    /// Candidates in the queue, and push requests in flight.
    pub queue_depth: AtomicU64,
    pub in_flight: AtomicU64,
}

impl PushStats {
    pub fn failed(&self, kind: &str, failure: Failure) {
        let index = FAILURES
            .iter()
            .position(|(_, f)| *f == failure)
            .expect("every failure is listed");
        self.providers[provider_index(kind)].failed[index].fetch_add(1, Relaxed);
    }
}

/// The commit thread's end: offers recipients of durable messages.
pub struct PushHandle {
    queue: crossbeam_channel::Sender<Candidate>,
    pub stats: Arc<PushStats>,
}

impl PushHandle {
    /// Offers every recipient of `message` except its sender (whose own
    /// devices are never pushed for it). Only messages people wrote: no
    /// receipts, no membership changes. Never blocks.
    pub fn offer(&self, message: &MessageRecord<'_>) {
        if message.event.is_some() {
            return;
        }
        let durable_at = Instant::now();
        let recipients = crate::store::inbox_targets(message);
        for (user, _) in recipients.iter().filter(|(user, _)| *user != message.from) {
            self.stats.offered.fetch_add(1, Relaxed);
            let candidate = Candidate {
                user: (*user).to_owned(),
                from: message.from.to_owned(),
                message_id: message.message_id,
                durable_at,
            };
            match self.queue.try_send(candidate) {
                Ok(()) => {
                    self.stats.queue_depth.fetch_add(1, Relaxed);
                }
                Err(_) => {
                    self.stats.dropped.fetch_add(1, Relaxed);
                }
            }
        }
    }
}

/// Starts the push worker and sender when any provider is configured.
pub fn start(args: &PushArgs, backend: Arc<dyn Backend>) -> Result<Option<PushHandle>> {
    if !args.enabled() {
        return Ok(None);
    }
    let stats = Arc::new(PushStats::default());
    let providers = send::Providers::load(args).context("loading push credentials")?;
    let (queue, candidates) = crossbeam_channel::bounded(args.push_queue.max(1));
    let sender = send::start(providers, args, stats.clone())?;
    let worker = worker::Worker::new(
        args,
        backend
            .reader()
            .context("a storage handle for the push worker")?,
        candidates,
        sender,
        stats.clone(),
    );
    std::thread::Builder::new()
        .name("push".into())
        .spawn(move || worker.run())?;
    tracing::info!(
        ack_wait_ms = args.push_ack_wait_ms,
        coalesce_ms = args.push_coalesce_ms,
        "push enabled"
    );
    Ok(Some(PushHandle { queue, stats }))
}

/// The window after which a waiting message counts as not delivered.
fn ack_wait(args: &PushArgs) -> Duration {
    Duration::from_millis(args.push_ack_wait_ms)
}
