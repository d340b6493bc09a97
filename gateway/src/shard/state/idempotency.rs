//! Idempotency of `send`: remembers (user, device, client message id) for a window.
//!
//! Owns the shard-local table and its bounds (time window and entry count;
//! the oldest entries are forgotten first). All devices of a user live on this
//! shard, so a local table sees every retry. After a restart the table is
//! empty; a device's recent sends are loaded from storage when it connects
//! (`features::sync::warm_idempotency`), before any of its frames are read.

use std::collections::{HashMap, VecDeque};

type FnvBuildHasher = std::hash::BuildHasherDefault<fnv::FnvHasher>;

/// What a first `send` was answered with; a retry is answered the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriorSend {
    pub message_id: u64,
    pub conversation: String,
    /// Ring position that must be durable before `sent` is repeated (0: stored).
    pub end: u64,
}

pub struct IdempotencyTable {
    window_ms: u64,
    entries_max: usize,
    entries: HashMap<Box<str>, PriorSend, FnvBuildHasher>,
    /// Keys in insertion order with their expiry, for eviction.
    expiry: VecDeque<(u64, Box<str>)>,
}

/// The table key: the three ids joined by a byte no id can contain.
pub fn key(user_id: &str, device_id: &str, client_msg_id: &str) -> String {
    let mut key = String::with_capacity(user_id.len() + device_id.len() + client_msg_id.len() + 2);
    key.push_str(user_id);
    key.push('\n');
    key.push_str(device_id);
    key.push('\n');
    key.push_str(client_msg_id);
    key
}

impl IdempotencyTable {
    pub fn new(window_ms: u64, entries_max: usize) -> Self {
        assert!(entries_max > 0);
        Self {
            window_ms,
            entries_max,
            entries: HashMap::default(),
            expiry: VecDeque::new(),
        }
    }

    pub fn get(&mut self, key: &str, now_ms: u64) -> Option<&PriorSend> {
        self.evict(now_ms);
        self.entries.get(key)
    }

    pub fn insert(&mut self, key: String, prior: PriorSend, now_ms: u64) {
        self.evict(now_ms);
        while self.entries.len() >= self.entries_max {
            let Some((_, oldest)) = self.expiry.pop_front() else {
                break;
            };
            self.entries.remove(&oldest);
        }
        let key: Box<str> = key.into();
        self.expiry
            .push_back((now_ms + self.window_ms, key.clone()));
        self.entries.insert(key, prior);
    }

    fn evict(&mut self, now_ms: u64) {
        while let Some((expires_ms, _)) = self.expiry.front() {
            if *expires_ms > now_ms {
                break;
            }
            let (_, key) = self.expiry.pop_front().expect("front exists");
            self.entries.remove(&key);
        }
    }

    /// Forgets `key` (a send the writer refused: its retry is a new send).
    pub fn remove(&mut self, key: &str) {
        self.entries.remove(key);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prior(message_id: u64) -> PriorSend {
        PriorSend {
            message_id,
            conversation: "dm:a:b".into(),
            end: 0,
        }
    }

    #[test]
    fn a_retry_within_the_window_finds_the_first_answer() {
        let mut table = IdempotencyTable::new(1_000, 10);
        table.insert(key("alice", "phone", "c1"), prior(42), 0);
        assert_eq!(
            table.get(&key("alice", "phone", "c1"), 999),
            Some(&prior(42))
        );
        assert_eq!(
            table.get(&key("alice", "laptop", "c1"), 999),
            None,
            "keys are per device"
        );
        assert_eq!(
            table.get(&key("alice", "phone", "c1"), 1_000),
            None,
            "window over"
        );
        assert_eq!(table.len(), 0);
    }

    #[test]
    fn the_table_never_exceeds_its_bound() {
        let mut table = IdempotencyTable::new(u64::MAX / 2, 3);
        for index in 0..10 {
            table.insert(
                key("alice", "phone", &format!("c{index}")),
                prior(index),
                index,
            );
        }
        assert_eq!(table.len(), 3);
        assert_eq!(table.get(&key("alice", "phone", "c9"), 10), Some(&prior(9)));
        assert_eq!(table.get(&key("alice", "phone", "c0"), 10), None);
    }
}
