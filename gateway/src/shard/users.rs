//! The per-core user table: which connections each user homed on this shard has.
//!
//! Owns the map from user id to that user's live devices. Belongs to one shard
//! thread (`Rc`, `!Send`); every device of a user is here, so delivery to all of
//! them is a local loop with no locks. Never does I/O: it queues frames.

use std::collections::HashMap;
use std::rc::Rc;

use bytes::Bytes;
use smallvec::SmallVec;

use super::connection::Conn;

type FnvBuildHasher = std::hash::BuildHasherDefault<fnv::FnvHasher>;
/// A user's devices. Most users have one connected device: stored inline,
/// it costs no allocation (24 bytes either way; a `Vec` would add 32 on the heap).
type Devices = SmallVec<[Rc<Conn>; 1]>;

/// Users homed on this shard with at least one connection.
#[derive(Default)]
pub struct UserTable {
    users: HashMap<Rc<str>, Devices, FnvBuildHasher>,
}

impl UserTable {
    pub fn add(&mut self, conn: Rc<Conn>) {
        self.users
            .entry(conn.user_id.clone())
            .or_default()
            .push(conn);
    }

    pub fn remove(&mut self, conn: &Conn) {
        if let Some(devices) = self.users.get_mut(&*conn.user_id) {
            devices.retain(|device| device.slot != conn.slot);
            if devices.is_empty() {
                self.users.remove(&*conn.user_id);
            }
        }
    }

    /// The shared user id for `user_id` if the user has a connection here
    /// (lets new connections share one allocation of the id).
    pub fn interned(&self, user_id: &str) -> Option<Rc<str>> {
        self.users
            .get_key_value(user_id)
            .map(|(key, _)| key.clone())
    }

    /// Queues `frame` to every device of `user_id` except the connection in
    /// slot `except`. Returns how many devices it was queued to.
    pub fn deliver(&self, user_id: &str, frame: &Bytes, except: Option<usize>) -> usize {
        let Some(devices) = self.users.get(user_id) else {
            return 0;
        };
        let mut delivered = 0;
        for device in devices.iter().filter(|device| Some(device.slot) != except) {
            if device.enqueue(frame.clone()) {
                delivered += 1;
            }
        }
        delivered
    }

    pub fn user_count(&self) -> usize {
        self.users.len()
    }
}
