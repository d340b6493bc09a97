//! What a shard has written about who is online, for the debounce.
//!
//! Owns the count of users who came online since the last tick and the
//! users who left and are yet to be written offline. (Whether an online
//! user was written is a flag in its user-table entry: no per-user set
//! here.) Never writes: `features::presence` turns it into records.

use std::collections::HashMap;
use std::rc::Rc;

use super::users::UserTable;

/// Users who left and are yet to be written offline. (Whether an online
/// user was written is a flag in its user-table entry: no per-user set here.)
#[derive(Default)]
pub struct PresenceLog {
    /// Users who came online and were not written since the last tick (a
    /// tick with none scans nothing).
    pub fresh: usize,
    /// Left (last device gone): when, and whether it had been written online.
    pub gone: HashMap<Rc<str>, (u64, bool)>,
}

impl PresenceLog {
    /// The user's first device here connected. Back within the interval
    /// after leaving: nothing new to write (the debounce).
    pub fn came_online(&mut self, user: &Rc<str>, users: &mut UserTable) {
        let written = match self.gone.remove(user) {
            Some((_, written)) => written,
            None => false,
        };
        users.set_presence_written(user, written);
        if !written {
            self.fresh += 1;
        }
    }

    /// The user's last device here went away.
    pub fn went_offline(&mut self, user: &Rc<str>, now_unix_ms: u64, written: bool) {
        self.gone.insert(user.clone(), (now_unix_ms, written));
    }
}
