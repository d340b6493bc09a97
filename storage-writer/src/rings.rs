//! The rings this writer drains: attaching them, reading them, and the
//! commit progress the read path waits on.
//!
//! Owns the ring registry (by path; attached at start from the ring directory
//! and whenever a shard says hello), `Drains` (every ring, read in order in
//! bounded chunks by the commit thread, which parks on all their futexes at
//! once), and `Progress`: per ring, the position committed to the store.
//! Never commits a watermark itself and never decodes records (the commit
//! thread does both).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chat_ring::{attach_existing_consumer, ring_doorbell, wait_any, Watermark};
use crossbeam_channel::{Receiver, Sender};

/// Records one chunk holds at most.
pub const CHUNK_RECORDS_MAX: usize = 1024;

/// Records read from one ring, in order.
pub struct Chunk {
    pub ring: usize,
    /// A previous writer may have applied these (they were between the
    /// watermark and the head when this writer attached).
    pub maybe_applied: bool,
    pub records: Vec<Vec<u8>>,
    /// Position just past the last record: commit it once they are durable.
    pub end: u64,
}

pub struct RingState {
    pub path: PathBuf,
    pub shard: Option<u16>,
    pub watermark: Watermark,
    /// Everything before this position is in the store.
    pub committed: u64,
    /// Set when the drain thread stopped on a corrupt record.
    pub failed: bool,
}

/// The registry and the commit progress, behind one lock with a condvar that
/// fires after every commit.
#[derive(Default)]
pub struct Progress {
    pub rings: Mutex<Vec<RingState>>,
    pub committed: Condvar,
}

impl Progress {
    /// The head of every ring now: what a read must wait to see committed.
    pub fn barrier(&self) -> Vec<u64> {
        let rings = self.rings.lock().expect("progress lock");
        rings.iter().map(|ring| ring.watermark.head()).collect()
    }

    /// Waits until every ring has committed up to `barrier` (rings attached
    /// since are not waited for). False on timeout or a failed ring.
    pub fn wait_for(&self, barrier: &[u64], timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut rings = self.rings.lock().expect("progress lock");
        loop {
            let behind = rings
                .iter()
                .zip(barrier)
                .filter(|(ring, head)| ring.committed < **head)
                .collect::<Vec<_>>();
            if behind.is_empty() {
                return true;
            }
            if behind.iter().any(|(ring, _)| ring.failed) {
                return false;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            rings = self
                .committed
                .wait_timeout(rings, left)
                .expect("progress lock")
                .0;
        }
    }
}

/// Attaches rings: each is handed to the commit thread, which drains them all.
pub struct Rings {
    pub progress: Arc<Progress>,
    attached: Sender<Draining>,
    /// Rung after a ring is handed over (or the writer stops), so the
    /// commit thread does not sleep through it.
    doorbell: Arc<AtomicU32>,
}

impl Rings {
    /// The registry, and the `Drains` the commit thread reads through.
    pub fn new(progress: Arc<Progress>) -> (Self, Drains) {
        let (attached, handed) = crossbeam_channel::unbounded();
        let doorbell = Arc::new(AtomicU32::new(0));
        let drains = Drains {
            handed,
            doorbell: doorbell.clone(),
            rings: Vec::new(),
            first: 0,
            progress: progress.clone(),
        };
        let rings = Self {
            progress,
            attached,
            doorbell,
        };
        (rings, drains)
    }

    /// Wakes the commit thread if it waits for records (to see `stop`).
    pub fn wake(&self) {
        ring_doorbell(&self.doorbell);
    }

    /// Attaches every `shard-*.ring` in `dir` (rings a gateway left behind).
    pub fn attach_dir(&self, dir: &Path) -> Result<()> {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(error) => return Err(error).context(format!("reading {}", dir.display())),
        };
        let mut paths = entries
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| {
                path.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("shard-") && n.ends_with(".ring"))
            })
            .collect::<Vec<_>>();
        paths.sort();
        for path in paths {
            self.attach(&path, None)?;
        }
        Ok(())
    }

    /// The ring at `path`, attached now if it was not. Returns its index.
    pub fn attach(&self, path: &Path, shard: Option<u16>) -> Result<usize> {
        let path = path
            .canonicalize()
            .with_context(|| format!("ring {}", path.display()))?;
        let mut rings = self.progress.rings.lock().expect("progress lock");
        if let Some(index) = rings.iter().position(|ring| ring.path == path) {
            if shard.is_some() {
                rings[index].shard = shard;
            }
            return Ok(index);
        }
        let consumer = attach_existing_consumer(&path)?;
        let index = rings.len();
        let committed = consumer.durable();
        rings.push(RingState {
            path: path.clone(),
            shard,
            watermark: consumer.watermark(),
            committed,
            failed: false,
        });
        drop(rings);
        tracing::info!(ring = %path.display(), position = committed, "attached ring");
        // Records up to here were appended before this writer attached; the
        // previous writer may have applied some of them before it stopped.
        let replay_until = consumer.head();
        let draining = Draining {
            index,
            path,
            consumer,
            replay_until,
        };
        // The commit thread holds the receiver for as long as the writer runs.
        let _ = self.attached.send(draining);
        self.wake();
        Ok(index)
    }
}

/// One ring as the commit thread reads it.
pub struct Draining {
    index: usize,
    path: PathBuf,
    consumer: chat_ring::Consumer,
    replay_until: u64,
}

impl Draining {
    /// The next records of this ring, at most `records_max`, in order.
    fn read_chunk(&mut self, records_max: usize) -> Result<Option<Chunk>> {
        let consumer = &mut self.consumer;
        let mut records = Vec::new();
        let mut end = 0;
        let maybe_applied = consumer.read_position() < self.replay_until;
        while records.len() < records_max {
            // A chunk never mixes replayed and new records.
            if maybe_applied && consumer.read_position() >= self.replay_until {
                break;
            }
            match consumer.next_record()? {
                Some(record) => {
                    records.push(record.payload.to_vec());
                    end = record.end;
                }
                None => break,
            }
        }
        Ok((!records.is_empty()).then_some(Chunk {
            ring: self.index,
            maybe_applied,
            records,
            end,
        }))
    }
}

/// Every attached ring, read by the commit thread itself: a producer's
/// wake-up reaches the thread that commits, with no hand-off in between.
pub struct Drains {
    handed: Receiver<Draining>,
    doorbell: Arc<AtomicU32>,
    rings: Vec<Draining>,
    /// The ring read first by the next `read`.
    first: usize,
    progress: Arc<Progress>,
}

impl Drains {
    /// Chunks from every ring, `records_max` records in all at most, shared
    /// fairly: each ring gets an equal share first (the first ring changes
    /// every call), and what a quiet ring leaves goes to the busy ones, so
    /// no shard's records wait behind another's. A ring with a corrupt
    /// record is dropped and marked failed: its shard back-pressures until
    /// an operator acts; the others go on.
    pub fn read(&mut self, records_max: usize) -> Vec<Chunk> {
        while let Ok(ring) = self.handed.try_recv() {
            self.rings.push(ring);
        }
        let mut chunks = Vec::new();
        let mut failed = Vec::new();
        let count = self.rings.len();
        if count == 0 {
            return chunks;
        }
        self.first = (self.first + 1) % count;
        let share = (records_max / count).max(1);
        let mut left = records_max;
        for pass_share in [share, records_max] {
            for step in 0..count {
                let position = (self.first + step) % count;
                if left == 0 || failed.contains(&position) {
                    continue;
                }
                let ring = &mut self.rings[position];
                let mut budget = pass_share.min(left);
                while budget > 0 {
                    match ring.read_chunk(budget.min(CHUNK_RECORDS_MAX)) {
                        Ok(Some(chunk)) => {
                            budget -= chunk.records.len();
                            left -= chunk.records.len();
                            chunks.push(chunk);
                        }
                        Ok(None) => break,
                        Err(error) => {
                            tracing::error!(ring = %ring.path.display(), %error, "stopped draining this ring; its shard will back-pressure until an operator acts");
                            failed.push(position);
                            break;
                        }
                    }
                }
            }
        }
        failed.sort_unstable();
        for position in failed.into_iter().rev() {
            let ring = self.rings.remove(position);
            self.progress.rings.lock().expect("progress lock")[ring.index].failed = true;
            self.progress.committed.notify_all();
        }
        chunks
    }

    /// Parks until a ring may have records, a ring is attached, `wake` is
    /// called, or `timeout` passes.
    pub fn wait(&self, timeout: Duration) {
        let rung = self.doorbell.load(Ordering::Acquire);
        if !self.handed.is_empty() {
            return;
        }
        let consumers: Vec<&chat_ring::Consumer> =
            self.rings.iter().map(|ring| &ring.consumer).collect();
        wait_any(&consumers, &self.doorbell, rung, timeout);
    }
}
