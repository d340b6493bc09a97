//! The push counters behind `storage_writer_push_*`, per provider and
//! failure reason.
//!
//! Owns the provider and failure names and the counters (relaxed atomics,
//! written by the worker and the sender, read by the metrics endpoint).
//! Never decides anything.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

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
