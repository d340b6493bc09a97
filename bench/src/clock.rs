//! The load generator's clock: CLOCK_MONOTONIC in nanoseconds.
//!
//! One clock for every thread and process of a run (it is system-wide), so an
//! intended send time written into a message by one worker can be compared
//! with the receive time read by another.

pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a live, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}
