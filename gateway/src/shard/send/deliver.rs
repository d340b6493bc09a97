//! Queuing encoded frames to users' devices: on this shard directly, on
//! other shards through one hand-off per shard, on other nodes through the
//! backplane.
//!
//! Owns fan-out to a list of users (one `Deliver` or `DeliverMany` per
//! other shard), a per-device message's frames (each device only its own),
//! the check that every shard a delivery needs has room, and ephemeral
//! frames (typing, `keys_low`: never stored, dropped where a queue is full).
//! Never stores anything and never decides who should receive a message.

use backplane_bridge::Outbound;
use bytes::Bytes;
use chat_protocol::records::MessageRecord;
use chat_protocol::{frames, ids, render, ws};
use smallvec::SmallVec;

use crate::mesh::{Delivery, ManyDelivery, PerDeviceDelivery, Sender, ShardMessage};
use crate::metrics::bump;
use crate::shard::state::conn::EPHEMERAL;
use crate::shard::state::Shard;

/// Whether every shard other than this one that is home to one of `users`
/// has room for one more hand-off. Checked before a record is stored: once
/// it is in the ring, its hand-offs must not fail.
pub fn shards_have_room(shard: &Shard, users: &[&str]) -> bool {
    let count = shard.mesh.shard_count();
    // Shard ids fit a u64 (the snowflake's shard field is 6 bits): a bitmap
    // of the shards checked, with no allocation on the send path.
    debug_assert!(count <= 64);
    let mut checked: u64 = 1 << shard.id;
    for user in users {
        let home = ids::home_shard(user, count);
        if checked & (1 << home) == 0 {
            if !shard.mesh.has_room(Sender::Shard(shard.id), home) {
                return false;
            }
            checked |= 1 << home;
        }
    }
    true
}

/// Queues `frame` to every device of `users`: here directly (not to the
/// connection in slot `except`), one hand-off per other shard. Returns how
/// many shards it was handed to, or `Err` with that count when some shard's
/// queue was full (its users get it on their next sync).
pub fn fan_out(
    shard: &Shard,
    users: &[&str],
    message_id: u64,
    frame: &Bytes,
    except: Option<usize>,
) -> Result<usize, usize> {
    let count = shard.mesh.shard_count();
    // Users homed elsewhere, by home shard. Inline for the common 1:1 case
    // (no allocation); a group's list is sorted by shard, keeping order.
    let mut remote: SmallVec<[(usize, Box<str>); 2]> = SmallVec::new();
    {
        let table = shard.users.borrow();
        for user in users {
            let home = ids::home_shard(user, count);
            if home == shard.id {
                table.deliver(user, message_id, frame, except);
            } else {
                remote.push((home, (*user).into()));
            }
        }
    }
    remote.sort_by_key(|(home, _)| *home);
    let mut handed = 0;
    let mut all_handed = true;
    let mut rest = &mut remote[..];
    while let Some(home) = rest.first().map(|(home, _)| *home) {
        let same = rest.iter().take_while(|(h, _)| *h == home).count();
        let (these, later) = rest.split_at_mut(same);
        rest = later;
        let delivery = match these {
            [(_, user)] => ShardMessage::Deliver(Delivery {
                to_user: std::mem::take(user),
                message_id,
                frame: frame.clone(),
            }),
            _ => ShardMessage::DeliverMany(Box::new(ManyDelivery {
                to_users: these
                    .iter_mut()
                    .map(|(_, user)| std::mem::take(user))
                    .collect(),
                message_id,
                frame: frame.clone(),
            })),
        };
        all_handed &= shard
            .mesh
            .send(Sender::Shard(shard.id), home, delivery)
            .is_ok();
        handed += 1;
        bump(&shard.metrics().messages_routed_cross_shard, 1);
    }
    if all_handed {
        Ok(handed)
    } else {
        Err(handed)
    }
}

/// Each of `user`'s devices gets its own ciphertext of a per-device
/// message (a device with none gets nothing), here or on the user's home
/// shard. Returns whether it was handed to another shard, or `Err` when
/// that shard's queue was full.
pub fn deliver_per_device(
    shard: &Shard,
    record: &MessageRecord<'_>,
    user: &str,
    except: Option<usize>,
) -> Result<bool, ()> {
    let frames: Vec<(Box<str>, Bytes)> = record
        .bodies_of(user)
        .map(|(device, body)| {
            let mut frame = render::message_frame(record);
            frame.body = body;
            let json = frames::encode_message(&frame);
            (Box::from(device), Bytes::from(ws::text_frame(&json)))
        })
        .collect();
    let home = ids::home_shard(user, shard.mesh.shard_count());
    if home == shard.id {
        let table = shard.users.borrow();
        table.deliver_per_device(user, record.message_id, &frames, except);
        return Ok(false);
    }
    let delivery = ShardMessage::DeliverPerDevice(Box::new(PerDeviceDelivery {
        to_user: user.into(),
        message_id: record.message_id,
        frames,
    }));
    bump(&shard.metrics().messages_routed_cross_shard, 1);
    match shard.mesh.send(Sender::Shard(shard.id), home, delivery) {
        Ok(()) => Ok(true),
        Err(_) => Err(()),
    }
}

/// Queues an ephemeral frame (never stored, never held for a syncing
/// device) to every device of `users`: on their home shards here, and on
/// other nodes through the backplane at once. Dropped where a queue is full.
pub fn deliver_ephemeral(shard: &Shard, users: &[&str], json: Vec<u8>) {
    let frame = Bytes::from(ws::text_frame(&json));
    let _ = fan_out(shard, users, EPHEMERAL, &frame, None);
    if shard.backplane.is_some() {
        shard.publish(Outbound::Publish {
            users: users.iter().map(|user| Box::from(*user)).collect(),
            message_id: EPHEMERAL,
            json: Bytes::from(json),
        });
    }
}
