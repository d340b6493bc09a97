//! A device's delivery state in its user's inbox: what it has acknowledged.
//!
//! Owns the cursor's rules and encoding, shared by every backend. Inbox
//! sequences are gap-free per user, but acknowledgements arrive in any order
//! (live delivery order is not sequence order across shards), so the state is
//! "everything through `through`, plus these above it" rather than one
//! number: a single high-water mark would skip a message that became durable
//! after a later one was acknowledged. Never grows without bound: past
//! `ABOVE_MAX` the highest entries are forgotten, which can only cause a
//! redelivery (clients dedupe by message id), never a loss.

use chat_protocol::binary::{DecodeError, Decoder, Encoder};

/// Acknowledged sequences kept above `through`.
pub const ABOVE_MAX: usize = 1024;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor {
    /// Every inbox sequence up to and including this one is acknowledged.
    pub through: u64,
    /// Acknowledged sequences above `through`, ascending.
    pub above: Vec<u64>,
}

impl Cursor {
    pub fn is_acked(&self, seq: u64) -> bool {
        seq <= self.through || self.above.binary_search(&seq).is_ok()
    }

    /// Records `seq` as acknowledged and folds contiguous runs into `through`.
    pub fn ack(&mut self, seq: u64) {
        if self.is_acked(seq) {
            return;
        }
        let at = self.above.partition_point(|s| *s < seq);
        self.above.insert(at, seq);
        self.fold();
        self.above.truncate(ABOVE_MAX);
    }

    /// Moves the run of `above` that continues `through` into it.
    fn fold(&mut self) {
        let run = self
            .above
            .iter()
            .enumerate()
            .take_while(|(index, s)| **s == self.through + 1 + *index as u64)
            .count();
        if run > 0 {
            self.through += run as u64;
            self.above.drain(..run);
        }
    }

    /// Counts everything up to and including `seq` as acknowledged (entries
    /// retention removed), folding what follows.
    pub fn skip_through(&mut self, seq: u64) {
        if seq <= self.through {
            return;
        }
        self.through = seq;
        let passed = self.above.partition_point(|s| *s <= seq);
        self.above.drain(..passed);
        self.fold();
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut encoder = Encoder::with_capacity(10 + 8 * self.above.len());
        encoder.u64(self.through).u16(self.above.len() as u16);
        for seq in &self.above {
            encoder.u64(*seq);
        }
        encoder.bytes
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut decoder = Decoder::new(bytes);
        let through = decoder.u64()?;
        let count = usize::from(decoder.u16()?);
        if count > ABOVE_MAX {
            return Err(DecodeError("cursor holds too many entries"));
        }
        let mut above = Vec::with_capacity(count);
        for _ in 0..count {
            above.push(decoder.u64()?);
        }
        decoder.finish()?;
        Ok(Self { through, above })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_order_acks_fold_into_through_and_nothing_is_skipped() {
        let mut cursor = Cursor::default();
        cursor.ack(2);
        cursor.ack(4);
        assert!(!cursor.is_acked(1), "1 was never acknowledged");
        assert!(!cursor.is_acked(3));
        assert_eq!(cursor.through, 0);
        cursor.ack(1);
        assert_eq!((cursor.through, cursor.above.clone()), (2, vec![4]));
        cursor.ack(3);
        assert_eq!((cursor.through, cursor.above.clone()), (4, vec![]));
        cursor.ack(3);
        assert_eq!(cursor.through, 4, "a repeated ack changes nothing");
        assert_eq!(Cursor::decode(&cursor.encode()), Ok(cursor));
    }

    #[test]
    fn the_state_is_bounded_and_overflow_only_forgets_acks() {
        let mut cursor = Cursor::default();
        for seq in (2..=ABOVE_MAX as u64 + 100).rev() {
            cursor.ack(seq);
        }
        assert_eq!(cursor.above.len(), ABOVE_MAX);
        assert!(!cursor.is_acked(1));
        assert!(cursor.is_acked(2), "the lowest acks are kept");
        assert!(
            !cursor.is_acked(ABOVE_MAX as u64 + 100),
            "the highest were forgotten: redelivered, not lost"
        );
        let decoded = Cursor::decode(&cursor.encode()).unwrap();
        assert_eq!(decoded, cursor);
    }

    #[test]
    fn skipping_removed_entries_folds_the_acks_above_them() {
        let mut cursor = Cursor::default();
        cursor.ack(3);
        cursor.ack(6);
        cursor.ack(7);
        cursor.skip_through(5);
        assert_eq!((cursor.through, cursor.above.clone()), (7, vec![]));
        cursor.skip_through(2);
        assert_eq!(cursor.through, 7, "never moves back");
        cursor.ack(10);
        cursor.skip_through(8);
        assert_eq!((cursor.through, cursor.above.clone()), (8, vec![10]));
        assert!(!cursor.is_acked(9), "9 is still owed");
    }
}
