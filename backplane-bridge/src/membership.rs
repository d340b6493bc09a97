//! Which nodes are live, learned from their heartbeats, and the home table
//! built over them.
//!
//! Owns the live set (this node, plus every node heard within the timeout
//! and not leaving), each node's incarnation (a restart with the same id is
//! a change: its exceptions are gone), when each absent node left (so its
//! registrations can be dropped later), and the `HomeTable` for the live set,
//! rebuilt only when the set changed. Pure: the caller passes the time in
//! milliseconds and does all I/O; never a hand-kept list of nodes.

use std::collections::HashMap;
use std::sync::Arc;

use crate::envelope::Heartbeat;
use crate::routing::HomeTable;

#[derive(Debug, Clone)]
struct Peer {
    heard_ms: u64,
    incarnation: u64,
    url: Arc<str>,
}

/// A rebuilt table and the one it replaces.
pub struct Rebuilt {
    pub before: Arc<HomeTable>,
    pub after: Arc<HomeTable>,
    /// Nodes that restarted (a new incarnation) since the last rebuild: the
    /// exceptions they held are lost even if their users' homes did not move.
    pub restarted: Vec<u16>,
}

pub struct Membership {
    me: u16,
    serving: bool,
    timeout_ms: u64,
    peers: HashMap<u16, Peer>,
    /// Nodes not live now, with when they stopped being live.
    departed: HashMap<u16, u64>,
    restarted: Vec<u16>,
    /// A peer's URL changed (or it joined with one) since the last look.
    urls_changed: bool,
    table: Arc<HomeTable>,
}

impl Membership {
    /// A membership of this node alone; others join as they are heard.
    pub fn new(me: u16, timeout_ms: u64) -> Membership {
        Membership {
            me,
            serving: true,
            timeout_ms,
            peers: HashMap::new(),
            departed: HashMap::new(),
            restarted: Vec::new(),
            urls_changed: false,
            table: Arc::new(HomeTable::new(&[me]).expect("one node")),
        }
    }

    pub fn me(&self) -> u16 {
        self.me
    }

    /// Takes this node out of (or back into) its own table: a draining node
    /// is home to nobody, so its users' homes move before it closes them.
    pub fn set_serving(&mut self, serving: bool) {
        self.serving = serving;
    }

    pub fn serving(&self) -> bool {
        self.serving
    }

    /// Takes in another node's heartbeat.
    pub fn observe(&mut self, heartbeat: Heartbeat, now_ms: u64) {
        if heartbeat.node == self.me {
            // Another process with this id (a lost lease, or two nodes given
            // one id by hand): never let it replace this node.
            return;
        }
        if !heartbeat.serving {
            if self.peers.remove(&heartbeat.node).is_some() {
                self.departed.insert(heartbeat.node, now_ms);
            }
            return;
        }
        if let Some(peer) = self.peers.get_mut(&heartbeat.node) {
            peer.heard_ms = now_ms;
            if peer.incarnation != heartbeat.incarnation {
                peer.incarnation = heartbeat.incarnation;
                self.restarted.push(heartbeat.node);
            }
            if *peer.url != *heartbeat.url {
                peer.url = heartbeat.url.into();
                self.urls_changed = true;
            }
            return;
        }
        self.departed.remove(&heartbeat.node);
        self.urls_changed |= !heartbeat.url.is_empty();
        let peer = Peer {
            heard_ms: now_ms,
            incarnation: heartbeat.incarnation,
            url: heartbeat.url.into(),
        };
        self.peers.insert(heartbeat.node, peer);
    }

    /// Drops nodes not heard within the timeout.
    pub fn expire(&mut self, now_ms: u64) {
        let timeout_ms = self.timeout_ms;
        let departed = &mut self.departed;
        self.peers.retain(|node, peer| {
            let live = now_ms.saturating_sub(peer.heard_ms) <= timeout_ms;
            if !live {
                departed.insert(*node, now_ms);
            }
            live
        });
    }

    /// The live nodes, sorted (this node among them while serving).
    pub fn live(&self) -> Vec<u16> {
        let mut nodes: Vec<u16> = self.peers.keys().copied().collect();
        if self.serving {
            nodes.push(self.me);
        }
        nodes.sort_unstable();
        nodes
    }

    /// Rebuilds the table if the live set changed or a node restarted.
    pub fn rebuild(&mut self) -> Option<Rebuilt> {
        let live = self.live();
        if live == self.table.nodes() && self.restarted.is_empty() {
            return None;
        }
        // A node that serves nobody still routes: its last table stands in.
        let after = Arc::new(HomeTable::new(&live)?);
        let before = std::mem::replace(&mut self.table, after.clone());
        Some(Rebuilt {
            before,
            after,
            restarted: std::mem::take(&mut self.restarted),
        })
    }

    /// The home node of `user` in the current table.
    pub fn home(&self, user: &str) -> u16 {
        self.table.home(user)
    }

    pub fn table(&self) -> &Arc<HomeTable> {
        &self.table
    }

    /// Each live peer's `public_url` (those that set one), and whether any
    /// changed since the last call.
    pub fn urls(&mut self) -> (HashMap<u16, Arc<str>>, bool) {
        let urls = self
            .peers
            .iter()
            .filter(|(_, peer)| !peer.url.is_empty())
            .map(|(node, peer)| (*node, peer.url.clone()))
            .collect();
        (urls, std::mem::take(&mut self.urls_changed))
    }

    /// Nodes that have been gone for longer than `for_ms` (their
    /// registrations at this node can go); forgets them.
    pub fn gone_for(&mut self, for_ms: u64, now_ms: u64) -> Vec<u16> {
        let mut gone = Vec::new();
        self.departed.retain(|node, since| {
            let long = now_ms.saturating_sub(*since) > for_ms;
            if long {
                gone.push(*node);
            }
            !long
        });
        gone
    }

    pub fn is_live(&self, node: u16) -> bool {
        (node == self.me && self.serving) || self.peers.contains_key(&node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(node: u16, incarnation: u64, serving: bool) -> Heartbeat {
        Heartbeat {
            node,
            incarnation,
            serving,
            url: format!("ws://node{node}:8080/ws").into(),
        }
    }

    #[test]
    fn nodes_join_when_heard_and_leave_on_timeout_or_when_they_say_so() {
        let mut members = Membership::new(1, 3_000);
        assert!(members.rebuild().is_none(), "alone, nothing changed");
        members.observe(beat(2, 10, true), 0);
        members.observe(beat(3, 11, true), 0);
        let rebuilt = members.rebuild().expect("two joined");
        assert_eq!(rebuilt.before.nodes(), &[1]);
        assert_eq!(rebuilt.after.nodes(), &[1, 2, 3]);
        assert!(members.rebuild().is_none());

        members.observe(beat(2, 10, true), 2_500);
        members.expire(3_500);
        assert_eq!(members.live(), vec![1, 2], "3 was not heard for 3.5 s");
        members.observe(beat(2, 10, false), 3_600);
        assert_eq!(members.live(), vec![1], "2 said it leaves");
        assert!(members.rebuild().is_some());
        assert!(members.gone_for(60_000, 10_000).is_empty());
        let mut gone = members.gone_for(60_000, 70_000);
        gone.sort_unstable();
        assert_eq!(gone, vec![2, 3]);
    }

    #[test]
    fn a_restart_with_the_same_id_is_a_change_and_this_node_cannot_be_replaced() {
        let mut members = Membership::new(1, 3_000);
        members.observe(beat(2, 10, true), 0);
        members.rebuild();
        members.observe(beat(2, 99, true), 100);
        let rebuilt = members.rebuild().expect("a new incarnation");
        assert_eq!(rebuilt.restarted, vec![2]);
        members.observe(beat(1, 5, false), 200);
        assert!(members.is_live(1));
        members.set_serving(false);
        assert_eq!(members.live(), vec![2]);
        assert_eq!(members.rebuild().unwrap().after.nodes(), &[2]);
        assert_eq!(
            members.home("anyone"),
            2,
            "a draining node is home to nobody"
        );
    }
}
