//! The key directory, as the gateway serves it: uploads and bundle fetches
//! against storage, and telling a device when its one-time prekeys run low.
//!
//! Owns turning `keys_upload` / `keys_fetch` into storage requests and their
//! answers into frames. Storage takes each one-time prekey atomically, so no
//! two fetches (on any node) get the same one. Runs as tasks on the shard;
//! never reads a key (they are opaque base64) and never blocks.

use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use chat_protocol::keys::{self, KeysUpload};
use chat_protocol::store_wire::{Request, Response};
use chat_protocol::ws;

use super::connection::Conn;
use super::router::{deliver_ephemeral, storage_error};
use super::store_client::StoreError;
use super::Shard;

/// An upload, owned, for the task that stores it.
pub struct OwnedUpload {
    identity_key: String,
    signed_prekey: String,
    signed_prekey_signature: String,
    one_time_prekeys: Vec<String>,
}

pub fn owned(upload: KeysUpload<'_>) -> OwnedUpload {
    OwnedUpload {
        identity_key: upload.identity_key.into_owned(),
        signed_prekey: upload.signed_prekey.into_owned(),
        signed_prekey_signature: upload.signed_prekey_signature.into_owned(),
        one_time_prekeys: upload
            .one_time_prekeys
            .into_iter()
            .map(|key| key.into_owned())
            .collect(),
    }
}

fn timeout(shard: &Shard) -> Duration {
    Duration::from_millis(shard.config.storage_timeout_ms)
}

/// Stores this device's keys and says how many one-time prekeys it has.
pub async fn upload(shard: Rc<Shard>, conn: Rc<Conn>, upload: OwnedUpload) {
    let response = shard
        .store
        .request(
            |req| Request::KeysUpload {
                req,
                user: conn.user_id.to_string(),
                device: conn.device_id.to_string(),
                identity_key: upload.identity_key,
                signed_prekey: upload.signed_prekey,
                signed_prekey_signature: upload.signed_prekey_signature,
                one_time_prekeys: upload.one_time_prekeys,
            },
            timeout(&shard),
        )
        .await;
    match response {
        Ok(Response::KeysUploaded { stored, .. }) => {
            conn.enqueue(Bytes::from(ws::text_frame(&keys::encode_uploaded(stored))));
        }
        Ok(_) => storage_error(&shard, &conn, "keys_upload", StoreError::Unavailable),
        Err(error) => storage_error(&shard, &conn, "keys_upload", error),
    }
}

/// Answers with the devices of `user` in the key directory (so a sender
/// knows whom to encrypt for without taking one-time prekeys).
pub async fn devices(shard: Rc<Shard>, conn: Rc<Conn>, user: String) {
    let users = vec![user.clone()];
    let response = shard
        .store
        .request(|req| Request::Devices { req, users }, timeout(&shard))
        .await;
    match response {
        Ok(Response::Devices { devices, .. }) => {
            let names: Vec<&str> = devices.iter().map(|(_, device)| device.as_str()).collect();
            let json = keys::encode_devices(&user, &names);
            conn.enqueue(Bytes::from(ws::text_frame(&json)));
        }
        Ok(_) => storage_error(&shard, &conn, "devices", StoreError::Unavailable),
        Err(error) => storage_error(&shard, &conn, "devices", error),
    }
}

/// Answers with a bundle per device of `user`, and tells `user`'s devices
/// when a device's one-time prekeys run low.
pub async fn fetch(shard: Rc<Shard>, conn: Rc<Conn>, user: String) {
    let response = shard
        .store
        .request(
            |req| Request::KeysFetch {
                req,
                user: user.clone(),
            },
            timeout(&shard),
        )
        .await;
    let bundles = match response {
        Ok(Response::Keys { bundles, .. }) => bundles,
        Ok(_) => return storage_error(&shard, &conn, "keys_fetch", StoreError::Unavailable),
        Err(error) => return storage_error(&shard, &conn, "keys_fetch", error),
    };
    let threshold = shard.config.prekeys_low_threshold;
    for (bundle, remaining) in &bundles {
        if *remaining < threshold {
            deliver_ephemeral(&shard, &user, keys::encode_low(&bundle.device, *remaining));
        }
    }
    let devices: Vec<_> = bundles.into_iter().map(|(bundle, _)| bundle).collect();
    conn.enqueue(Bytes::from(ws::text_frame(&keys::encode_keys(
        &user, &devices,
    ))));
}
