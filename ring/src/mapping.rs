//! The shared mapping of a ring file, and the only `unsafe` of the durable path.
//!
//! # Safety
//!
//! The mapping is `MAP_SHARED`, page-aligned, and at least `HEADER_BYTES +
//! capacity` long (checked in `open` before a `Mapping` is built), so every
//! header offset below is in bounds and 8-byte aligned. Header fields are only
//! accessed as atomics. Data bytes are accessed through raw pointers, never
//! references, and the SPSC protocol guarantees the two sides never touch the
//! same data bytes at once: the producer writes only at or after `head` and
//! before `durable + capacity`; the consumer reads only before `head` (loaded
//! with Acquire after the producer's Release store) and at or after `durable`.
//! Another process may map the same file; the atomics are the same memory, so
//! the ordering holds across processes as it does across threads.

use std::sync::atomic::{AtomicU32, AtomicU64};
use std::time::Duration;

use memmap2::MmapRaw;

use crate::layout::{HEADER_BYTES, OFFSET_SLEEPING};

pub struct Mapping {
    map: MmapRaw,
    capacity: u64,
}

impl Mapping {
    /// `map` must be at least `HEADER_BYTES + capacity` bytes (checked by the caller).
    pub fn new(map: MmapRaw, capacity: u64) -> Self {
        assert!(
            map.len() as u64 >= HEADER_BYTES + capacity,
            "mapping shorter than the ring"
        );
        assert!(capacity.is_power_of_two());
        Self { map, capacity }
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn atomic_u64(&self, offset: usize) -> &AtomicU64 {
        assert!(offset.is_multiple_of(8) && (offset as u64) + 8 <= HEADER_BYTES);
        // SAFETY: in bounds and aligned (assert above, page-aligned mapping);
        // the field is only ever accessed atomically (module `# Safety`), and
        // the reference lives no longer than `self`, which keeps the mapping.
        unsafe { &*(self.map.as_mut_ptr().add(offset) as *const AtomicU64) }
    }

    pub fn atomic_u32(&self, offset: usize) -> &AtomicU32 {
        assert!(offset.is_multiple_of(4) && (offset as u64) + 4 <= HEADER_BYTES);
        // SAFETY: as for `atomic_u64`.
        unsafe { &*(self.map.as_mut_ptr().add(offset) as *const AtomicU32) }
    }

    /// Copies `bytes` into the data region at `offset` (must not run past its end).
    pub fn write_data(&self, offset: u64, bytes: &[u8]) {
        assert!(offset + bytes.len() as u64 <= self.capacity);
        // SAFETY: in bounds (assert); the producer alone writes these bytes,
        // which the consumer will not read before the following Release store
        // of `head` (module `# Safety`). Raw copy, no reference to shared memory.
        unsafe {
            let destination = self.map.as_mut_ptr().add((HEADER_BYTES + offset) as usize);
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), destination, bytes.len());
        }
    }

    /// Copies `length` bytes of the data region at `offset` into `out`.
    pub fn read_data(&self, offset: u64, out: &mut [u8]) {
        assert!(offset + out.len() as u64 <= self.capacity);
        // SAFETY: in bounds (assert); these bytes were published by the
        // producer's Release store of `head` that the caller Acquire-loaded,
        // and the producer will not overwrite them before `durable` passes them.
        unsafe {
            let source = self.map.as_ptr().add((HEADER_BYTES + offset) as usize);
            std::ptr::copy_nonoverlapping(source, out.as_mut_ptr(), out.len());
        }
    }

    /// Parks the consumer while the futex word still equals `expected`, at most `timeout`.
    pub fn futex_wait(&self, expected: u32, timeout: Duration) {
        let word = self.atomic_u32(OFFSET_SLEEPING);
        let timespec = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: FUTEX_WAIT (shared, not PRIVATE: the word lives in a mapping
        // other processes share) reads the aligned u32 `word`, valid for the
        // call; `timespec` is a live local. Spurious returns are fine: callers loop.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                word.as_ptr(),
                libc::FUTEX_WAIT,
                expected,
                &timespec as *const libc::timespec,
            );
        }
    }

    /// Wakes a consumer parked in `futex_wait`.
    pub fn futex_wake(&self) {
        let word = self.atomic_u32(OFFSET_SLEEPING);
        // SAFETY: FUTEX_WAKE only uses the address as a key; it is valid and aligned.
        unsafe {
            libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, 1);
        }
    }
}

/// Reads a header field before the mapping is validated (plain bytes, no atomics).
pub fn read_array<const N: usize>(map: &MmapRaw, offset: usize) -> [u8; N] {
    let mut out = [0u8; N];
    assert!(offset + N <= map.len());
    // SAFETY: in bounds (assert); header fields are written once at creation,
    // before the file is linked into place, so nobody writes them now.
    unsafe { std::ptr::copy_nonoverlapping(map.as_ptr().add(offset), out.as_mut_ptr(), N) };
    out
}
