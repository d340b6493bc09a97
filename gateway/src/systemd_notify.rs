//! The service manager's view of the node: systemd's sd_notify protocol.
//!
//! Owns `READY=1` (all shards listening), `STOPPING=1` (drain started) and
//! `WATCHDOG=1`, sent only while every shard's loop is making progress, so a
//! wedged shard gets the process restarted. A no-op when NOTIFY_SOCKET is unset.
//! Runs on its own thread; reads the shards' progress counters, never locks.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

use crate::metrics::NodeState;

/// Longest a shard's sweep loop may pause before the shard counts as stuck,
/// on top of half the watchdog interval (its sweep runs at least every second).
const SHARD_STALL_GRACE: Duration = Duration::from_secs(2);

pub fn ready(status: &str) {
    let _ = sd_notify::notify(false, &[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn stopping() {
    let _ = sd_notify::notify(
        false,
        &[NotifyState::Stopping, NotifyState::Status("draining")],
    );
}

/// Starts the watchdog thread if systemd asked for one (WatchdogSec=).
pub fn spawn_watchdog(node: Arc<NodeState>) -> std::io::Result<()> {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return Ok(());
    }
    let interval = Duration::from_micros(usec / 2);
    tracing::info!(
        interval_ms = interval.as_millis() as u64,
        "systemd watchdog enabled"
    );
    std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            let shard_count = node.shards.len();
            let mut last_seen: Vec<(u64, Instant)> = vec![(0, Instant::now()); shard_count];
            loop {
                std::thread::sleep(interval);
                let now = Instant::now();
                let mut stuck = None;
                for (shard, (count, changed)) in last_seen.iter_mut().enumerate() {
                    let current = node.shards[shard].sweeps.load(Relaxed);
                    if current != *count {
                        *count = current;
                        *changed = now;
                    } else if now.duration_since(*changed) > interval + SHARD_STALL_GRACE {
                        stuck = Some(shard);
                    }
                }
                // A draining shard exits on purpose; systemd's stop timeout covers it.
                if stuck.is_none() || node.draining.load(Relaxed) {
                    let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
                } else if let Some(shard) = stuck {
                    tracing::error!(
                        shard,
                        "shard made no progress; withholding the watchdog ping"
                    );
                }
            }
        })?;
    Ok(())
}
