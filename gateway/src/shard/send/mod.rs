//! The layer between the shard's state and its features: replies, delivery,
//! membership look-ups, the per-device check, and the one send pipeline.
//!
//! Files here import `state` and each other downwards only (`reply` and
//! `deliver` at the bottom, then `pipeline`, with `group_change` on top)
//! and never a feature.

pub mod deliver;
pub mod devices;
pub mod group_change;
pub mod members;
pub mod pipeline;
pub mod reply;
