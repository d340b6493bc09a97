//! The per-core user table: which connections each user homed on this shard
//! has, each user's allowances, and whether its presence was written.
//!
//! Owns the map from user id to that user's live devices and token buckets
//! (sends, typing, key fetches, presence).
//! Belongs to one shard thread (`Rc`, `!Send`); every device of a user is here,
//! so delivery to all of them is a local loop and the rate limit holds across
//! devices with no locks. Never does I/O: it queues frames.

use std::collections::HashMap;
use std::rc::Rc;

use bytes::Bytes;
use smallvec::SmallVec;

use super::conn::Conn;
use super::token_bucket::{Limit, TokenBucket};

type FnvBuildHasher = std::hash::BuildHasherDefault<fnv::FnvHasher>;
/// A user's devices. Most users have one connected device: stored inline,
/// it costs no allocation (24 bytes either way; a `Vec` would add 32 on the heap).
type Devices = SmallVec<[Rc<Conn>; 1]>;

/// A user homed here: their connected devices and their shared send allowance.
struct UserEntry {
    devices: Devices,
    /// Sends across all of the user's devices (they are all on this shard).
    sends: TokenBucket,
    /// `typing` frames across all of the user's devices.
    typing: TokenBucket,
    /// Key-bundle fetches across all of the user's devices.
    fetches: TokenBucket,
    /// `presence` requests across all of the user's devices.
    presence: TokenBucket,
    /// Storage has been told this user is online (see `presence`).
    presence_written: bool,
}

/// A user's allowances (token-bucket limits), shared by all of their devices.
#[derive(Debug, Clone, Copy)]
pub struct UserLimits {
    pub sends: Limit,
    pub typing: Limit,
    pub fetches: Limit,
    pub presence: Limit,
}

/// Which allowance to take from.
#[derive(Debug, Clone, Copy)]
pub enum Allowance {
    Send,
    Typing,
    KeyFetch,
    Presence,
}

/// Users homed on this shard with at least one connection.
pub struct UserTable {
    users: HashMap<Rc<str>, UserEntry, FnvBuildHasher>,
    limits: UserLimits,
}

impl UserTable {
    pub fn new(limits: UserLimits) -> Self {
        Self {
            users: HashMap::default(),
            limits,
        }
    }

    /// Adds a device. True when it is the user's first device here.
    pub fn add(&mut self, conn: Rc<Conn>, now_ms: u64) -> bool {
        let limits = self.limits;
        let entry = self
            .users
            .entry(conn.user_id.clone())
            .or_insert_with(|| UserEntry {
                devices: Devices::new(),
                sends: TokenBucket::full(limits.sends, now_ms),
                typing: TokenBucket::full(limits.typing, now_ms),
                fetches: TokenBucket::full(limits.fetches, now_ms),
                presence: TokenBucket::full(limits.presence, now_ms),
                presence_written: false,
            });
        entry.devices.push(conn);
        entry.devices.len() == 1
    }

    /// Removes a device. When it was the user's last device here, says
    /// whether storage had been told the user was online.
    pub fn remove(&mut self, conn: &Conn) -> Option<bool> {
        if let Some(entry) = self.users.get_mut(&*conn.user_id) {
            entry.devices.retain(|device| device.slot != conn.slot);
            if entry.devices.is_empty() {
                let written = entry.presence_written;
                self.users.remove(&*conn.user_id);
                return Some(written);
            }
        }
        None
    }

    /// Records whether storage has been told `user_id` is online. False
    /// when the user has no device here.
    pub fn set_presence_written(&mut self, user_id: &str, written: bool) -> bool {
        match self.users.get_mut(user_id) {
            Some(entry) => {
                entry.presence_written = written;
                true
            }
            None => false,
        }
    }

    /// Calls `each` with every user that has a device here (`all`), or only
    /// with those not yet written online, and marks each as written online.
    pub fn write_presence(&mut self, all: bool, mut each: impl FnMut(&Rc<str>)) {
        for (user, entry) in self.users.iter_mut() {
            if all || !entry.presence_written {
                entry.presence_written = true;
                each(user);
            }
        }
    }

    /// Takes one from `user_id`'s `allowance`, or says in how many ms the next is due.
    pub fn take(&mut self, user_id: &str, allowance: Allowance, now_ms: u64) -> Result<(), u64> {
        let Some(entry) = self.users.get_mut(user_id) else {
            return Ok(());
        };
        let (bucket, limit) = match allowance {
            Allowance::Send => (&mut entry.sends, self.limits.sends),
            Allowance::Typing => (&mut entry.typing, self.limits.typing),
            Allowance::KeyFetch => (&mut entry.fetches, self.limits.fetches),
            Allowance::Presence => (&mut entry.presence, self.limits.presence),
        };
        bucket.try_take(limit, now_ms)
    }

    /// The shared user id for `user_id` if the user has a connection here
    /// (lets new connections share one allocation of the id).
    pub fn interned(&self, user_id: &str) -> Option<Rc<str>> {
        self.users
            .get_key_value(user_id)
            .map(|(key, _)| key.clone())
    }

    /// Queues message `message_id` (encoded as `frame`) to every device of
    /// `user_id` except the connection in slot `except`. Returns how many
    /// devices it was queued to (or held for, while they sync).
    pub fn deliver(
        &self,
        user_id: &str,
        message_id: u64,
        frame: &Bytes,
        except: Option<usize>,
    ) -> usize {
        let Some(entry) = self.users.get(user_id) else {
            return 0;
        };
        let mut delivered = 0;
        for device in entry
            .devices
            .iter()
            .filter(|device| Some(device.slot) != except)
        {
            if device.deliver(message_id, frame.clone()) {
                delivered += 1;
            }
        }
        delivered
    }

    /// Queues to each device of `user_id` (except slot `except`) the frame
    /// addressed to it in `frames` (device, frame); others get nothing.
    pub fn deliver_per_device(
        &self,
        user_id: &str,
        message_id: u64,
        frames: &[(Box<str>, Bytes)],
        except: Option<usize>,
    ) {
        let Some(entry) = self.users.get(user_id) else {
            return;
        };
        for device in entry.devices.iter().filter(|d| Some(d.slot) != except) {
            if let Some((_, frame)) = frames.iter().find(|(id, _)| **id == *device.device_id) {
                device.deliver(message_id, frame.clone());
            }
        }
    }

    /// How many distinct devices of `user_id` other than `device_id` have a
    /// connection here (a device reconnecting is not a new device).
    pub fn other_devices(&self, user_id: &str, device_id: &str) -> usize {
        let Some(entry) = self.users.get(user_id) else {
            return 0;
        };
        let mut others: SmallVec<[&str; 8]> = entry
            .devices
            .iter()
            .map(|conn| &*conn.device_id)
            .filter(|device| *device != device_id)
            .collect();
        others.sort_unstable();
        others.dedup();
        others.len()
    }

    /// The connections of `user_id`'s devices here.
    pub fn devices_of(&self, user_id: &str) -> Vec<Rc<Conn>> {
        self.users
            .get(user_id)
            .map(|entry| entry.devices.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Whether `user_id` has a device here.
    pub fn is_online(&self, user_id: &str) -> bool {
        self.users.contains_key(user_id)
    }

    pub fn user_count(&self) -> usize {
        self.users.len()
    }
}
