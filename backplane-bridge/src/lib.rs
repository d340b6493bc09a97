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

pub use bridge::{
    groups_subject, node_subject, nodes_subject, Backplane, BackplaneConfig, BackplaneStats,
    Inbound, Outbound, Sink, HEARTBEATS_MISSED_MAX,
};

/// The NATS servers in `urls`: one address, or several separated by commas
/// (the servers of a cluster; the client also learns the others from the
/// first it reaches). An error names the address that does not parse.
pub fn server_addrs(urls: &str) -> Result<Vec<async_nats::ServerAddr>, String> {
    let addresses: Vec<_> = urls
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(|url| {
            url.parse::<async_nats::ServerAddr>()
                .map_err(|error| format!("NATS address {url:?}: {error}"))
        })
        .collect::<Result<_, _>>()?;
    if addresses.is_empty() {
        return Err(format!("no NATS address in {urls:?}"));
    }
    Ok(addresses)
}

/// Runs `task` on a new thread named `name`, in a current-thread tokio
/// runtime of its own: async-nats needs tokio, and the shards (monoio) must
/// never run or await it.
fn runtime_thread(
    name: &str,
    task: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a current-thread runtime builds")
                .block_on(task)
        })
}
