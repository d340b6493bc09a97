//! The consuming side: the storage-writer reads records and advances the durable watermark.
//!
//! Owns reading published records in order (skipping wrap markers, checking
//! length and CRC), committing a batch (advancing the watermark, which frees
//! space and releases the producer's acknowledgements), and parking with
//! adaptive spin-then-futex when the ring is empty (one ring, or several at
//! once with `futex_waitv`: `wait_any`). After a restart it resumes
//! at the watermark, so records not yet committed are read again: the writer's
//! stores must be idempotent.

use std::fs::File;
use std::sync::atomic::{fence, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::RingError;
use crate::layout::*;
use crate::mapping::{futex_waitv, futex_wake_private, Mapping, WaitvOutcome, WAITV_WORDS_MAX};

/// Polls of `head` before parking: covers a producer that is mid-burst.
const SPIN_POLLS: u32 = 200;
/// How often [`wait_any`] looks at its rings on a kernel without `futex_waitv`.
const POLL_WITHOUT_WAITV: Duration = Duration::from_micros(500);
/// On such a kernel, how late [`wait_any`] on one ring may see its doorbell.
const DOORBELL_LATE_MAX: Duration = Duration::from_millis(50);

pub struct Consumer {
    mapping: Arc<Mapping>,
    /// Next position to read (at or after the durable watermark).
    read: u64,
    payload: Vec<u8>,
    _lock: File,
}

/// One record, borrowed until the next read.
#[derive(Debug, PartialEq, Eq)]
pub struct Record<'a> {
    pub payload: &'a [u8],
    /// Position just past this record: commit it to make the record durable.
    pub end: u64,
}

impl Consumer {
    pub(crate) fn new(mapping: Mapping, lock: File) -> Self {
        let read = mapping.atomic_u64(OFFSET_DURABLE).load(Ordering::Acquire);
        Self {
            mapping: Arc::new(mapping),
            read,
            payload: Vec::new(),
            _lock: lock,
        }
    }

    /// The next published record, if any. A corrupt record is an error (the
    /// writer stops and says where) rather than data.
    pub fn next_record(&mut self) -> Result<Option<Record<'_>>, RingError> {
        let capacity = self.mapping.capacity();
        loop {
            let head = self.mapping.atomic_u64(OFFSET_HEAD).load(Ordering::Acquire);
            if self.read == head {
                return Ok(None);
            }
            if head < self.read || head - self.read > capacity {
                return Err(RingError::Corrupt {
                    position: self.read,
                    reason: "head moved outside the ring",
                });
            }
            let offset = self.read % capacity;
            let mut header = [0u8; 8];
            self.mapping.read_data(offset, &mut header);
            let (len, crc) = decode_record_header(header);
            if len == WRAP_MARKER {
                self.read += capacity - offset;
                continue;
            }
            let needed = record_bytes(u64::from(len));
            if u64::from(len) > RECORD_PAYLOAD_BYTES_MAX
                || offset + needed > capacity
                || self.read + needed > head
            {
                return Err(RingError::Corrupt {
                    position: self.read,
                    reason: "record length runs past the ring or the head",
                });
            }
            self.payload.resize(len as usize, 0);
            self.mapping
                .read_data(offset + RECORD_HEADER_BYTES, &mut self.payload);
            if crc32fast::hash(&self.payload) != crc {
                return Err(RingError::Corrupt {
                    position: self.read,
                    reason: "record checksum mismatch",
                });
            }
            self.read += needed;
            return Ok(Some(Record {
                payload: &self.payload,
                end: self.read,
            }));
        }
    }

    /// Marks everything before `end` durable: frees the space and lets the
    /// producer acknowledge those records.
    pub fn commit(&mut self, end: u64) {
        let durable = self.mapping.atomic_u64(OFFSET_DURABLE);
        debug_assert!(end <= self.read && end >= durable.load(Ordering::Relaxed));
        durable.store(end, Ordering::Release);
    }

    /// A handle another thread can commit through (the writer's commit
    /// thread, while this consumer's thread keeps reading).
    pub fn watermark(&self) -> Watermark {
        Watermark {
            mapping: self.mapping.clone(),
        }
    }

    /// Position just past the last record read.
    pub fn read_position(&self) -> u64 {
        self.read
    }

    /// The durable watermark.
    pub fn durable(&self) -> u64 {
        self.mapping
            .atomic_u64(OFFSET_DURABLE)
            .load(Ordering::Acquire)
    }

    /// Position just past the last published record.
    pub fn head(&self) -> u64 {
        self.mapping.atomic_u64(OFFSET_HEAD).load(Ordering::Acquire)
    }

    /// Waits until a record may be available or `timeout` passes: a short
    /// spin, then parks on the futex (no syscall per record while busy).
    pub fn wait(&self, timeout: Duration) {
        let head = self.mapping.atomic_u64(OFFSET_HEAD);
        for _ in 0..SPIN_POLLS {
            if head.load(Ordering::Acquire) != self.read {
                return;
            }
            std::hint::spin_loop();
        }
        let deadline = Instant::now() + timeout;
        let sleeping = self.mapping.atomic_u32(OFFSET_SLEEPING);
        sleeping.store(1, Ordering::Relaxed);
        // Pairs with the producer's fence: either it sees `sleeping` and wakes
        // us, or we see its new head here and do not sleep.
        fence(Ordering::SeqCst);
        while head.load(Ordering::Acquire) == self.read {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            self.mapping.futex_wait(1, left);
            if sleeping.load(Ordering::Relaxed) == 0 {
                break;
            }
        }
        sleeping.store(0, Ordering::Relaxed);
    }
}

/// Parks until one of `consumers` may have a record, `doorbell` no longer
/// holds `rung` (another thread of this process has something for the
/// caller, and wakes it with [`ring_doorbell`]), or `timeout` passes. One
/// thread drains many rings this way: a producer's wake reaches it directly,
/// with no thread in between. A short spin first, as in [`Consumer::wait`].
///
/// On kernels without `futex_waitv` (before 5.16) it parks on the one
/// ring's futex, or polls every `POLL_WITHOUT_WAITV` when there are several.
pub fn wait_any(consumers: &[&Consumer], doorbell: &AtomicU32, rung: u32, timeout: Duration) {
    let has_record = || consumers.iter().any(|c| c.head() != c.read);
    let rang = || doorbell.load(Ordering::Acquire) != rung;
    for _ in 0..SPIN_POLLS {
        if has_record() || rang() {
            return;
        }
        std::hint::spin_loop();
    }
    let deadline = Instant::now() + timeout;
    let words: Vec<&AtomicU32> = consumers
        .iter()
        .map(|c| c.mapping.sleeping_word())
        .collect();
    for word in &words {
        word.store(1, Ordering::Relaxed);
    }
    // Pairs with each producer's fence, as in `Consumer::wait`.
    fence(Ordering::SeqCst);
    while !has_record() && !rang() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        // Rings past the 127 one call takes (a host with more shards than
        // that) are seen at the timeout.
        let mut waiters: Vec<(&AtomicU32, u32, bool)> = words
            .iter()
            .take(WAITV_WORDS_MAX - 1)
            .map(|word| (*word, 1, true))
            .collect();
        waiters.push((doorbell, rung, false));
        if futex_waitv(&waiters, left) == WaitvOutcome::Unsupported {
            match consumers {
                // One ring: its own futex (the doorbell is then seen late).
                [only] => only.mapping.futex_wait(1, left.min(DOORBELL_LATE_MAX)),
                _ => std::thread::sleep(left.min(POLL_WITHOUT_WAITV)),
            }
        }
        if words.iter().any(|word| word.load(Ordering::Relaxed) == 0) {
            break; // a producer woke us
        }
    }
    for word in &words {
        word.store(0, Ordering::Relaxed);
    }
}

/// Wakes the thread parked in [`wait_any`] on `doorbell`.
pub fn ring_doorbell(doorbell: &AtomicU32) {
    doorbell.fetch_add(1, Ordering::Release);
    futex_wake_private(doorbell);
}

/// The ring's head and durable watermark, shareable across threads. Commits
/// must only cover records this ring's `Consumer` has already read.
#[derive(Clone)]
pub struct Watermark {
    mapping: Arc<Mapping>,
}

impl Watermark {
    /// Marks everything before `end` durable; never moves the watermark back.
    pub fn commit(&self, end: u64) {
        let durable = self.mapping.atomic_u64(OFFSET_DURABLE);
        if end > durable.load(Ordering::Relaxed) {
            durable.store(end, Ordering::Release);
        }
    }

    pub fn durable(&self) -> u64 {
        self.mapping
            .atomic_u64(OFFSET_DURABLE)
            .load(Ordering::Acquire)
    }

    /// Position just past the last published record.
    pub fn head(&self) -> u64 {
        self.mapping.atomic_u64(OFFSET_HEAD).load(Ordering::Acquire)
    }
}
