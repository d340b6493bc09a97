//! The byte layout of a ring file: header fields, their offsets, record framing.
//!
//! Owns every constant both processes must agree on; changing any of them
//! means a new `LAYOUT_VERSION`. Pure arithmetic, no I/O, no `unsafe`.

/// "CHATRNG1" as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"CHATRNG1");
pub const LAYOUT_VERSION: u32 = 1;
/// The header occupies the first page.
pub const HEADER_BYTES: u64 = 4096;

pub const OFFSET_MAGIC: usize = 0;
pub const OFFSET_VERSION: usize = 8;
pub const OFFSET_HEADER_BYTES: usize = 12;
pub const OFFSET_CAPACITY: usize = 16;
pub const OFFSET_SHARD: usize = 24;
/// Written by the producer only; its own cache line.
pub const OFFSET_HEAD: usize = 128;
/// Written by the consumer only; its own cache line.
pub const OFFSET_DURABLE: usize = 256;
/// Futex word: 1 while the consumer sleeps waiting for records.
pub const OFFSET_SLEEPING: usize = 384;

/// Smallest data region: 64 KiB.
pub const CAPACITY_BYTES_MIN: u64 = 64 * 1024;
/// Largest data region: 1 GiB.
pub const CAPACITY_BYTES_MAX: u64 = 1 << 30;
/// Record header: payload length and CRC-32 of the payload.
pub const RECORD_HEADER_BYTES: u64 = 8;
/// `len` value of a wrap marker: skip to the start of the data region.
pub const WRAP_MARKER: u32 = u32::MAX;
/// Largest payload; a record must also fit in a quarter of the ring.
pub const RECORD_PAYLOAD_BYTES_MAX: u64 = 16 * 1024 * 1024;

// The layout's invariants, checked at compile time. Read-only fields end before
// the first written one; head (producer), durable (consumer) and the futex word
// each start a 128-byte region of their own (two lines, against adjacent-line
// prefetch), and all fit in the header page.
const _: () = {
    assert!(OFFSET_SHARD + 4 <= OFFSET_HEAD);
    assert!(
        OFFSET_HEAD.is_multiple_of(128)
            && OFFSET_DURABLE.is_multiple_of(128)
            && OFFSET_SLEEPING.is_multiple_of(128)
    );
    assert!(OFFSET_DURABLE - OFFSET_HEAD >= 128 && OFFSET_SLEEPING - OFFSET_DURABLE >= 128);
    assert!((OFFSET_SLEEPING as u64) + 8 <= HEADER_BYTES);
    assert!(CAPACITY_BYTES_MIN.is_power_of_two() && CAPACITY_BYTES_MAX.is_power_of_two());
};

/// Bytes a record with `payload_bytes` of payload occupies (header, payload, padding to 8).
pub fn record_bytes(payload_bytes: u64) -> u64 {
    (RECORD_HEADER_BYTES + payload_bytes).div_ceil(8) * 8
}

pub fn encode_record_header(payload_len: u32, crc: u32) -> [u8; 8] {
    let mut header = [0u8; 8];
    header[..4].copy_from_slice(&payload_len.to_le_bytes());
    header[4..].copy_from_slice(&crc.to_le_bytes());
    header
}

pub fn decode_record_header(header: [u8; 8]) -> (u32, u32) {
    let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
    (len, crc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_padded_to_eight_bytes() {
        assert_eq!(record_bytes(0), 8);
        assert_eq!(record_bytes(1), 16);
        assert_eq!(record_bytes(8), 16);
        assert_eq!(record_bytes(9), 24);
    }
}
