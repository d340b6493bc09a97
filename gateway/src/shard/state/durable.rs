//! A shard's half of the durable path: appending records to its ring and
//! releasing `sent` once the storage-writer says they are durable.
//!
//! Owns the ring producer and the queue of `sent` frames (and backplane
//! publishes, and deliveries held until durable) waiting for the durable
//! watermark (in ring order), and the writer's refusals of held records.
//! Never blocks: a full ring is returned to the caller, who answers the
//! client with a retryable `overloaded`. Never acknowledges a record before
//! the watermark covers it, nor one the writer refused.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::{Rc, Weak};
use std::time::Instant;

use backplane_bridge::Outbound;
use bytes::Bytes;
use chat_ring::{Producer, RingFull};

use super::conn::Conn;
use crate::limits::{LAG_BACKLOG_RECORDS_MIN, LAG_COMMITTING_WITHIN_MS};
use crate::metrics::ShardMetrics;

struct Waiting {
    /// Ring position just past the record; `sent` goes out when it is durable.
    end: u64,
    conn: Weak<Conn>,
    sent: Bytes,
    appended: Instant,
    /// For other nodes' devices, published once durable (see `backplane_bridge`).
    publish: Option<Box<Outbound>>,
    /// Delivered to this node's devices only once durable (a group change,
    /// which the writer may refuse).
    held: Option<Box<Held>>,
}

/// A record delivered only once durable, and only if the writer stored it.
pub struct Held {
    pub message_id: u64,
    pub client_msg_id: Box<str>,
    /// The sender's idempotency key (forgotten if the writer refuses).
    pub idempotency_key: String,
    pub users: Vec<Box<str>>,
    /// The `message` frame, WebSocket-framed.
    pub frame: Bytes,
    /// The sender's connection slot (it gets `sent`, not the message).
    pub except: Option<usize>,
    /// Why the writer did not store it, if it did not.
    pub refused: Option<String>,
    /// The error its sender gets then (`group_full` for a membership
    /// change, `forbidden` for a delete of someone else's message).
    pub refusal_code: chat_protocol::codes::ErrorCode,
}

/// A held record whose fate is known: deliver it (then answer `sent` and
/// publish it, so a sender never hears `sent` for what this node's devices
/// did not get), or tell its sender why not.
pub struct Released {
    pub held: Box<Held>,
    pub sender: Option<Rc<Conn>>,
    pub sent: Bytes,
    pub publish: Option<Box<Outbound>>,
}

pub struct Durability {
    producer: RefCell<Producer>,
    waiting: RefCell<VecDeque<Waiting>>,
    durable: Cell<u64>,
    /// When the watermark last moved (the writer is committing), and the
    /// time it moved before that.
    last_advance: Cell<Instant>,
    previous_advance: Cell<Instant>,
    /// Why the writer's last commit failed, until the watermark moves again.
    failure: RefCell<Option<String>>,
    /// Held records released by the watermark, for the shard's release task.
    released: RefCell<Vec<Released>>,
}

impl Durability {
    pub fn new(producer: Producer) -> Self {
        let durable = producer.durable();
        Self {
            producer: RefCell::new(producer),
            waiting: RefCell::new(VecDeque::new()),
            durable: Cell::new(durable),
            last_advance: Cell::new(Instant::now()),
            previous_advance: Cell::new(Instant::now()),
            failure: RefCell::new(None),
            released: RefCell::new(Vec::new()),
        }
    }

    /// Appends one record and wakes the writer if it sleeps. Returns the
    /// position the watermark must reach for the record to be durable.
    pub fn append(&self, record: &[u8]) -> Result<u64, RingFull> {
        let mut producer = self.producer.borrow_mut();
        let end = producer.try_append(record)?;
        producer.wake_consumer();
        Ok(end)
    }

    pub fn is_durable(&self, end: u64) -> bool {
        end <= self.durable.get()
    }

    /// Sends `sent` to `conn` (and hands `publish` to `published`) once the
    /// record ending at `end` is durable.
    pub fn send_when_durable(
        &self,
        end: u64,
        conn: &Rc<Conn>,
        sent: Bytes,
        publish: Option<Box<Outbound>>,
        held: Option<Box<Held>>,
        published: impl FnOnce(Box<Outbound>),
    ) {
        if self.is_durable(end) && held.is_none() {
            conn.enqueue(sent);
            if let Some(publish) = publish {
                published(publish);
            }
            return;
        }
        self.waiting.borrow_mut().push_back(Waiting {
            end,
            conn: Rc::downgrade(conn),
            sent,
            appended: Instant::now(),
            publish,
            held,
        });
    }

    /// Hands `publish` to `published` once the record ending at `end` is
    /// durable (a record no connection waits for: receipts, a change notice).
    pub fn publish_when_durable(
        &self,
        end: u64,
        publish: Box<Outbound>,
        published: impl FnOnce(Box<Outbound>),
    ) {
        if self.is_durable(end) {
            published(publish);
            return;
        }
        self.waiting.borrow_mut().push_back(Waiting {
            end,
            conn: Weak::new(),
            sent: Bytes::new(),
            appended: Instant::now(),
            publish: Some(publish),
            held: None,
        });
    }

    /// The writer committed everything before `position`: release `sent`
    /// frames and hand what other nodes should see to `published`.
    pub fn on_durable(
        &self,
        position: u64,
        metrics: &ShardMetrics,
        mut published: impl FnMut(Box<Outbound>),
    ) {
        if position <= self.durable.get() {
            return;
        }
        self.durable.set(position);
        self.failure.borrow_mut().take();
        let now = Instant::now();
        self.previous_advance.set(self.last_advance.replace(now));
        let mut waiting = self.waiting.borrow_mut();
        while waiting.front().is_some_and(|w| w.end <= position) {
            let released = waiting.pop_front().expect("front exists");
            metrics.durable_wait(now.duration_since(released.appended));
            let conn = released.conn.upgrade();
            if let Some(held) = released.held {
                // The release task delivers it, then answers and publishes.
                self.released.borrow_mut().push(Released {
                    held,
                    sender: conn,
                    sent: released.sent,
                    publish: released.publish,
                });
                continue;
            }
            if let Some(conn) = conn {
                conn.enqueue(released.sent);
            }
            if let Some(publish) = released.publish {
                published(publish);
            }
        }
    }

    /// The writer did not store the held record `message_id` (it comes
    /// before the `Durable` that covers it).
    pub fn on_refused(&self, message_id: u64, reason: String) {
        let mut waiting = self.waiting.borrow_mut();
        let held = waiting
            .iter_mut()
            .filter_map(|w| w.held.as_mut())
            .find(|held| held.message_id == message_id);
        if let Some(held) = held {
            held.refused = Some(reason);
        }
    }

    /// Whether held records wait for the release task.
    pub fn has_released(&self) -> bool {
        !self.released.borrow().is_empty()
    }

    /// Held records released since the last call.
    pub fn take_released(&self) -> Vec<Released> {
        std::mem::take(&mut *self.released.borrow_mut())
    }

    /// Whether the writer commits but cannot keep up: at least
    /// `LAG_BACKLOG_RECORDS_MIN` records wait (fewer is a slow machine, not
    /// a backlog), the oldest has waited longer than `bound`, it was
    /// appended before the last two watermark moves (with group commit a
    /// record is released by the second move after its append at the
    /// latest, so this one missed whole batches: a backlog, not one slow
    /// fsync), and the watermark moved within `LAG_COMMITTING_WITHIN_MS`
    /// (not `bound`: a writer that is behind commits large batches, each
    /// longer than the bound). When nothing commits at all the writer or its
    /// database is restarting: not lag, and the ring rides it out.
    pub fn is_lagging(&self, bound: std::time::Duration) -> bool {
        let waiting = self.waiting.borrow();
        if waiting.len() < LAG_BACKLOG_RECORDS_MIN {
            return false;
        }
        let Some(oldest) = waiting.front() else {
            return false;
        };
        oldest.appended.elapsed() > bound
            && oldest.appended < self.previous_advance.get()
            && self.last_advance.get().elapsed()
                < std::time::Duration::from_millis(LAG_COMMITTING_WITHIN_MS)
    }

    /// The writer says its commits fail (see `store_wire::Response::Stalled`).
    pub fn on_stalled(&self, reason: String) {
        *self.failure.borrow_mut() = Some(reason);
    }

    /// How long nothing has been made durable while a record waits: the
    /// writer or its store is away, or failing (a full disk). `None` while
    /// records become durable or none waits.
    pub fn stalled_for(&self) -> Option<std::time::Duration> {
        let waiting = self.waiting.borrow();
        let oldest = waiting.front()?;
        let since = oldest.appended.max(self.last_advance.get());
        Some(since.elapsed())
    }

    /// What the writer last said was failing, if it said anything since
    /// the watermark last moved.
    pub fn failure(&self) -> Option<String> {
        self.failure.borrow().clone()
    }

    /// `sent` frames waiting for durability (a metric).
    pub fn waiting(&self) -> usize {
        self.waiting.borrow().len()
    }
}
