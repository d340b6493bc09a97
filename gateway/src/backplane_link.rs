//! The gateway's end of the backplane: starting the bridge, and routing what
//! it receives to the right shard.
//!
//! Owns the `Sink` the bridge thread calls: a message for a user goes to that
//! user's home shard (as a ready WebSocket frame), a registration
//! confirmation and a moved user's resync likewise, a reconnect to every
//! shard. Never blocks: a full
//! shard queue is reported back to the bridge, which retries briefly.

use std::sync::Arc;

use backplane_bridge::{Backplane, BackplaneConfig, Inbound, Sink};
use bytes::Bytes;
use chat_protocol::{ids, ws};

use crate::config::Config;
use crate::mesh::{Delivery, Mesh, PerDeviceDelivery, Revocation, Sender, ShardMessage};

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
                let message = match split_bodies(json, user) {
                    Some(frames) => ShardMessage::DeliverPerDevice(Box::new(PerDeviceDelivery {
                        to_user: user.clone(),
                        message_id: *message_id,
                        frames,
                    })),
                    None => ShardMessage::Deliver(Delivery {
                        to_user: user.clone(),
                        message_id: *message_id,
                        frame: Bytes::from(ws::text_frame(json)),
                    }),
                };
                let home = ids::home_shard(user, shards);
                self.mesh.send(Sender::External, home, message).is_ok()
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
            Inbound::Moved {
                user,
                since_unix_ms,
            } => {
                let home = ids::home_shard(user, shards);
                let resync = ShardMessage::ResyncUser {
                    user: user.clone(),
                    since_unix_ms: *since_unix_ms,
                };
                self.mesh.send(Sender::External, home, resync).is_ok()
            }
            Inbound::Revoked { user, device } => {
                let home = ids::home_shard(user, shards);
                let revocation = ShardMessage::Revoke(Box::new(Revocation {
                    user: user.clone(),
                    device: device.clone(),
                    order: None,
                }));
                self.mesh.send(Sender::External, home, revocation).is_ok()
            }
            Inbound::GroupChanged { group } => {
                for shard in 0..shards {
                    let changed = ShardMessage::GroupChanged(group.clone());
                    let _ = self.mesh.send(Sender::External, shard, changed);
                }
                true
            }
            Inbound::Reconnected { since_unix_ms } => {
                for shard in 0..shards {
                    // A shard whose queue is full now gets the next resync.
                    let resync = ShardMessage::Resync {
                        since_unix_ms: *since_unix_ms,
                    };
                    let _ = self.mesh.send(Sender::External, shard, resync);
                }
                true
            }
        }
    }
}

/// A message with per-device ciphertexts, as one frame per device of
/// `user` (its own ciphertext as `body`, the others left out); `None` for
/// any other message.
/// Only such a message has the key `"bodies":` at its top level (inside a
/// JSON string a quote is escaped, so the bytes cannot appear there).
fn split_bodies(json: &[u8], user: &str) -> Option<Vec<(Box<str>, Bytes)>> {
    const KEY: &[u8] = br#""bodies":"#;
    if !json.windows(KEY.len()).any(|window| window == KEY) {
        return None;
    }
    let mut value: serde_json::Value = serde_json::from_slice(json).ok()?;
    let object = value.as_object_mut()?;
    let bodies = object.remove("bodies")?;
    let bodies = bodies.as_object()?;
    let mut frames = Vec::with_capacity(bodies.len());
    for (key, body) in bodies {
        let Some((owner, device)) = key.split_once('/') else {
            continue;
        };
        if owner != user {
            continue;
        }
        object.insert("body".into(), body.clone());
        let json = serde_json::to_vec(&object).ok()?;
        frames.push((Box::from(device), Bytes::from(ws::text_frame(&json))));
    }
    Some(frames)
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
            heartbeat_interval: std::time::Duration::from_millis(config.membership_heartbeat_ms),
            public_url: config.public_url.clone(),
        },
        Arc::new(MeshSink { mesh: mesh.clone() }),
    )?;
    tracing::info!(url = %config.nats_url, "backplane starting");
    Ok(Some(backplane))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_per_device_message_is_split_and_each_frame_has_one_body() {
        let plain = br#"{"type":"message","body":"he said \"bodies\": no","to":"bob"}"#;
        assert!(split_bodies(plain, "bob").is_none());
        let per_device = br#"{"type":"message","body":"","bodies":{"alice/pad":"c0","bob/laptop":"c1","bob/phone":"c2"}}"#;
        let frames = split_bodies(per_device, "bob").unwrap();
        assert_eq!(frames.len(), 2);
        for ((device, frame), expected) in frames.iter().zip(["c1", "c2"]) {
            let text = std::str::from_utf8(&frame[2..]).unwrap();
            let value: serde_json::Value = serde_json::from_str(text).unwrap();
            assert_eq!(value["body"], expected, "{device}");
            assert!(value.get("bodies").is_none());
        }
    }
}
