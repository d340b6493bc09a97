//! Counters of the writer's work, for logs and the `bench` subcommand.
//!
//! Owns batch counts, record counts, a power-of-two histogram of batch sizes
//! and the time spent committing. Written by the commit thread only
//! (relaxed atomics), read by anyone. Never allocates after start.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Batch-size buckets: 1, 2-3, 4-7, ... , 65,536 and more.
pub const SIZE_BUCKETS: usize = 17;

#[derive(Default)]
pub struct Stats {
    pub batches: AtomicU64,
    pub records: AtomicU64,
    pub commit_ns: AtomicU64,
    /// Attempts at a batch that failed (it is retried).
    pub commit_failures: AtomicU64,
    /// Idempotency keys removed after their window (`cleanup`).
    pub expired_sends: AtomicU64,
    /// Offline presence rows removed after `--presence-retention-ms`.
    pub expired_presence: AtomicU64,
    /// Devices removed (with their per-device rows) after `--device-retention-ms`.
    pub expired_devices: AtomicU64,
    /// Message rows and inbox entries removed after `--message-retention-ms`.
    pub expired_messages: AtomicU64,
    /// Bytes given back at once by retention (PostgreSQL partitions dropped).
    pub reclaimed_bytes: AtomicU64,
    /// Partitions created ahead (PostgreSQL).
    pub partitions_created: AtomicU64,
    /// Cleanup passes made.
    pub cleanup_runs: AtomicU64,
    /// When a pass last found nothing old left (unix seconds; 0: never):
    /// the cleanup's lag is now minus this.
    pub cleanup_caught_up_unix_s: AtomicU64,
    pub sizes: [AtomicU64; SIZE_BUCKETS],
    /// How long each batch took to commit (apply, write, fsync).
    pub commit_time: Histogram,
}

impl Stats {
    pub fn batch(&self, records: usize, took: Duration) {
        self.batches.fetch_add(1, Relaxed);
        self.records.fetch_add(records as u64, Relaxed);
        self.commit_ns.fetch_add(took.as_nanos() as u64, Relaxed);
        self.commit_time.record(took);
        if records > 0 {
            let bucket = (usize::BITS - 1 - records.leading_zeros()) as usize;
            self.sizes[bucket.min(SIZE_BUCKETS - 1)].fetch_add(1, Relaxed);
        }
    }

    pub fn commit_failed(&self) {
        self.commit_failures.fetch_add(1, Relaxed);
    }

    /// "1:12 2-3:40 ..." for the non-empty buckets.
    pub fn size_histogram(&self) -> String {
        let mut out = Vec::new();
        for (bucket, count) in self.sizes.iter().enumerate() {
            let count = count.load(Relaxed);
            if count == 0 {
                continue;
            }
            let low = 1u64 << bucket;
            let label = if bucket == 0 {
                "1".to_owned()
            } else if bucket == SIZE_BUCKETS - 1 {
                format!("{low}+")
            } else {
                format!("{low}-{}", (low << 1) - 1)
            };
            out.push(format!("{label}:{count}"));
        }
        out.join(" ")
    }
}

/// Upper bounds of `Histogram`'s buckets, in milliseconds (one more bucket
/// above the last: +Inf).
pub const LATENCY_BOUNDS_MS: [u64; 20] = [
    1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 75, 100, 150, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000,
];

/// A latency histogram with fixed buckets, Prometheus-style (cumulative when
/// rendered). Any thread may record; relaxed atomics.
#[derive(Default)]
pub struct Histogram {
    pub buckets: [AtomicU64; LATENCY_BOUNDS_MS.len() + 1],
    pub sum_us: AtomicU64,
}

impl Histogram {
    pub fn record(&self, took: Duration) {
        let ms = took.as_millis() as u64;
        let bucket = LATENCY_BOUNDS_MS.partition_point(|bound| *bound < ms);
        self.buckets[bucket].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(took.as_micros() as u64, Relaxed);
    }

    /// `name_bucket{labels,le=...}`, `_sum` and `_count` lines.
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        use std::fmt::Write;
        let mut cumulative = 0;
        for (index, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Relaxed);
            let le = LATENCY_BOUNDS_MS
                .get(index)
                .map_or("+Inf".to_owned(), |ms| format!("{}", *ms as f64 / 1000.0));
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{}le=\"{le}\"}} {cumulative}",
                if labels.is_empty() { "" } else { "," }
            );
        }
        let sum = self.sum_us.load(Relaxed) as f64 / 1e6;
        let labels = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(
            out,
            "{name}_sum{labels} {sum}\n{name}_count{labels} {cumulative}"
        );
    }

    /// "≤1ms:40 ≤2ms:3 ... >30000ms:0" for the non-empty buckets.
    pub fn summary(&self) -> String {
        let mut out = Vec::new();
        for (index, bucket) in self.buckets.iter().enumerate() {
            let count = bucket.load(Relaxed);
            if count == 0 {
                continue;
            }
            out.push(match LATENCY_BOUNDS_MS.get(index) {
                Some(ms) => format!("<={ms}ms:{count}"),
                None => format!(">{}ms:{count}", LATENCY_BOUNDS_MS[index - 1]),
            });
        }
        out.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_land_in_power_of_two_buckets() {
        let stats = Stats::default();
        for records in [1, 2, 3, 4, 1000, 1 << 20] {
            stats.batch(records, Duration::from_micros(5));
        }
        assert_eq!(
            stats.records.load(Relaxed),
            1 + 2 + 3 + 4 + 1000 + (1 << 20)
        );
        assert_eq!(
            stats.size_histogram(),
            "1:1 2-3:2 4-7:1 512-1023:1 65536+:1"
        );
    }
}
