//! One WebSocket connection's state: its bounded outbox, its close decision,
//! its liveness clock, its sync hold, its pause, its frame allowance.
//!
//! Owns `Conn`, which the shard's tables, the send pipeline and the
//! connection's socket task all share (`Rc`, one shard thread). Never
//! touches the socket: it queues bytes and wakes the task (`socket.rs`) that
//! writes them, and a full outbox closes the connection (4001) rather than
//! growing. Imports nothing of the shard but the token bucket.

use std::cell::{Cell, RefCell};
use std::collections::{HashSet, VecDeque};
use std::rc::Rc;
use std::task::Waker;

use bytes::Bytes;
use chat_protocol::codes::CloseCode;

use super::token_bucket::TokenBucket;

/// A registered connection, shared between its task and the shard's tables.
pub struct Conn {
    /// Key in the shard's connection slab.
    pub slot: usize,
    pub user_id: Rc<str>,
    pub device_id: Box<str>,
    /// Encoded bytes waiting to be written, oldest first. Bounded by
    /// `outbox_bytes_max`. Only the socket task takes from it.
    pub outbox: RefCell<VecDeque<Bytes>>,
    /// Bytes in `outbox` not yet written.
    pub outbox_bytes: Cell<u32>,
    outbox_bytes_max: u32,
    /// Set once; the task closes the connection with this code.
    close: Cell<Option<CloseCode>>,
    waker: Cell<Option<Waker>>,
    /// True between a wake and the task's next poll (coalesces wakes).
    notified: Cell<bool>,
    /// Shard monotonic clock (ms) of the last bytes received.
    last_seen_ms: Cell<u64>,
    /// (start of the current minute on the shard clock, wrapping; client errors in it).
    errors_in_window: Cell<(u32, u32)>,
    /// Text frames this connection may still send (rate limit).
    pub frames: Cell<TokenBucket>,
    /// While a sync runs: live messages held back until it ends (boxed, so
    /// an idle connection pays one pointer).
    sync: Cell<Option<Box<SyncHold>>>,
    /// True while a frame of this connection waits for storage; its later
    /// frames are not read until then (their order is kept).
    paused: Cell<bool>,
    /// The connect-time warm-up hit its bound: an unknown send id may still
    /// be an older send, so storage is asked before a new id is made.
    warm_truncated: Cell<bool>,
}

/// What a connection holds while its sync runs.
#[derive(Default)]
struct SyncHold {
    /// Live messages that arrived during the sync, in order.
    held: Vec<(u64, Bytes)>,
    held_bytes: usize,
    /// Message ids the sync sent, so a held live copy is not sent twice.
    synced: HashSet<u64, FnvBuildHasher>,
    /// A resync asked for while this sync ran: it runs next, from the
    /// messages made since this id.
    then_from: Option<u64>,
}

type FnvBuildHasher = std::hash::BuildHasherDefault<fnv::FnvHasher>;

/// The message id of frames that are never stored (typing).
pub const EPHEMERAL: u64 = chat_protocol::snowflake::EPHEMERAL_ID;

impl Conn {
    pub fn new(
        slot: usize,
        user_id: Rc<str>,
        device_id: &str,
        outbox_bytes_max: usize,
        frames: TokenBucket,
        monotonic_ms: u64,
    ) -> Self {
        Self {
            slot,
            user_id,
            device_id: device_id.into(),
            outbox: RefCell::new(VecDeque::new()),
            outbox_bytes: Cell::new(0),
            outbox_bytes_max: u32::try_from(outbox_bytes_max)
                .expect("config bounds send_queue_bytes_max below 4 GiB"),
            close: Cell::new(None),
            waker: Cell::new(None),
            notified: Cell::new(false),
            last_seen_ms: Cell::new(monotonic_ms),
            errors_in_window: Cell::new((monotonic_ms as u32, 0)),
            frames: Cell::new(frames),
            sync: Cell::new(None),
            paused: Cell::new(false),
            warm_truncated: Cell::new(false),
        }
    }

    /// Stops processing this connection's frames until `resume`.
    pub fn pause(&self) {
        self.paused.set(true);
    }

    /// Processes this connection's frames again, from where they stopped.
    pub fn resume(&self) {
        self.paused.set(false);
        self.wake();
    }

    pub fn is_paused(&self) -> bool {
        self.paused.get()
    }

    pub fn set_warm_truncated(&self, truncated: bool) {
        self.warm_truncated.set(truncated);
    }

    pub fn warm_truncated(&self) -> bool {
        self.warm_truncated.get()
    }

    /// Queues a live message; while a sync runs it is held until the sync
    /// ends. An ephemeral frame (`message_id` 0: typing) is dropped instead:
    /// it would be stale by then.
    pub fn deliver(&self, message_id: u64, frame: Bytes) -> bool {
        let Some(mut hold) = self.sync.take() else {
            return self.enqueue(frame);
        };
        if message_id == EPHEMERAL {
            self.sync.set(Some(hold));
            return false;
        }
        let fits = hold.held_bytes + frame.len() <= self.outbox_bytes_max as usize;
        if fits {
            hold.held_bytes += frame.len();
            hold.held.push((message_id, frame));
        }
        self.sync.set(Some(hold));
        if !fits {
            self.request_close(CloseCode::SlowConsumer);
        }
        fits && !self.is_closing()
    }

    /// Starts holding live messages for a sync. False if one is running.
    pub fn begin_sync(&self) -> bool {
        let hold = self.sync.take();
        let running = hold.is_some();
        self.sync.set(Some(hold.unwrap_or_default()));
        !running
    }

    /// Queues a message the sync read from storage.
    pub fn enqueue_synced(&self, message_id: u64, frame: Bytes) -> bool {
        if let Some(mut hold) = self.sync.take() {
            hold.synced.insert(message_id);
            self.sync.set(Some(hold));
        }
        self.enqueue(frame)
    }

    /// Ends the sync: queues the held live messages it did not already send.
    /// Ends the sync: queues the held live messages it did not send.
    /// Returns the first id of a resync asked for meanwhile.
    pub fn end_sync(&self) -> Option<u64> {
        let hold = self.sync.take()?;
        for (message_id, frame) in hold.held {
            if !hold.synced.contains(&message_id) && !self.enqueue(frame) {
                break;
            }
        }
        hold.then_from
    }

    /// A resync of messages from id `first` while a sync runs: it runs once
    /// this one ends (from the earliest such id). False when no sync runs.
    pub fn queue_resync(&self, first: u64) -> bool {
        let Some(mut hold) = self.sync.take() else {
            return false;
        };
        hold.then_from = Some(hold.then_from.map_or(first, |then| then.min(first)));
        self.sync.set(Some(hold));
        true
    }

    /// Bytes waiting to be written to the socket.
    pub fn queued_bytes(&self) -> usize {
        self.outbox_bytes.get() as usize
    }

    /// Queues encoded bytes. A full outbox closes the connection as a slow
    /// consumer (4001) and returns false; so does a closing connection.
    pub fn enqueue(&self, bytes: Bytes) -> bool {
        if self.close.get().is_some() {
            return false;
        }
        let queued = u64::from(self.outbox_bytes.get()) + bytes.len() as u64;
        if queued > u64::from(self.outbox_bytes_max) {
            self.request_close(CloseCode::SlowConsumer);
            return false;
        }
        self.outbox_bytes.set(queued as u32);
        self.outbox.borrow_mut().push_back(bytes);
        self.wake();
        true
    }

    /// Asks the task to close with `code`; the first request wins.
    pub fn request_close(&self, code: CloseCode) {
        if self.close.get().is_none() {
            self.close.set(Some(code));
            self.wake();
        }
    }

    pub fn is_closing(&self) -> bool {
        self.close.get().is_some()
    }

    /// Closed because its device was revoked or its account deleted: it is
    /// not coming back as itself, so it leaves no sighting or presence row.
    pub fn was_revoked(&self) -> bool {
        matches!(
            self.close.get(),
            Some(CloseCode::Revoked | CloseCode::AccountDeleted)
        )
    }

    pub fn last_seen_ms(&self) -> u64 {
        self.last_seen_ms.get()
    }

    /// Bytes arrived at `monotonic_ms` (the heartbeat sweep reads it).
    pub fn seen_at(&self, monotonic_ms: u64) {
        self.last_seen_ms.set(monotonic_ms);
    }

    /// The close code asked for, if any.
    pub fn close_code(&self) -> Option<CloseCode> {
        self.close.get()
    }

    /// Counts a client error; true when the connection passed `errors_max` in a minute.
    pub fn count_error(&self, monotonic_ms: u64, errors_max: u32) -> bool {
        let now = monotonic_ms as u32;
        let (window_start_ms, count) = self.errors_in_window.get();
        let (window_start_ms, count) = if now.wrapping_sub(window_start_ms) >= 60_000 {
            (now, 1)
        } else {
            (window_start_ms, count + 1)
        };
        self.errors_in_window.set((window_start_ms, count));
        count > errors_max
    }

    pub fn has_outbound(&self) -> bool {
        !self.outbox.borrow().is_empty()
    }

    fn wake(&self) {
        if self.notified.replace(true) {
            return;
        }
        if let Some(waker) = self.waker.take() {
            waker.wake_by_ref();
            self.waker.set(Some(waker));
        }
    }

    /// The socket task is about to wait: wake `waker` on the next enqueue or close.
    pub fn register(&self, waker: &Waker) {
        self.notified.set(false);
        let current = self.waker.take();
        self.waker.set(Some(match current {
            Some(current) if current.will_wake(waker) => current,
            _ => waker.clone(),
        }));
    }
}
