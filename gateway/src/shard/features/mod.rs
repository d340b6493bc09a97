//! The shard's features, each in its own file: direct messages, groups,
//! receipts, presence, the key directory, push registration, revocation, and
//! sync/history/ack.
//!
//! A feature decides what a client frame means (who may do it, what record
//! it makes, who receives it) and hands storing, delivering and answering to
//! `send::pipeline`. Features import `send` and `state`, never each other.

pub mod direct;
pub mod groups;
pub mod keys;
pub mod presence;
pub mod push;
pub mod receipts;
pub mod revocation;
pub mod sync;
