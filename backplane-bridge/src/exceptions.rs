//! What a home node knows about its users' devices elsewhere: the other nodes
//! that serve devices of a user homed here (each an *exception* to "devices
//! live on their home").
//!
//! Owns user → nodes, registered by those nodes and removed when they say so,
//! when they have been gone long enough, or when the user's home moved away
//! (after the settle time, so senders that still use the old table are
//! forwarded meanwhile). Pure data: no I/O, no clock; never more than one
//! entry per (user, node).

use std::collections::HashMap;

#[derive(Debug, Default)]
pub struct Exceptions {
    by_user: HashMap<Box<str>, Vec<u16>>,
    entries: usize,
}

impl Exceptions {
    /// `node` has devices of `user`. True when that is news.
    pub fn register(&mut self, user: &str, node: u16) -> bool {
        let nodes = match self.by_user.get_mut(user) {
            Some(nodes) => nodes,
            None => self.by_user.entry(user.into()).or_default(),
        };
        if nodes.contains(&node) {
            return false;
        }
        nodes.push(node);
        self.entries += 1;
        true
    }

    pub fn unregister(&mut self, user: &str, node: u16) {
        if let Some(nodes) = self.by_user.get_mut(user) {
            let before = nodes.len();
            nodes.retain(|n| *n != node);
            self.entries -= before - nodes.len();
            if nodes.is_empty() {
                self.by_user.remove(user);
            }
        }
    }

    /// The nodes with devices of `user` (other than this one).
    pub fn nodes_of(&self, user: &str) -> &[u16] {
        self.by_user.get(user).map_or(&[], Vec::as_slice)
    }

    /// Forgets every registration by `node` (it is gone).
    pub fn forget_node(&mut self, node: u16) {
        self.retain(|_, n| n != node);
    }

    /// Keeps the (user, node) entries for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&str, u16) -> bool) {
        let mut entries = 0;
        self.by_user.retain(|user, nodes| {
            nodes.retain(|node| keep(user, *node));
            entries += nodes.len();
            !nodes.is_empty()
        });
        self.entries = entries;
    }

    /// Every (user, node) entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u16)> + '_ {
        self.by_user
            .iter()
            .flat_map(|(user, nodes)| nodes.iter().map(move |node| (&**user, *node)))
    }

    /// (user, node) entries held.
    pub fn entries(&self) -> usize {
        self.entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrations_are_counted_once_and_removed_every_way() {
        let mut exceptions = Exceptions::default();
        assert!(exceptions.register("bob", 2));
        assert!(!exceptions.register("bob", 2));
        assert!(exceptions.register("bob", 3));
        assert!(exceptions.register("carol", 2));
        assert_eq!(exceptions.entries(), 3);
        assert_eq!(exceptions.nodes_of("bob"), &[2, 3]);
        exceptions.unregister("bob", 3);
        exceptions.unregister("bob", 7);
        assert_eq!(exceptions.nodes_of("bob"), &[2]);
        exceptions.forget_node(2);
        assert_eq!(exceptions.entries(), 0);
        assert!(exceptions.nodes_of("carol").is_empty());
        exceptions.register("dave", 4);
        exceptions.register("erin", 4);
        exceptions.retain(|user, _| user != "dave");
        assert_eq!(exceptions.entries(), 1);
        assert_eq!(exceptions.nodes_of("erin"), &[4]);
    }
}
