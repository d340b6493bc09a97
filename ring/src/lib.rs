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
mod error;
mod layout;
mod mapping;
mod open;
mod producer;

pub use consumer::{ring_doorbell, wait_any, Consumer, Record, Watermark};
pub use error::{RingError, RingFull};
pub use layout::{
    record_bytes, CAPACITY_BYTES_MAX, CAPACITY_BYTES_MIN, LAYOUT_VERSION, RECORD_PAYLOAD_BYTES_MAX,
};
pub use open::{attach_consumer, attach_existing_consumer, attach_producer, RingOptions};
pub use producer::Producer;
