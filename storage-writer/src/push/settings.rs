//! The push settings (the writer's `--push-*` flags) and what the commit
//! thread hands the worker.
//!
//! Owns the flags, the acknowledgement wait, and `Candidate`. Never holds a
//! credential's contents: the flags name files.

use std::path::PathBuf;
use std::time::{Duration, Instant};

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

/// The window after which a waiting message counts as not delivered.
pub fn ack_wait(args: &PushArgs) -> Duration {
    Duration::from_millis(args.push_ack_wait_ms)
}
