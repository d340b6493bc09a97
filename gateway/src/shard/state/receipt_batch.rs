//! Receipts waiting for the end of their batching window.
//!
//! Owns the pending map: per (sender told, conversation), each reader
//! device's highest receipt of each status. Bounded: a batch that reaches
//! `RECEIPTS_PER_RECORD_MAX` or a map that reaches `RECEIPTS_PENDING_MAX`
//! asks for an early flush. Never stores or sends: `features::receipts` does.

use std::collections::HashMap;
use std::rc::Rc;

use chat_protocol::records::{ReceiptStatus, RECEIPTS_PER_RECORD_MAX};

use crate::limits::RECEIPTS_PENDING_MAX;

/// One reader device's receipt, merged to the highest message.
pub struct Pending {
    pub user: Rc<str>,
    pub device: Box<str>,
    pub status: ReceiptStatus,
    pub up_to: u64,
}

/// (sender told, conversation).
pub type BatchKey = (Box<str>, Box<str>);

/// Receipts waiting for the end of the window.
#[derive(Default)]
pub struct ReceiptBatcher {
    pending: HashMap<BatchKey, Vec<Pending>>,
}

impl ReceiptBatcher {
    /// Adds (or merges) one receipt; true when the batcher should flush now.
    pub fn add(&mut self, key: BatchKey, receipt: Pending) -> bool {
        let entries = self.pending.entry(key).or_default();
        let same = entries.iter_mut().find(|p| {
            p.status == receipt.status && p.user == receipt.user && p.device == receipt.device
        });
        match same {
            Some(pending) => pending.up_to = pending.up_to.max(receipt.up_to),
            None => entries.push(receipt),
        }
        let batch_full = entries.len() >= RECEIPTS_PER_RECORD_MAX;
        batch_full || self.pending.len() >= RECEIPTS_PENDING_MAX
    }

    /// Everything waiting, leaving the batcher empty.
    pub fn take(&mut self) -> HashMap<BatchKey, Vec<Pending>> {
        std::mem::take(&mut self.pending)
    }
}
