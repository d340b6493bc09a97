//! Protocol v1 of the chat gateway, as plain functions over bytes and state.
//!
//! Owns: every wire limit (`limits`), the id rules, conversation ids and
//! home-shard hashing (`ids`), message ids (`snowflake`), bearer tokens
//! (`token`), the HTTP upgrade (`handshake`), WebSocket framing (`ws`), the
//! JSON frames (`frames`; media references in `media`; the key directory's in
//! `keys`; the server frames of groups, receipts and presence in
//! `social_frames`), the stable error and close codes (`codes`), the records
//! shards write to the durable ring (`records`), what a device is shown of a
//! stored record (`render`) and the read path to the storage-writer
//! (`store_wire`), both over one binary field codec (`binary`).
//! `docs/protocol.md` is the contract these implement.
//!
//! Layers, each importing only those before it: `limits`, `binary`, `codes`,
//! `ids`, `snowflake`, `token`; `media`, `keys`; `records`; `frames`,
//! `social_frames`; `render`, `store_wire`; `handshake`, `ws`.
//!
//! Must never: perform I/O, read a clock, or depend on an async runtime. Callers
//! pass the time in, so every function here can be tested and fuzzed byte for byte.

#![forbid(unsafe_code)]

pub mod binary;
pub mod codes;
pub mod frames;
pub mod handshake;
pub mod ids;
pub mod keys;
pub mod limits;
pub mod media;
pub mod push;
pub mod records;
pub mod render;
pub mod snowflake;
pub mod social_frames;
pub mod store_wire;
pub mod token;
pub mod ws;

/// The protocol version this crate implements; sent to clients in `hello`.
pub const PROTOCOL_VERSION: u32 = 1;
