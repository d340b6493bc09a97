//! Where a user lives in the fleet: each user's home node, computed by every
//! node from the live membership alone (no look-up, no directory).
//!
//! Owns `HomeTable`, a Maglev lookup table (Eisenbud et al., "Maglev: A Fast
//! and Reliable Software Network Load Balancer", NSDI 2016): `TABLE_SLOTS`
//! slots, each owned by one live node, filled so that every node owns an
//! almost equal share and a node joining or leaving moves little more than
//! its own share of users. A lookup is one hash and one array read. The hash
//! and the fill order are fixed here (not a dependency's), because every node
//! of a fleet, of any build, must compute the same table from the same
//! membership. Pure: no I/O, no clock; the bridge feeds it the membership.

/// Slots in the table: a prime, so every skip visits every slot. 262,147
/// slots give each of 4,000 nodes about 65, in 512 KiB of `u16`s, and build
/// in ~6 ms. Measured with `bench fleet` (4,000 nodes, 10M users): users per
/// node max/mean 1.089, which is the users' own sampling noise (1M or 4M
/// slots give 1.079 and 1.076); a node leaving moves ~8x its own share of
/// users, Maglev's known price for its balance and O(1) look-up, and about
/// the same at every table size from 65,537 to 4,194,301 slots.
pub const TABLE_SLOTS: usize = 262_147;

/// A user's key on the table: FNV-1a of the id, then a SplitMix64 finalizer
/// with a seed, so it is independent of the home-shard hash (`ids::home_shard`).
pub fn user_hash(user: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in user.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(hash ^ 0x6a09_e667_f3bc_c909)
}

/// SplitMix64's finalizer: every input bit affects every output bit.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Which node is home to each slot, for one membership.
#[derive(Debug, Clone)]
pub struct HomeTable {
    slots: Vec<u16>,
    nodes: Vec<u16>,
}

impl HomeTable {
    /// The table for the live `nodes` (any order, duplicates ignored).
    /// `None` when there is no live node.
    pub fn new(nodes: &[u16]) -> Option<HomeTable> {
        let mut nodes = nodes.to_vec();
        nodes.sort_unstable();
        nodes.dedup();
        if nodes.is_empty() {
            return None;
        }
        let m = TABLE_SLOTS as u64;
        // Each node's preference order over the slots: offset, then steps of
        // skip (never 0, and coprime with the prime table size).
        let mut next: Vec<(u64, u64, u64)> = nodes
            .iter()
            .map(|node| {
                let offset = mix(u64::from(*node) ^ 0x243f_6a88_85a3_08d3) % m;
                let skip = mix(u64::from(*node) ^ 0x1319_8a2e_0370_7344) % (m - 1) + 1;
                (offset, skip, 0)
            })
            .collect();
        const EMPTY: u16 = u16::MAX;
        let mut slots = vec![EMPTY; TABLE_SLOTS];
        let mut filled = 0;
        // Round robin over the nodes, each taking its next preferred free
        // slot, until every slot has a home.
        'fill: loop {
            for (index, (offset, skip, tried)) in next.iter_mut().enumerate() {
                loop {
                    let slot = ((*offset + *tried * *skip) % m) as usize;
                    *tried += 1;
                    if slots[slot] == EMPTY {
                        slots[slot] = nodes[index];
                        filled += 1;
                        break;
                    }
                }
                if filled == TABLE_SLOTS {
                    break 'fill;
                }
            }
        }
        Some(HomeTable { slots, nodes })
    }

    /// The home node of a user whose `user_hash` is `hash`.
    pub fn home_of_hash(&self, hash: u64) -> u16 {
        self.slots[(hash % TABLE_SLOTS as u64) as usize]
    }

    /// The home node of `user`.
    pub fn home(&self, user: &str) -> u16 {
        self.home_of_hash(user_hash(user))
    }

    /// The live nodes this table was built from, sorted.
    pub fn nodes(&self) -> &[u16] {
        &self.nodes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_node_computes_the_same_homes_from_the_same_membership() {
        let one = HomeTable::new(&[7, 3, 900, 12]).unwrap();
        let other = HomeTable::new(&[12, 900, 3, 7, 3]).unwrap();
        for user in ["alice", "bob", "carol", "a-very-long-user-id-0123456789"] {
            assert_eq!(one.home(user), other.home(user));
            assert!(one.nodes().contains(&one.home(user)));
        }
        assert!(HomeTable::new(&[]).is_none());
    }

    #[test]
    fn homes_are_balanced_and_a_leaving_node_moves_about_its_share() {
        let nodes: Vec<u16> = (0..100).collect();
        let table = HomeTable::new(&nodes).unwrap();
        let mut per_node = [0u32; 100];
        let users: Vec<String> = (0..200_000).map(|i| format!("user{i}")).collect();
        for user in &users {
            per_node[table.home(user) as usize] += 1;
        }
        let mean = users.len() as f64 / 100.0;
        let max = *per_node.iter().max().unwrap() as f64;
        assert!(max / mean < 1.1, "max/mean {}", max / mean);

        let fewer: Vec<u16> = (0..100).filter(|n| *n != 42).collect();
        let after = HomeTable::new(&fewer).unwrap();
        let moved = users
            .iter()
            .filter(|u| table.home(u) != after.home(u))
            .count();
        let share = moved as f64 / users.len() as f64;
        // Node 42 held about 1%; Maglev moves a little more than that.
        assert!(share > 0.005 && share < 0.03, "moved {share}");
        assert!(users.iter().all(|u| after.home(u) != 42));
    }
}
