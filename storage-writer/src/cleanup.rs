//! The cleanup thread: removes what only served a window, off the commit
//! path: messages and their inbox entries older than
//! `--message-retention-ms` (hot retention; PostgreSQL and the embedded
//! store drop whole time partitions or windows, which this thread also
//! creates ahead), idempotency keys
//! older than `--idempotency-window-ms` (a retry after the window is a new
//! message, as documented), presence rows of users offline longer than
//! `--presence-retention-ms` (their "last seen" is then unknown) and the
//! per-device rows of devices not seen for `--device-retention-ms` (on
//! ScyllaDB through the time buckets of `devices_by_seen`); ScyllaDB's
//! other rows expire by their TTL.
//!
//! Owns its own writer handle (so it never holds up a commit), a pass every
//! `--cleanup-interval-s` in batches of `CLEANUP_BATCH_ROWS` until nothing
//! old is left, and the counters `storage_writer_expired_total`,
//! `storage_writer_reclaimed_bytes_total`,
//! `storage_writer_partitions_created_total`,
//! `storage_writer_cleanup_runs_total` and the gauge
//! `storage_writer_cleanup_caught_up_unix_seconds`. Never removes a row its
//! window still needs, and never retries a failed pass sooner than the next one.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_protocol::snowflake;

use crate::stats::Stats;
use crate::store::{Backend, BatchWriter, Expired, Tables};

/// Rows one cleanup batch removes at most (one short transaction each).
const CLEANUP_BATCH_ROWS: usize = 10_000;
/// How often the thread looks at the stop flag while it waits.
const STOP_CHECK: Duration = Duration::from_millis(100);

pub struct Cleanup {
    pub backend: Arc<dyn Backend>,
    pub idempotency_window: Duration,
    /// Offline presence rows last seen longer ago are removed (zero: kept).
    pub presence_retention: Duration,
    /// Devices not seen for longer lose their per-device rows (zero: kept).
    pub device_retention: Duration,
    /// Messages made longer ago are removed (`None`: kept).
    pub message_retention: Option<Duration>,
    pub interval: Duration,
    pub stats: Arc<Stats>,
    pub stop: Arc<AtomicBool>,
}

impl Cleanup {
    pub fn spawn(self) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("cleanup".into())
            .spawn(move || self.run())
    }

    fn run(self) {
        let mut writer: Option<Box<dyn BatchWriter>> = None;
        loop {
            let next = Instant::now() + self.interval;
            while Instant::now() < next {
                if self.stop.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(STOP_CHECK.min(self.interval));
            }
            let handle = match writer.take() {
                Some(handle) => handle,
                None => match self.backend.writer() {
                    Ok(handle) => handle,
                    Err(error) => {
                        tracing::warn!(
                            error = format!("{error:#}"),
                            "cleanup: no store handle; next pass later"
                        );
                        continue;
                    }
                },
            };
            writer = self.pass(handle);
            self.stats.cleanup_runs.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One pass; the handle back unless it failed (a new one next time).
    fn pass(&self, mut writer: Box<dyn BatchWriter>) -> Option<Box<dyn BatchWriter>> {
        let now = crate::store::unix_ms_now();
        let mut created = 0;
        if let Err(error) = writer.write_batch(&mut |tables| {
            created = tables.partitions_ahead(now)?;
            Ok(())
        }) {
            tracing::warn!(
                error = format!("{error:#}"),
                "cleanup: partitions not created; rows go to DEFAULT meanwhile"
            );
            return None;
        }
        self.stats
            .partitions_created
            .fetch_add(created as u64, Ordering::Relaxed);
        if self.message_retention.is_some() {
            let floor = crate::store::retention_floor(now, self.message_retention);
            let expire_messages =
                |tables: &mut dyn Tables, limit| tables.expire_messages(floor, limit);
            if !self.expire(&mut *writer, &expire_messages, &self.stats.expired_messages) {
                return None;
            }
        }
        let window_ms = self.idempotency_window.as_millis() as u64;
        let sends_before = snowflake::first_id_at(now.saturating_sub(window_ms));
        let expire_sends = |tables: &mut dyn Tables, limit| {
            tables
                .expire_sends(sends_before, limit)
                .map(|removed| rows(removed, limit))
        };
        if !self.expire(&mut *writer, &expire_sends, &self.stats.expired_sends) {
            return None;
        }
        // Rows last seen longer ago than a retention (zero: kept), row by row.
        let by_last_seen: [(Duration, LastSeenStep, &AtomicU64); 2] = [
            (
                self.presence_retention,
                |tables, before, limit| tables.expire_presence(before, limit),
                &self.stats.expired_presence,
            ),
            (
                self.device_retention,
                |tables, before, limit| tables.expire_devices(before, limit),
                &self.stats.expired_devices,
            ),
        ];
        for (retention, step, removed_total) in by_last_seen {
            if retention.is_zero() {
                continue;
            }
            let seen_before = now.saturating_sub(retention.as_millis() as u64);
            let expire = |tables: &mut dyn Tables, limit| {
                step(tables, seen_before, limit).map(|removed| rows(removed, limit))
            };
            if !self.expire(&mut *writer, &expire, removed_total) {
                return None;
            }
        }
        let caught_up = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        self.stats
            .cleanup_caught_up_unix_s
            .store(caught_up, Ordering::Relaxed);
        Some(writer)
    }

    /// Runs `step` in batches of `CLEANUP_BATCH_ROWS` until one says nothing
    /// old is left or the writer stops, counting the rows in
    /// `removed_total`. False when a batch failed (it is logged).
    fn expire(
        &self,
        writer: &mut dyn BatchWriter,
        step: &dyn Fn(&mut dyn Tables, usize) -> anyhow::Result<Expired>,
        removed_total: &AtomicU64,
    ) -> bool {
        loop {
            let mut removed = Expired::default();
            let result = writer.write_batch(&mut |tables| {
                removed = step(tables, CLEANUP_BATCH_ROWS)?;
                Ok(())
            });
            if let Err(error) = result {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "cleanup pass failed; next pass later"
                );
                return false;
            }
            removed_total.fetch_add(removed.rows, Ordering::Relaxed);
            self.stats
                .reclaimed_bytes
                .fetch_add(removed.bytes, Ordering::Relaxed);
            if !removed.more || self.stop.load(Ordering::Relaxed) {
                return true;
            }
        }
    }
}

/// Removes up to a limit of rows last seen before a time; returns how many.
type LastSeenStep = fn(&mut dyn Tables, u64, usize) -> anyhow::Result<usize>;

/// A row-by-row step's count: more may be left when it removed its limit.
fn rows(removed: usize, limit: usize) -> Expired {
    Expired {
        rows: removed as u64,
        bytes: 0,
        more: removed >= limit,
    }
}
