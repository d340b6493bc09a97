//! The producing side: one gateway shard appends records and reads the durable watermark.
//!
//! Owns appending (with the wrap marker), the free-space check against the
//! watermark, and waking a parked consumer once per batch. Never blocks: a full
//! ring returns `RingFull` and the shard back-pressures its senders.

use std::fs::File;
use std::sync::atomic::{fence, Ordering};

use crate::error::RingFull;
use crate::layout::*;
use crate::mapping::Mapping;

pub struct Producer {
    mapping: Mapping,
    /// Position of the next append (the shared `head` is only stored, never read back).
    head: u64,
    /// Last watermark read from the consumer's line (refreshed when space runs short).
    durable_seen: u64,
    _lock: File,
}

impl Producer {
    pub(crate) fn new(mapping: Mapping, lock: File) -> Self {
        let head = mapping.atomic_u64(OFFSET_HEAD).load(Ordering::Acquire);
        let durable_seen = mapping.atomic_u64(OFFSET_DURABLE).load(Ordering::Acquire);
        Self {
            mapping,
            head,
            durable_seen,
            _lock: lock,
        }
    }

    /// Appends one record. Returns the position just past it: the record is
    /// durable once `durable()` reaches that position.
    pub fn try_append(&mut self, payload: &[u8]) -> Result<u64, RingFull> {
        let capacity = self.mapping.capacity();
        let needed = record_bytes(payload.len() as u64);
        assert!(
            payload.len() as u64 <= RECORD_PAYLOAD_BYTES_MAX && needed <= capacity / 4,
            "record of {} bytes is larger than the ring allows; callers bound payloads",
            payload.len()
        );
        let offset = self.head % capacity;
        let contiguous = capacity - offset;
        let wrap = if contiguous < needed { contiguous } else { 0 };
        let total = wrap + needed;
        if total > capacity - (self.head - self.durable_seen) {
            self.durable_seen = self.durable();
            let free = capacity - (self.head - self.durable_seen);
            if total > free {
                return Err(RingFull {
                    needed: total,
                    free,
                });
            }
        }
        let mut position = self.head;
        if wrap > 0 {
            self.mapping
                .write_data(offset, &encode_record_header(WRAP_MARKER, 0));
            position += wrap;
        }
        let offset = position % capacity;
        let crc = crc32fast::hash(payload);
        self.mapping
            .write_data(offset + RECORD_HEADER_BYTES, payload);
        self.mapping
            .write_data(offset, &encode_record_header(payload.len() as u32, crc));
        self.head = position + needed;
        // Publish: the consumer's Acquire load of head sees the bytes above.
        self.mapping
            .atomic_u64(OFFSET_HEAD)
            .store(self.head, Ordering::Release);
        Ok(self.head)
    }

    /// Bytes ever made durable by the consumer (the watermark).
    pub fn durable(&self) -> u64 {
        self.mapping
            .atomic_u64(OFFSET_DURABLE)
            .load(Ordering::Acquire)
    }

    /// Position just past the last appended record.
    pub fn head(&self) -> u64 {
        self.head
    }

    /// Wakes the consumer if it is parked. Call once per batch of appends:
    /// costs a syscall only when the consumer is actually asleep.
    pub fn wake_consumer(&self) {
        // Pairs with the consumer's fence between setting `sleeping` and
        // re-reading `head`: one of the two sides sees the other's write.
        fence(Ordering::SeqCst);
        let sleeping = self.mapping.atomic_u32(OFFSET_SLEEPING);
        if sleeping.load(Ordering::Relaxed) == 1 {
            sleeping.store(0, Ordering::Relaxed);
            self.mapping.futex_wake();
        }
    }

    pub fn capacity(&self) -> u64 {
        self.mapping.capacity()
    }
}
