//! A single-producer, single-consumer ring in a shared memory-mapped file,
//! between one gateway shard (producer) and the storage-writer (consumer).
//!
//! Owns the file layout (`layout`), creating or attaching with validation
//! (`open`), appending (`Producer`), reading and advancing the **durable
//! watermark** (`Consumer`), and the cross-process wake-up (a futex in the
//! header). The consumer advances the watermark only after a batch is durable;
//! the producer reuses space only behind it and releases acknowledgements up to
//! it. All `unsafe` in the durable path lives in `mapping.rs`.
//!
//! Must never: block the producer (a full ring is an error the caller handles),
//! read a record the producer has not published, or accept a file whose header
//! does not match (wrong magic, version, sizes, truncated).
//!
//! ```text
//! file:   [ header: 4 KiB ][ data: capacity bytes (power of two) ]
//! header: magic, layout version, header size, capacity, shard id
//!         head     (producer's cache line)   bytes ever appended
//!         durable  (consumer's cache line)   bytes ever made durable
//!         sleeping (futex word)              1 while the consumer is parked
//! record: [len u32][crc32 u32][payload][pad to 8]   (len 0xFFFFFFFF = wrap)
//! ```
//! Positions are monotonically increasing byte counts; `position % capacity`
//! is the offset. A record never straddles the end: the producer writes a
//! wrap marker and continues at offset 0.

mod consumer;
mod layout;
mod mapping;
mod open;
mod producer;

pub use consumer::{Consumer, Record, Watermark};
pub use layout::{
    record_bytes, CAPACITY_BYTES_MAX, CAPACITY_BYTES_MIN, LAYOUT_VERSION, RECORD_PAYLOAD_BYTES_MAX,
};
pub use open::{attach_consumer, attach_existing_consumer, attach_producer, RingOptions};
pub use producer::Producer;

/// Why a ring could not be opened or read. The message names the file and
/// what is wrong, so an operator can tell a misconfiguration from corruption.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a chat ring (magic {found:#018x})")]
    BadMagic { path: String, found: u64 },
    #[error("{path}: layout version {found}, this build reads version {expected}")]
    WrongVersion {
        path: String,
        found: u32,
        expected: u32,
    },
    #[error("{path}: header says {what} is {found}, expected {expected}")]
    Mismatch {
        path: String,
        what: &'static str,
        found: u64,
        expected: u64,
    },
    #[error("{path}: file is {found} bytes, the header needs {expected}")]
    Truncated {
        path: String,
        found: u64,
        expected: u64,
    },
    #[error("{path}: already attached by another {role} (lock held)")]
    Locked { path: String, role: &'static str },
    #[error("ring corrupt at position {position}: {reason}")]
    Corrupt { position: u64, reason: &'static str },
    #[error("invalid ring options: {0}")]
    Options(&'static str),
}

/// The ring has no room for this record until the consumer makes more durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("ring full: {needed} bytes needed, {free} free")]
pub struct RingFull {
    pub needed: u64,
    pub free: u64,
}
