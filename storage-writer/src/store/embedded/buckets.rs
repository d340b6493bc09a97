//! The embedded store's time buckets: `messages`, `inbox` and `inbox_ids`
//! split by the time in each message id into windows of one fixed width,
//! each window three fjall partitions of its own (`messages_b<start unix
//! ms>`, `inbox_b…`, `inbox_ids_b…`), dropped whole once the retention has
//! passed the window's end. A dropped partition's files go back to the file
//! system at once; removing rows key by key only wrote tombstones that held
//! the space until compaction reached them (BENCHMARKS.md, "Disk per
//! message").
//!
//! Owns the window arithmetic, the layout kept in `meta` (the width, fixed
//! the first time the store runs with a retention, and the end of the
//! legacy bucket: the unsplit `messages`, `inbox` and `inbox_ids` of a
//! store from before version 9, or of one that keeps everything), the map
//! of open buckets that the commit, cleanup and reader threads share, and
//! the fence that closes a bucket to writers before it is dropped. Never
//! drops a bucket a writer can still add to, and never lets a write
//! recreate one dropped by this process. The keys inside a bucket are
//! `embedded`'s.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use anyhow::{Context, Result};
use chat_protocol::snowflake;
use fjall::{Keyspace, PartitionHandle};

use super::options::partition_options;

/// A retention is split into this many windows: the disk holds at most
/// about one window more than the retention asks for.
pub const BUCKETS_PER_RETENTION: u64 = 16;
/// The narrowest window, in ms (a retention of seconds, in tests).
pub const BUCKET_MS_MIN: u64 = 1000;

const WIDTH_KEY: &[u8] = b"bucket_width_ms";
const LEGACY_UNTIL_KEY: &[u8] = b"legacy_until_ms";
/// The three tables a bucket holds, in the order they are dropped (the
/// indexes before the rows they index).
const TABLES: [&str; 3] = ["inbox_ids", "inbox", "messages"];

/// One window's partitions.
pub struct Bucket {
    /// The window, in unix ms: from `start_ms` (0 for the legacy bucket)
    /// up to `end_ms`, exclusive.
    pub start_ms: u64,
    pub end_ms: u64,
    /// (conversation, message id) → the stored record.
    pub messages: PartitionHandle,
    /// (user, sequence) → message id, origin device, conversation.
    pub inbox: PartitionHandle,
    /// (user, message id) → sequence, conversation.
    pub inbox_ids: PartitionHandle,
    /// False once the cleanup has closed the bucket: no write goes in.
    open: RwLock<bool>,
}

impl Bucket {
    /// Runs `write` unless the bucket is closed. Returns whether it ran.
    /// The cleanup's close waits for a write in progress, so everything
    /// written is seen by what the cleanup reads after closing.
    pub fn write(&self, write: impl FnOnce(&Self) -> Result<()>) -> Result<bool> {
        let open = self.open.read().expect("bucket lock poisoned");
        if !*open {
            return Ok(false);
        }
        write(self)?;
        Ok(true)
    }

    /// Whether the window ends at or before `unix_ms`.
    pub fn ends_by(&self, unix_ms: u64) -> bool {
        self.end_ms <= unix_ms
    }

    /// The first message id of the window (0 for the legacy bucket).
    pub fn first_id(&self) -> u64 {
        snowflake::first_id_at(self.start_ms)
    }

    fn partitions(&self) -> [&PartitionHandle; 3] {
        [&self.inbox_ids, &self.inbox, &self.messages]
    }
}

/// Every bucket there is, shared by every handle of the store.
pub struct Buckets {
    keyspace: Keyspace,
    /// The window width in ms; 0: no windows, everything in the legacy bucket.
    width_ms: u64,
    /// Ids made before this go to the legacy bucket.
    legacy_until_ms: u64,
    open: RwLock<BTreeMap<u64, Arc<Bucket>>>,
    /// The latest end of a window this process dropped: no write makes it again.
    dropped_through_ms: AtomicU64,
}

impl Buckets {
    /// Opens the buckets the store has and settles the layout: a store
    /// running with a retention for the first time gets its width now
    /// (a sixteenth of the retention), and what it stored so far becomes
    /// the legacy bucket, which is dropped whole once the retention passes
    /// the moment of this change.
    pub fn open(
        keyspace: &Keyspace,
        meta: &PartitionHandle,
        retention: Option<std::time::Duration>,
        now_ms: u64,
    ) -> Result<Self> {
        let stored = |key: &[u8]| -> Result<Option<u64>> {
            meta.get(key)?
                .map(|value| super::be_u64(&value))
                .transpose()
        };
        let names: Vec<String> = keyspace
            .list_partitions()
            .iter()
            .map(|name| name.to_string())
            .collect();
        let has_legacy = TABLES.iter().any(|table| names.iter().any(|n| n == table));
        let wanted = retention.map(|retention| {
            (retention.as_millis() as u64 / BUCKETS_PER_RETENTION).max(BUCKET_MS_MIN)
        });
        let (width_ms, legacy_until_ms) = match (stored(WIDTH_KEY)?.filter(|w| *w > 0), wanted) {
            (Some(width), _) => (width, stored(LEGACY_UNTIL_KEY)?.unwrap_or(0)),
            (None, Some(width)) => (width, if has_legacy { now_ms } else { 0 }),
            (None, None) => (0, u64::MAX),
        };
        if stored(WIDTH_KEY)? != Some(width_ms)
            || stored(LEGACY_UNTIL_KEY)? != Some(legacy_until_ms)
        {
            // Durable before any row goes by it: a layout decided again
            // after a crash would send some ids to another window.
            meta.insert(WIDTH_KEY, width_ms.to_be_bytes())?;
            meta.insert(LEGACY_UNTIL_KEY, legacy_until_ms.to_be_bytes())?;
            keyspace
                .persist(fjall::PersistMode::SyncAll)
                .context("persisting the store's time windows")?;
        }
        let buckets = Self {
            keyspace: keyspace.clone(),
            width_ms,
            legacy_until_ms,
            open: RwLock::default(),
            dropped_through_ms: AtomicU64::new(0),
        };
        let mut starts: Vec<u64> = names.iter().filter_map(|name| window_of(name)).collect();
        if has_legacy {
            starts.push(0);
        }
        starts.sort_unstable();
        starts.dedup();
        let mut open = buckets.open.write().expect("buckets lock poisoned");
        for start in starts {
            open.insert(start, Arc::new(buckets.make(start)?));
        }
        drop(open);
        Ok(buckets)
    }

    /// The bucket `message_id` belongs to, made when missing (None when its
    /// window was dropped: it is past the retention).
    pub fn for_id(&self, message_id: u64) -> Result<Option<Arc<Bucket>>> {
        self.at(self.start_of(snowflake::decode(message_id).unix_ms), true)
    }

    /// The bucket `message_id` belongs to, if it exists.
    pub fn find(&self, message_id: u64) -> Option<Arc<Bucket>> {
        self.get(self.start_of(snowflake::decode(message_id).unix_ms))
    }

    /// The bucket of the window starting at `start`, if it is open.
    fn get(&self, start: u64) -> Option<Arc<Bucket>> {
        let open = self.open.read().expect("buckets lock poisoned");
        open.get(&start).cloned()
    }

    /// Every bucket, oldest window first.
    pub fn all(&self) -> Vec<Arc<Bucket>> {
        let open = self.open.read().expect("buckets lock poisoned");
        open.values().cloned().collect()
    }

    /// Makes the windows holding `now_ms` and the one after, where
    /// missing, so commits rarely make one. Returns how many were made.
    pub fn make_ahead(&self, now_ms: u64) -> Result<usize> {
        if self.width_ms == 0 {
            return Ok(0);
        }
        let mut made = 0;
        for at in [now_ms, now_ms + self.width_ms] {
            let start = self.start_of(at);
            if self.get(start).is_none() && self.at(start, true)?.is_some() {
                made += 1;
            }
        }
        Ok(made)
    }

    /// The oldest bucket whose whole window is before `unix_ms`.
    pub fn oldest_ending_by(&self, unix_ms: u64) -> Option<Arc<Bucket>> {
        let open = self.open.read().expect("buckets lock poisoned");
        open.values()
            .next()
            .filter(|bucket| bucket.ends_by(unix_ms))
            .cloned()
    }

    /// Closes `bucket` to writers, waiting for a write in progress.
    pub fn close(&self, bucket: &Bucket) {
        *bucket.open.write().expect("bucket lock poisoned") = false;
    }

    /// Deletes a closed bucket's partitions (their files go when the last
    /// reader lets go of them). Returns the bytes they held on disk.
    pub fn drop_closed(&self, bucket: &Bucket) -> Result<u64> {
        debug_assert!(!*bucket.open.read().expect("bucket lock poisoned"));
        self.dropped_through_ms
            .fetch_max(bucket.end_ms, Ordering::AcqRel);
        let mut bytes = 0;
        for partition in bucket.partitions() {
            bytes += partition.disk_space();
            self.keyspace
                .delete_partition(partition.clone())
                .with_context(|| format!("dropping partition {}", partition.name))?;
        }
        self.open
            .write()
            .expect("buckets lock poisoned")
            .remove(&bucket.start_ms);
        tracing::info!(
            start_ms = bucket.start_ms,
            end_ms = bucket.end_ms,
            bytes,
            "embedded store: dropped a bucket behind the retention"
        );
        Ok(bytes)
    }

    /// The start of the window holding `unix_ms` (0: the legacy bucket).
    fn start_of(&self, unix_ms: u64) -> u64 {
        if self.width_ms == 0 || unix_ms < self.legacy_until_ms {
            0
        } else {
            unix_ms / self.width_ms * self.width_ms
        }
    }

    fn at(&self, start: u64, make: bool) -> Result<Option<Arc<Bucket>>> {
        if let Some(bucket) = self.get(start) {
            return Ok(Some(bucket));
        }
        // The legacy bucket is only ever made for a store without windows;
        // once windows exist it can only have been dropped.
        let dropped = start < self.dropped_through_ms.load(Ordering::Acquire)
            || (start == 0 && self.width_ms > 0);
        if !make || dropped {
            return Ok(None);
        }
        let mut open = self.open.write().expect("buckets lock poisoned");
        if let Some(bucket) = open.get(&start) {
            return Ok(Some(bucket.clone()));
        }
        let bucket = Arc::new(self.make(start)?);
        open.insert(start, bucket.clone());
        Ok(Some(bucket))
    }

    /// Opens (creating where missing) the three partitions of a window.
    fn make(&self, start_ms: u64) -> Result<Bucket> {
        let partition = |table: &str| {
            let name = partition_name(table, start_ms);
            self.keyspace
                .open_partition(&name, partition_options())
                .with_context(|| format!("opening partition {name}"))
        };
        let end_ms = if start_ms == 0 {
            self.legacy_until_ms
        } else {
            start_ms + self.width_ms
        };
        Ok(Bucket {
            start_ms,
            end_ms,
            messages: partition("messages")?,
            inbox: partition("inbox")?,
            inbox_ids: partition("inbox_ids")?,
            open: RwLock::new(true),
        })
    }
}

/// A table's partition in the window starting at `start_ms` (0: legacy).
fn partition_name(table: &str, start_ms: u64) -> String {
    if start_ms == 0 {
        table.to_owned()
    } else {
        format!("{table}_b{start_ms}")
    }
}

/// The window start in a bucket partition's name (None for other names).
fn window_of(name: &str) -> Option<u64> {
    TABLES.iter().find_map(|table| {
        name.strip_prefix(table)?
            .strip_prefix("_b")?
            .parse()
            .ok()
            .filter(|start| *start > 0)
    })
}

/// Whether `error` only says the partition was dropped meanwhile (a removal
/// from a bucket the cleanup dropped has nothing left to remove).
pub fn dropped_meanwhile(result: fjall::Result<()>) -> Result<()> {
    match result {
        Err(fjall::Error::PartitionDeleted) => Ok(()),
        other => Ok(other?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names_carry_their_window_and_legacy_ones_none() {
        assert_eq!(partition_name("inbox_ids", 0), "inbox_ids");
        assert_eq!(partition_name("inbox", 5000), "inbox_b5000");
        for table in TABLES {
            assert_eq!(window_of(&partition_name(table, 7000)), Some(7000));
            assert_eq!(window_of(table), None);
        }
        assert_eq!(window_of("inbox_heads"), None);
        assert_eq!(window_of("sends_by_time"), None);
    }
}
