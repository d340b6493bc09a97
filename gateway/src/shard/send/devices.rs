//! Per-device ciphertexts: the check that a direct message whose `bodies`
//! hold one ciphertext per device addresses every current device.
//!
//! Owns the keys' stored form (`<user>/<device>`, sorted), asking the key
//! directory which devices the recipient and the sender have, and refusing
//! a send that leaves one out with the `missing_devices` list. How each
//! device then gets only its own ciphertext is `deliver::deliver_per_device`
//! and `chat_protocol::render`. Never reads a body.

use std::borrow::Cow;
use std::collections::BTreeSet;

use chat_protocol::codes::ErrorCode;
use chat_protocol::frames::SendFrame;
use chat_protocol::social_frames;
use chat_protocol::store_wire::{Request, Response};

use super::reply::send_json;
use crate::shard::state::conn::Conn;
use crate::shard::state::store_client::StoreError;
use crate::shard::state::Shard;

/// Rewrites `send.bodies` to their stored keys: `<user>/<device>` (a bare
/// device is the recipient's), sorted, without repeats.
pub fn normalise(send: &mut SendFrame<'static>) {
    for (key, _) in &mut send.bodies {
        if !key.contains('/') {
            *key = Cow::Owned(format!("{}/{key}", send.to));
        }
    }
    send.bodies.sort();
    send.bodies.dedup_by(|a, b| a.0 == b.0);
}

/// The (user, device) pairs of the recipient's devices and the sender's
/// other devices that `send` has no ciphertext for.
pub async fn missing(
    shard: &Shard,
    conn: &Conn,
    send: &SendFrame<'_>,
) -> Result<Vec<(String, String)>, StoreError> {
    let mut users = vec![send.to.to_string()];
    if *send.to != *conn.user_id {
        users.push(conn.user_id.to_string());
    }
    let request = |req| Request::Devices { req, users };
    let response = shard
        .store
        .request(request, shard.storage_timeout())
        .await?;
    let Response::Devices { devices, .. } = response else {
        return Err(StoreError::Unavailable);
    };
    let addressed: BTreeSet<&str> = send.bodies.iter().map(|(key, _)| &**key).collect();
    Ok(devices
        .into_iter()
        .filter(|(user, device)| {
            let sending_device = *user == *conn.user_id && *device == *conn.device_id;
            !sending_device && !addressed.contains(format!("{user}/{device}").as_str())
        })
        .collect())
}

/// Refuses a per-device send that left out `missing` devices.
pub fn refuse_missing(
    shard: &Shard,
    conn: &Conn,
    client_msg_id: &str,
    missing: &[(String, String)],
) {
    shard.metrics().error(ErrorCode::MissingDevices);
    send_json(
        conn,
        &social_frames::encode_missing_devices(client_msg_id, missing),
    );
}
