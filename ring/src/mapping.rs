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

    /// This ring's futex word, for a wait on several rings at once.
    pub fn sleeping_word(&self) -> &AtomicU32 {
        self.atomic_u32(OFFSET_SLEEPING)
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

/// One word of a `futex_waitv` call (the kernel's `struct futex_waitv`).
#[repr(C)]
struct FutexWaitv {
    val: u64,
    uaddr: u64,
    flags: u32,
    reserved: u32,
}

/// `FUTEX2_SIZE_U32` (linux/futex.h).
const FUTEX2_SIZE_U32: u32 = 0x02;
/// `FUTEX2_PRIVATE` (linux/futex.h): the word is not shared with other processes.
const FUTEX2_PRIVATE: u32 = 128;
/// Words one `futex_waitv` takes at most (`FUTEX_WAITV_MAX`).
pub const WAITV_WORDS_MAX: usize = 128;

/// What a wait on several futex words ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitvOutcome {
    /// Woken, timed out, or a word no longer held its expected value.
    Returned,
    /// The kernel has no `futex_waitv` (before Linux 5.16).
    Unsupported,
}

/// Parks until one of `words` is woken or no longer equals its expected
/// value, or `timeout` passes. `shared` words live in a mapping other
/// processes share (a ring's); the others are private to this process.
pub fn futex_waitv(words: &[(&AtomicU32, u32, bool)], timeout: Duration) -> WaitvOutcome {
    assert!(!words.is_empty() && words.len() <= WAITV_WORDS_MAX);
    let waiters: Vec<FutexWaitv> = words
        .iter()
        .map(|(word, expected, shared)| FutexWaitv {
            val: u64::from(*expected),
            uaddr: word.as_ptr() as u64,
            flags: FUTEX2_SIZE_U32 | if *shared { 0 } else { FUTEX2_PRIVATE },
            reserved: 0,
        })
        .collect();
    // futex_waitv takes an absolute deadline on the clock it is given.
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a live, writable timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let deadline_ns = now.tv_sec as u128 * 1_000_000_000
        + now.tv_nsec as u128
        + timeout.as_nanos().min(u128::from(u64::MAX));
    let deadline = libc::timespec {
        tv_sec: (deadline_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (deadline_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `waiters` is a live array of `words.len()` structs laid out as
    // the kernel's `struct futex_waitv`; each `uaddr` is an aligned u32 that
    // outlives the call (borrowed from `words`); `deadline` is a live local.
    // The kernel only reads them. Spurious returns are fine: callers loop.
    let result = unsafe {
        libc::syscall(
            libc::SYS_futex_waitv,
            waiters.as_ptr(),
            waiters.len() as libc::c_uint,
            0 as libc::c_uint,
            &deadline as *const libc::timespec,
            libc::CLOCK_MONOTONIC,
        )
    };
    if result < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
        return WaitvOutcome::Unsupported;
    }
    WaitvOutcome::Returned
}

/// Wakes one thread of this process parked on the private word `word`.
pub fn futex_wake_private(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE only uses the address as a key; it is valid and aligned.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            1,
        );
    }
}
