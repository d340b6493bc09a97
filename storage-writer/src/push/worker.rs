//! The push worker's thread: decides which device gets a push, and when.
//!
//! Owns waiting out `ack_wait` for each recipient (candidates arrive in
//! commit order, so they fall due in order and one queue is the timer),
//! reading the recipient's push targets and each device's cursor (a device
//! that acknowledged the message got it: no push; one that connects meanwhile
//! acknowledges what its sync brings, which cancels its pending push),
//! coalescing per device (one push per `push_coalesce_ms`, carrying the count),
//! and removing targets the providers called invalid. Its storage handle is
//! its own; it never writes anything but those removals, and never sends:
//! jobs go to `send.rs` through a bounded queue.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_protocol::push::{PushPayload, PushTarget};
use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::send::{Job, SendQueue};
use super::settings::{ack_wait, Candidate, PushArgs};
use super::stats::PushStats;
use crate::store::Tables;

/// Devices whose last push time is remembered for coalescing, at most;
/// beyond it a device is pushed without coalescing (counted as `untracked`).
const TRACKED_DEVICES_MAX: usize = 262_144;
/// How often the worker forgets devices whose window has passed.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// Longest sleep of the loop (it also picks up prunes).
const IDLE_WAIT: Duration = Duration::from_millis(100);
/// Inbox entries read to count what a device has not acknowledged, at
/// most (a push says "1000 new messages" at worst), and per read.
const UNACKED_SCAN_MAX: usize = 1_000;
const UNACKED_SCAN_CHUNK: usize = 200;

type DeviceKey = (String, String);

/// What waits for a device's coalescing window to end.
struct Pending {
    from: String,
    target: Vec<u8>,
    /// The first waiting message's durable time (latency is from there).
    durable_at: Instant,
}

#[derive(Default)]
struct DeviceState {
    last_sent: Option<Instant>,
    /// The newest message the last push covered: a later candidate at or
    /// below it was counted in that push already.
    covered: u64,
    pending: Option<Pending>,
}

/// What a device has not acknowledged, as a push tells it.
struct Unacked {
    count: u32,
    newest: u64,
    conversation: String,
}

pub struct Worker {
    tables: Box<dyn Tables + Send>,
    candidates: Receiver<Candidate>,
    send: SendQueue,
    stats: Arc<PushStats>,
    ack_wait: Duration,
    window: Duration,
    include_sender: bool,
    devices: HashMap<DeviceKey, DeviceState>,
    flushes: BinaryHeap<Reverse<(Instant, DeviceKey)>>,
    last_sweep: Instant,
}

impl Worker {
    pub fn new(
        args: &PushArgs,
        tables: Box<dyn Tables + Send>,
        candidates: Receiver<Candidate>,
        send: SendQueue,
        stats: Arc<PushStats>,
    ) -> Self {
        Self {
            tables,
            candidates,
            send,
            stats,
            ack_wait: ack_wait(args),
            window: Duration::from_millis(args.push_coalesce_ms),
            include_sender: args.push_include_sender,
            devices: HashMap::new(),
            flushes: BinaryHeap::new(),
            last_sweep: Instant::now(),
        }
    }

    pub fn run(mut self) {
        let mut waiting: Option<Candidate> = None;
        loop {
            self.prune();
            let now = Instant::now();
            while self
                .flushes
                .peek()
                .is_some_and(|Reverse((due, _))| *due <= now)
            {
                let Reverse((_, key)) = self.flushes.pop().expect("peeked");
                self.flush(key);
            }
            if waiting.is_none() {
                let until_flush = self
                    .flushes
                    .peek()
                    .map(|Reverse((due, _))| due.saturating_duration_since(now));
                let wait = until_flush.map_or(IDLE_WAIT, |left| left.min(IDLE_WAIT));
                match self.candidates.recv_timeout(wait) {
                    Ok(candidate) => {
                        self.stats.queue_depth.fetch_sub(1, Relaxed);
                        waiting = Some(candidate);
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            if let Some(candidate) = waiting.take() {
                let due = candidate.durable_at + self.ack_wait;
                let now = Instant::now();
                if due <= now {
                    self.check(candidate);
                } else {
                    // Not yet: sleep toward it (bounded, so flushes and prunes run).
                    let until_flush = self.flushes.peek().map_or(IDLE_WAIT, |Reverse((at, _))| {
                        at.saturating_duration_since(now)
                    });
                    std::thread::sleep((due - now).min(until_flush).min(IDLE_WAIT));
                    waiting = Some(candidate);
                }
            }
            if self.last_sweep.elapsed() >= SWEEP_EVERY {
                self.sweep();
            }
        }
    }

    /// The recipient's devices with a push target that have not
    /// acknowledged the message: each pushed now, or when its window ends.
    fn check(&mut self, candidate: Candidate) {
        let targets = match self.tables.push_targets(&candidate.user) {
            Ok(targets) => targets,
            Err(error) => {
                tracing::warn!(%error, "push: could not read push targets; this message is not pushed");
                return;
            }
        };
        if targets.is_empty() {
            return;
        }
        let seq = match self
            .tables
            .inbox_entry_of(&candidate.user, candidate.message_id)
        {
            Ok(Some((seq, _))) => seq,
            Ok(None) => return,
            Err(error) => {
                tracing::warn!(%error, "push: could not read the inbox; this message is not pushed");
                return;
            }
        };
        for (device, target) in targets {
            match self.tables.cursor(&candidate.user, &device) {
                Ok(cursor) if cursor.is_acked(seq) => {
                    self.stats.acknowledged.fetch_add(1, Relaxed);
                }
                Ok(_) => self.note((candidate.user.clone(), device), target, &candidate),
                Err(error) => {
                    tracing::warn!(%error, "push: could not read a cursor; this device is not pushed");
                }
            }
        }
    }

    /// A device to push for `candidate`: now, or when its window ends.
    fn note(&mut self, key: DeviceKey, target: Vec<u8>, candidate: &Candidate) {
        let now = Instant::now();
        let pending = Pending {
            from: candidate.from.clone(),
            target,
            durable_at: candidate.durable_at,
        };
        if self.devices.len() >= TRACKED_DEVICES_MAX && !self.devices.contains_key(&key) {
            self.dispatch(&key, pending);
            return;
        }
        let window = self.window;
        let state = self.devices.entry(key.clone()).or_default();
        if candidate.message_id <= state.covered {
            // The last push counted it already.
            self.stats.coalesced.fetch_add(1, Relaxed);
            return;
        }
        match state.last_sent {
            Some(sent) if now.duration_since(sent) < window => {
                self.stats.coalesced.fetch_add(1, Relaxed);
                match &mut state.pending {
                    Some(waiting) => {
                        waiting.from = pending.from;
                        waiting.target = pending.target;
                    }
                    None => {
                        state.pending = Some(pending);
                        self.stats.pending.fetch_add(1, Relaxed);
                        self.flushes.push(Reverse((sent + window, key)));
                    }
                }
            }
            _ => {
                state.last_sent = Some(now);
                self.dispatch(&key, pending);
            }
        }
    }

    /// The window of `key` ended: push what waited (the dispatch finds
    /// nothing to push if the device connected and acknowledged it).
    fn flush(&mut self, key: DeviceKey) {
        let Some(state) = self.devices.get_mut(&key) else {
            return;
        };
        let Some(pending) = state.pending.take() else {
            return;
        };
        self.stats.pending.fetch_sub(1, Relaxed);
        state.last_sent = Some(Instant::now());
        self.dispatch(&key, pending);
    }

    /// What `device` of `user` has not acknowledged (bounded scan of its inbox).
    fn unacked(&mut self, user: &str, device: &str) -> anyhow::Result<Option<Unacked>> {
        let cursor = self.tables.cursor(user, device)?;
        let mut found: Option<Unacked> = None;
        let mut after = cursor.through;
        let mut scanned = 0;
        while scanned < UNACKED_SCAN_MAX {
            let entries = self.tables.inbox_after(user, after, UNACKED_SCAN_CHUNK)?;
            let Some(last) = entries.last() else {
                break;
            };
            after = last.seq;
            scanned += entries.len();
            for entry in entries {
                if cursor.is_acked(entry.seq) || entry.origin_device == device {
                    continue;
                }
                let unacked = found.get_or_insert(Unacked {
                    count: 0,
                    newest: 0,
                    conversation: String::new(),
                });
                unacked.count += 1;
                if entry.message_id > unacked.newest {
                    unacked.newest = entry.message_id;
                    unacked.conversation = entry.conversation;
                }
            }
        }
        Ok(found)
    }

    /// Sends the device one push for everything it has not acknowledged;
    /// nothing when it has acknowledged all (it connected meanwhile).
    fn dispatch(&mut self, key: &DeviceKey, pending: Pending) {
        let unacked = match self.unacked(&key.0, &key.1) {
            Ok(Some(unacked)) => unacked,
            Ok(None) => {
                self.stats.acknowledged.fetch_add(1, Relaxed);
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "push: could not read the inbox; this device is not pushed");
                return;
            }
        };
        let Some(target) = PushTarget::decode(&pending.target) else {
            tracing::warn!("push: a stored target does not decode; removing it");
            let _ = self.tables.put_push_target(&key.0, &key.1, None);
            return;
        };
        if let Some(state) = self.devices.get_mut(key) {
            state.covered = state.covered.max(unacked.newest);
        }
        let payload = PushPayload {
            kind: "new_messages".into(),
            count: unacked.count,
            message_id: unacked.newest.to_string(),
            from: self.include_sender.then(|| pending.from.clone()),
            conversation: self.include_sender.then(|| unacked.conversation.clone()),
        };
        self.send.submit(Job {
            user: key.0.clone(),
            device: key.1.clone(),
            stored: pending.target,
            target,
            payload,
            collapse: collapse_key(&unacked.conversation),
            durable_at: pending.durable_at,
        });
    }

    /// Removes the targets the providers said are gone, unless the device
    /// registered another one since.
    fn prune(&mut self) {
        while let Some((user, device, stored)) = self.send.next_prune() {
            let current = self.tables.push_targets(&user).unwrap_or_default();
            let unchanged = current
                .iter()
                .any(|(d, target)| *d == device && *target == stored);
            if unchanged {
                match self.tables.put_push_target(&user, &device, None) {
                    Ok(()) => tracing::info!("push: removed a target its provider called invalid"),
                    Err(error) => {
                        tracing::warn!(%error, "push: could not remove an invalid target")
                    }
                }
            }
        }
    }

    /// Forgets devices whose window has passed with nothing waiting.
    fn sweep(&mut self) {
        let window = self.window;
        self.devices.retain(|_, state| {
            state.pending.is_some() || state.last_sent.is_some_and(|sent| sent.elapsed() < window)
        });
        self.last_sweep = Instant::now();
    }
}

/// A conversation's collapse key: the same for every push about it, and
/// naming it only by a hash (the providers see the key). 16 hex characters
/// fit every provider's limit (APNs 64 bytes, Web Push `Topic` 32).
pub fn collapse_key(conversation: &str) -> String {
    use std::hash::Hasher;
    let mut hasher = fnv::FnvHasher::default();
    hasher.write(conversation.as_bytes());
    format!("{:016x}", hasher.finish())
}
