//! Per-device ciphertexts: a direct message whose `bodies` hold one
//! ciphertext per device, each device given only its own.
//!
//! Owns the check that a per-device send addresses every current device
//! (the key directory's devices of the recipient, and the sender's other
//! devices), refusing it with the missing list otherwise, and the `Payload`
//! that carries one frame per device to a user's devices here or on another
//! shard. Never reads a body, and never gives a device another's ciphertext.

use std::collections::BTreeSet;
use std::rc::Rc;

use bytes::Bytes;
use chat_protocol::codes::ErrorCode;
use chat_protocol::records::MessageRecord;
use chat_protocol::store_wire::{Request, Response};
use chat_protocol::{frames, social_frames, ws};

use super::connection::Conn;
use super::router::{self, OwnedSend};
use super::sync::message_frame;
use super::users::UserTable;
use super::Shard;
use crate::mesh::{Delivery, PerDeviceDelivery, ShardMessage};

/// What a user's devices are given for one message.
pub enum Payload {
    /// One frame for every device.
    Shared(Bytes),
    /// Each addressed device's own frame (others get nothing).
    PerDevice(Vec<(Box<str>, Bytes)>),
}

impl Payload {
    /// What `user`'s devices get of a stored message: per device when it has
    /// `bodies`, else `json` for all.
    pub fn of(record: &MessageRecord<'_>, json: &[u8], user: &str) -> Payload {
        if record.bodies.is_empty() {
            return Payload::Shared(Bytes::from(ws::text_frame(json)));
        }
        let frames = record
            .bodies_of(user)
            .map(|(device, body)| {
                let mut frame = message_frame(record);
                frame.body = body;
                let json = frames::encode_message(&frame);
                (Box::from(device), Bytes::from(ws::text_frame(&json)))
            })
            .collect();
        Payload::PerDevice(frames)
    }

    /// Queues it to `user`'s devices here, except the connection in slot `except`.
    pub fn deliver(&self, users: &UserTable, user: &str, message_id: u64, except: Option<usize>) {
        match self {
            Payload::Shared(frame) => {
                users.deliver(user, message_id, frame, except);
            }
            Payload::PerDevice(frames) => {
                users.deliver_per_device(user, message_id, frames, except)
            }
        }
    }

    /// The hand-off of it to `user`'s home shard.
    pub fn to_shard(&self, user: &str, message_id: u64) -> ShardMessage {
        match self {
            Payload::Shared(frame) => ShardMessage::Deliver(Delivery {
                to_user: user.into(),
                message_id,
                frame: frame.clone(),
            }),
            Payload::PerDevice(frames) => {
                ShardMessage::DeliverPerDevice(Box::new(PerDeviceDelivery {
                    to_user: user.into(),
                    message_id,
                    frames: frames.clone(),
                }))
            }
        }
    }
}

/// A send with `bodies`: the connection's frames wait while the key
/// directory says which devices the recipient and the sender have; a send
/// that leaves one out is refused with the list, else it is accepted.
pub fn on_send(shard: &Rc<Shard>, conn: &Rc<Conn>, mut send: OwnedSend) {
    // Keys as stored: `<user>/<device>`, sorted (a bare device is the recipient's).
    for (key, _) in &mut send.bodies {
        if !key.contains('/') {
            *key = format!("{}/{key}", send.to);
        }
    }
    send.bodies.sort();
    send.bodies.dedup_by(|a, b| a.0 == b.0);
    conn.pause();
    monoio::spawn(check_then_accept(shard.clone(), conn.clone(), send));
}

async fn check_then_accept(shard: Rc<Shard>, conn: Rc<Conn>, send: OwnedSend) {
    let timeout = std::time::Duration::from_millis(shard.config.storage_timeout_ms);
    let mut users = vec![send.to.clone()];
    if *send.to != *conn.user_id {
        users.push(conn.user_id.to_string());
    }
    let response = shard
        .store
        .request(|req| Request::Devices { req, users }, timeout)
        .await;
    let devices = match response {
        Ok(Response::Devices { devices, .. }) => devices,
        _ => {
            router::not_answered(&shard, &conn, &send.client_msg_id);
            conn.resume();
            return;
        }
    };
    let addressed: BTreeSet<&str> = send.bodies.iter().map(|(k, _)| k.as_str()).collect();
    let missing: Vec<(String, String)> = devices
        .into_iter()
        .filter(|(user, device)| {
            let sending_device = *user == *conn.user_id && *device == *conn.device_id;
            !sending_device && !addressed.contains(format!("{user}/{device}").as_str())
        })
        .collect();
    if missing.is_empty() {
        router::accept_owned(&shard, &conn, send).await;
    } else {
        let json = social_frames::encode_missing_devices(&send.client_msg_id, &missing);
        shard.metrics().error(ErrorCode::MissingDevices);
        conn.enqueue(Bytes::from(ws::text_frame(&json)));
    }
    conn.resume();
}
