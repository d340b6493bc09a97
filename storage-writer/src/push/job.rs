//! What a push is on its way out and what a provider said about it: the
//! types the sender and every provider share, and the answers all providers
//! read the same way (429 and 5xx, `Retry-After`), and the alert's text.
//!
//! Owns no I/O. Imported by `send.rs` and each provider's file, never the
//! other way round.

use std::time::{Duration, Instant};

use chat_protocol::push::{PushPayload, PushTarget};

use super::stats::Failure;

/// One push to one device.
pub struct Job {
    pub user: String,
    pub device: String,
    /// The target as stored (a prune removes it only if it is still this).
    pub stored: Vec<u8>,
    pub target: PushTarget,
    pub payload: PushPayload,
    /// The same for every push about one conversation (the newest replaces
    /// the older at the provider).
    pub collapse: String,
    pub durable_at: Instant,
}

/// What a provider said about one push.
pub enum Outcome {
    Sent,
    /// The target is gone: remove it.
    Invalid,
    /// Try again after the given time (or a back-off); the failure if the
    /// tries run out.
    Retry(Option<Duration>, Failure),
    /// Our credential was refused; a fresh one is tried once.
    Auth,
    /// A refusal that no retry changes.
    Refused,
    /// This writer has no credential for the target's provider.
    NotConfigured,
}

/// `Retry-After` in seconds (the form every provider here uses).
pub fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    response
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// The outcome of a 429 or 5xx answer: retry, when the provider says.
pub fn transient(response: &reqwest::Response) -> Outcome {
    let failure = if response.status() == reqwest::StatusCode::TOO_MANY_REQUESTS {
        Failure::RateLimited
    } else {
        Failure::Unavailable
    };
    Outcome::Retry(retry_after(response), failure)
}

/// The notification's text: content-free.
pub fn alert_text(count: u32) -> String {
    if count == 1 {
        "New message".to_owned()
    } else {
        format!("{count} new messages")
    }
}
