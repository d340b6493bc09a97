//! Group member lists a shard has loaded from storage, with who may post.
//!
//! Owns the cache (bounded by `GROUP_CACHE_ENTRIES_MAX`; a list is trusted
//! for `group_cache_ms` or until a change is announced) and the membership
//! test on a sorted list. Never asks storage itself: `send::members` loads
//! a list and puts it here.

use std::collections::HashMap;
use std::rc::Rc;

use crate::limits::GROUP_CACHE_ENTRIES_MAX;

/// A group's members, sorted.
pub type Members = Rc<[Box<str>]>;

struct Cached {
    members: Members,
    /// Who may post: `None` for every member, else the admins (a group
    /// restricted to its admins).
    posters: Option<Members>,
    loaded_ms: u64,
}

/// Member lists this shard loaded, by group.
#[derive(Default)]
pub struct GroupCache {
    entries: HashMap<Box<str>, Cached>,
}

impl GroupCache {
    /// The list of `group`, if it was loaded less than `ttl_ms` ago.
    pub fn get(&self, group: &str, monotonic_ms: u64, ttl_ms: u64) -> Option<Members> {
        self.fresh(group, monotonic_ms, ttl_ms)
            .map(|cached| cached.members.clone())
    }

    /// Who may post in `group` (`Some(None)`: every member), if its entry
    /// is fresh.
    pub fn posters(&self, group: &str, monotonic_ms: u64, ttl_ms: u64) -> Option<Option<Members>> {
        self.fresh(group, monotonic_ms, ttl_ms)
            .map(|cached| cached.posters.clone())
    }

    fn fresh(&self, group: &str, monotonic_ms: u64, ttl_ms: u64) -> Option<&Cached> {
        let cached = self.entries.get(group)?;
        (monotonic_ms.saturating_sub(cached.loaded_ms) < ttl_ms).then_some(cached)
    }

    pub fn put(
        &mut self,
        group: &str,
        members: Members,
        posters: Option<Members>,
        monotonic_ms: u64,
    ) {
        if self.entries.len() >= GROUP_CACHE_ENTRIES_MAX && !self.entries.contains_key(group) {
            self.entries.clear();
        }
        let loaded_ms = monotonic_ms;
        let entry = Cached {
            members,
            posters,
            loaded_ms,
        };
        self.entries.insert(group.into(), entry);
    }

    pub fn forget(&mut self, group: &str) {
        self.entries.remove(group);
    }

    pub fn clear(&mut self) {
        self.entries.clear();
    }
}

/// Whether `user` is in the sorted list `members`.
pub fn is_member(members: &[Box<str>], user: &str) -> bool {
    members
        .binary_search_by(|member| (**member).cmp(user))
        .is_ok()
}
