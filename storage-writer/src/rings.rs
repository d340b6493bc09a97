//! The rings this writer drains: attaching them, one drain thread each, and
//! the commit progress the read path waits on.
//!
//! Owns the ring registry (by path; attached at start from the ring directory
//! and whenever a shard says hello), the drain threads (each reads its ring in
//! order and hands bounded chunks of records to the commit thread), and
//! `Progress`: per ring, the position committed to the store. Never commits a
//! watermark itself and never decodes records (the commit thread does both).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chat_ring::{attach_existing_consumer, Watermark};
use crossbeam_channel::Sender;

/// Records one chunk carries to the commit thread at most.
pub const CHUNK_RECORDS_MAX: usize = 1024;
/// Longest a drain thread parks before re-checking for shutdown.
const PARK: Duration = Duration::from_millis(50);

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

/// Attaches rings and starts their drain threads.
pub struct Rings {
    pub progress: Arc<Progress>,
    chunks: Sender<Chunk>,
    stop: Arc<AtomicBool>,
}

impl Rings {
    pub fn new(progress: Arc<Progress>, chunks: Sender<Chunk>, stop: Arc<AtomicBool>) -> Self {
        Self {
            progress,
            chunks,
            stop,
        }
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
        let chunks = self.chunks.clone();
        let stop = self.stop.clone();
        let progress = self.progress.clone();
        std::thread::Builder::new()
            .name(format!("drain-{index}"))
            .spawn(move || {
                if let Err(error) = drain(index, consumer, &chunks, &stop) {
                    tracing::error!(ring = %path.display(), %error, "stopped draining this ring; its shard will back-pressure until an operator acts");
                    progress.rings.lock().expect("progress lock")[index].failed = true;
                    progress.committed.notify_all();
                }
            })?;
        Ok(index)
    }
}

fn drain(
    index: usize,
    mut consumer: chat_ring::Consumer,
    chunks: &Sender<Chunk>,
    stop: &AtomicBool,
) -> Result<()> {
    // Records up to here were appended before this writer attached; the
    // previous writer may have applied some of them before it stopped.
    let replay_until = consumer.head();
    while !stop.load(Ordering::Relaxed) {
        let mut records = Vec::new();
        let mut end = 0;
        let maybe_applied = consumer.read_position() < replay_until;
        while records.len() < CHUNK_RECORDS_MAX {
            // A chunk never mixes replayed and new records.
            if maybe_applied && consumer.read_position() >= replay_until {
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
        if records.is_empty() {
            consumer.wait(PARK);
            continue;
        }
        // Bounded: a slow store stops the drain, the ring fills, the shard back-pressures.
        if chunks
            .send(Chunk {
                ring: index,
                maybe_applied,
                records,
                end,
            })
            .is_err()
        {
            break;
        }
    }
    Ok(())
}
