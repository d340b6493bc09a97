//! Wall-clock time for message timestamps and token expiry.
//!
//! The only place the gateway reads the wall clock; liveness uses each
//! shard's monotonic clock instead, so a clock step never closes connections.

use std::time::{SystemTime, UNIX_EPOCH};

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn unix_s() -> u64 {
    unix_ms() / 1000
}
