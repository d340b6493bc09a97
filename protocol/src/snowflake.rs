//! Snowflake message ids: time, node, shard and sequence packed into 63 bits.
//!
//! Owns the bit layout and a per-shard generator that needs no coordination.
//! The generator never reads a clock: the caller passes the wall-clock time, and
//! the generator keeps ids strictly increasing even when that time steps back.
//!
//! Layout, most significant first (bit 63 stays 0 so ids fit a signed 64-bit column):
//! `41 bits ms since EPOCH_UNIX_MS | 12 bits node | 5 bits shard | 5 bits sequence`.
//!
//! Version 1 of the layout had 10 node, 6 shard and 6 sequence bits. The time
//! field kept its width and position, so an id of either layout decodes to
//! the same timestamp, and every id made after an upgrade is larger than
//! every id made before it (ordering and time-bounded scans hold across it).

/// 2026-01-01T00:00:00Z. 41 bits of milliseconds last about 69 years from here.
pub const EPOCH_UNIX_MS: u64 = 1_767_225_600_000;
pub const TIME_BITS: u32 = 41;
/// 4,096 nodes: the reference design's largest fleet (4,000 connection
/// nodes), each id leased from the fleet (see `backplane-bridge`'s leases).
pub const NODE_BITS: u32 = 12;
/// 32 shards (cores) per gateway process. A larger machine runs two
/// processes on one port (SO_REUSEPORT), each with its own node id.
pub const SHARD_BITS: u32 = 5;
/// 32 ids per millisecond per shard: 32,000 stored messages a second on one
/// core, above the ~10,000 a shard sustains here with durability on
/// (BENCHMARKS.md); a burst beyond it borrows the next milliseconds.
pub const SEQUENCE_BITS: u32 = 5;
const _: () = assert!(TIME_BITS + NODE_BITS + SHARD_BITS + SEQUENCE_BITS == 63);

/// Highest node id (4,095): a fleet of up to 4,096 gateway nodes.
/// Stands for "not stored" where an id is carried (typing, presence): no
/// id made after the epoch is 0.
pub const EPHEMERAL_ID: u64 = 0;

pub const NODE_ID_MAX: u16 = (1 << NODE_BITS) - 1;
/// Highest shard id (31): up to 32 cores per gateway process.
pub const SHARD_ID_MAX: u16 = (1 << SHARD_BITS) - 1;
const SEQUENCE_MAX: u64 = (1 << SEQUENCE_BITS) - 1;

/// The fields of an id, for logs, tests and storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnowflakeParts {
    pub unix_ms: u64,
    pub node_id: u16,
    pub shard_id: u16,
    pub sequence: u16,
}

/// Splits an id into its fields.
pub fn decode(id: u64) -> SnowflakeParts {
    let sequence = id & SEQUENCE_MAX;
    let shard = (id >> SEQUENCE_BITS) & u64::from(SHARD_ID_MAX);
    let node = (id >> (SEQUENCE_BITS + SHARD_BITS)) & u64::from(NODE_ID_MAX);
    let time = id >> (SEQUENCE_BITS + SHARD_BITS + NODE_BITS);
    SnowflakeParts {
        unix_ms: time + EPOCH_UNIX_MS,
        node_id: node as u16,
        shard_id: shard as u16,
        sequence: sequence as u16,
    }
}

/// The smallest id any generator can make at `unix_ms` (for time-bounded scans).
pub fn first_id_at(unix_ms: u64) -> u64 {
    unix_ms
        .saturating_sub(EPOCH_UNIX_MS)
        .min((1 << TIME_BITS) - 1)
        << (SEQUENCE_BITS + SHARD_BITS + NODE_BITS)
}

/// Generates ids for one shard. Owned by that shard's thread; never shared.
#[derive(Debug)]
pub struct SnowflakeGenerator {
    node_id: u16,
    shard_id: u16,
    /// Milliseconds since the epoch of the last id; may run ahead of the wall
    /// clock when the clock steps back or more than 32 ids are made in one ms.
    last_ms: u64,
    sequence: u64,
}

impl SnowflakeGenerator {
    /// Panics when `node_id` or `shard_id` do not fit their bits: that is a
    /// configuration error the caller must have rejected at start-up.
    pub fn new(node_id: u16, shard_id: u16) -> Self {
        assert!(node_id <= NODE_ID_MAX, "node id {node_id} > {NODE_ID_MAX}");
        assert!(
            shard_id <= SHARD_ID_MAX,
            "shard id {shard_id} > {SHARD_ID_MAX}"
        );
        Self {
            node_id,
            shard_id,
            last_ms: 0,
            sequence: 0,
        }
    }

    /// The next id, strictly greater than every id this generator made before.
    pub fn next_id(&mut self, now_unix_ms: u64) -> u64 {
        let now_ms = now_unix_ms.saturating_sub(EPOCH_UNIX_MS);
        if now_ms > self.last_ms {
            self.last_ms = now_ms;
            self.sequence = 0;
        } else if self.sequence < SEQUENCE_MAX {
            // Same millisecond, or the clock stepped back: keep counting on the
            // logical clock so ids stay strictly increasing.
            self.sequence += 1;
        } else {
            // Sequence exhausted: borrow the next millisecond.
            self.last_ms += 1;
            self.sequence = 0;
        }
        assert!(
            self.last_ms < (1 << TIME_BITS),
            "snowflake time bits exhausted"
        );
        (self.last_ms << (NODE_BITS + SHARD_BITS + SEQUENCE_BITS))
            | (u64::from(self.node_id) << (SHARD_BITS + SEQUENCE_BITS))
            | (u64::from(self.shard_id) << SEQUENCE_BITS)
            | self.sequence
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = EPOCH_UNIX_MS + 1_000_000;

    #[test]
    fn fields_round_trip() {
        let mut generator = SnowflakeGenerator::new(513, 7);
        let id = generator.next_id(NOW);
        assert_eq!(
            decode(id),
            SnowflakeParts {
                unix_ms: NOW,
                node_id: 513,
                shard_id: 7,
                sequence: 0
            }
        );
        assert!(id < (1 << 63), "bit 63 stays clear");
    }

    #[test]
    fn first_id_at_bounds_every_id_of_that_millisecond() {
        let at = EPOCH_UNIX_MS + 5_000;
        let mut generator = SnowflakeGenerator::new(NODE_ID_MAX, SHARD_ID_MAX);
        let id = generator.next_id(at);
        assert!(first_id_at(at) <= id && id < first_id_at(at + 1));
        assert_eq!(decode(first_id_at(at)).unix_ms, at);
        assert_eq!(first_id_at(0), 0, "before the epoch");
    }

    #[test]
    fn ids_strictly_increase_within_one_millisecond_and_past_the_sequence() {
        let mut generator = SnowflakeGenerator::new(1, 1);
        let mut previous = 0;
        for _ in 0..1_000 {
            let id = generator.next_id(NOW);
            assert!(id > previous);
            previous = id;
        }
        // 1,000 ids at one instant borrowed ms ahead; time then catches up.
        assert!(decode(previous).unix_ms > NOW);
    }

    #[test]
    fn ids_strictly_increase_when_the_clock_steps_back() {
        let mut generator = SnowflakeGenerator::new(1, 1);
        let before = generator.next_id(NOW);
        let after_step_back = generator.next_id(NOW - 60_000);
        assert!(after_step_back > before);
        let after_recovery = generator.next_id(NOW + 1);
        assert!(after_recovery > after_step_back);
        assert_eq!(decode(after_recovery).unix_ms, NOW + 1);
    }

    #[test]
    fn different_shards_never_collide_at_the_same_instant() {
        let mut a = SnowflakeGenerator::new(3, 0);
        let mut b = SnowflakeGenerator::new(3, 1);
        let ids_a: Vec<u64> = (0..100).map(|_| a.next_id(NOW)).collect();
        let ids_b: Vec<u64> = (0..100).map(|_| b.next_id(NOW)).collect();
        assert!(ids_a.iter().all(|id| !ids_b.contains(id)));
    }

    #[test]
    #[should_panic(expected = "node id")]
    fn node_id_out_of_range_is_refused() {
        SnowflakeGenerator::new(NODE_ID_MAX + 1, 0);
    }

    #[test]
    fn ids_of_the_first_layout_keep_their_time_and_sort_before_new_ids() {
        // Layout 1: 41 bits ms | 10 node | 6 shard | 6 sequence.
        let ms = 1_000_000u64;
        let old = (ms << 22) | (1023 << 12) | (63 << 6) | 63;
        assert_eq!(decode(old).unix_ms, EPOCH_UNIX_MS + ms);
        let mut generator = SnowflakeGenerator::new(NODE_ID_MAX, SHARD_ID_MAX);
        assert!(generator.next_id(EPOCH_UNIX_MS + ms + 1) > old);
    }
}
