//! The gateway's end of the backplane: starting the bridge, and routing what
//! it receives to the right shard.
//!
//! Owns the `Sink` the bridge thread calls: a message for a user goes to that
//! user's home shard (as a ready WebSocket frame), a subscription
//! confirmation likewise, a reconnect to every shard. Never blocks: a full
//! shard queue is reported back to the bridge, which retries briefly.

use std::sync::Arc;

use bytes::Bytes;
use chat_backplane::{Backplane, BackplaneConfig, Inbound, Sink};
use chat_protocol::{ids, ws};

use crate::config::Config;
use crate::mesh::{Delivery, Mesh, Sender, ShardMessage};

struct MeshSink {
    mesh: Arc<Mesh>,
}

impl Sink for MeshSink {
    fn deliver(&self, inbound: &Inbound) -> bool {
        let shards = self.mesh.shard_count();
        match inbound {
            Inbound::Deliver {
                user,
                message_id,
                json,
            } => {
                let delivery = Delivery {
                    to_user: user.clone(),
                    message_id: *message_id,
                    frame: Bytes::from(ws::text_frame(json)),
                };
                let home = ids::home_shard(user, shards);
                self.mesh
                    .send(Sender::External, home, ShardMessage::Deliver(delivery))
                    .is_ok()
            }
            Inbound::InterestActive { user } => {
                let home = ids::home_shard(user, shards);
                self.mesh
                    .send(
                        Sender::External,
                        home,
                        ShardMessage::InterestActive(user.clone()),
                    )
                    .is_ok()
            }
            Inbound::GroupChanged { group } => {
                for shard in 0..shards {
                    let changed = ShardMessage::GroupChanged(group.clone());
                    let _ = self.mesh.send(Sender::External, shard, changed);
                }
                true
            }
            Inbound::Reconnected => {
                for shard in 0..shards {
                    // A shard whose queue is full now gets the next resync.
                    let _ = self
                        .mesh
                        .send(Sender::External, shard, ShardMessage::Resync);
                }
                true
            }
        }
    }
}

/// Starts the backplane when `nats_url` is set.
pub fn start(config: &Config, mesh: &Arc<Mesh>) -> anyhow::Result<Option<Arc<Backplane>>> {
    if config.nats_url.is_empty() {
        return Ok(None);
    }
    let backplane = Backplane::start(
        BackplaneConfig {
            url: config.nats_url.clone(),
            node_id: config.node_id,
            shards: config.shards,
            queue_capacity: config.backplane_queue_capacity,
            subject_prefix: config.nats_subject_prefix.clone(),
        },
        Arc::new(MeshSink { mesh: mesh.clone() }),
    )?;
    tracing::info!(url = %config.nats_url, "backplane starting");
    Ok(Some(backplane))
}
