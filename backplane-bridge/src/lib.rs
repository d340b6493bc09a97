//! The backplane bridge: carries messages between gateway nodes over NATS.
//!
//! Owns one NATS connection per node (async-nats, on its own thread with a
//! small tokio runtime, because the shards are monoio and must never await
//! NATS), routing by home (`routing`: every user has a home node computed
//! from the live membership (`membership`, from heartbeats); a node serving
//! a user homed elsewhere registers there (`exceptions`) and the home
//! forwards), a few subjects per node whatever its users, the binary
//! envelope (`envelope`), and the bounded queues to and from the shards.
//! Publishes happen once a message is durable, so a node that registers and
//! then syncs misses nothing. Also the node-id lease (`lease`): a fleet's
//! nodes take their ids from NATS.
//!
//! Must never: block a shard (a full queue is handed back to the caller), grow
//! without bound (every queue has a capacity; what does not fit is counted and
//! dropped, and the recipient gets it on its next sync, since it is durable),
//! or publish while disconnected (the reconnect triggers a resync instead).

#![forbid(unsafe_code)]

mod bridge;
pub mod envelope;
mod exceptions;
pub mod lease;
pub mod membership;
pub mod routing;
mod runtime;
mod servers;

pub use servers::server_addrs;

pub use bridge::{
    groups_subject, node_subject, nodes_subject, Backplane, BackplaneConfig, BackplaneStats,
    Inbound, Outbound, Sink, HEARTBEATS_MISSED_MAX,
};
