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
    pub sizes: [AtomicU64; SIZE_BUCKETS],
}

impl Stats {
    pub fn batch(&self, records: usize, took: Duration) {
        self.batches.fetch_add(1, Relaxed);
        self.records.fetch_add(records as u64, Relaxed);
        self.commit_ns.fetch_add(took.as_nanos() as u64, Relaxed);
        if records > 0 {
            let bucket = (usize::BITS - 1 - records.leading_zeros()) as usize;
            self.sizes[bucket.min(SIZE_BUCKETS - 1)].fetch_add(1, Relaxed);
        }
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
