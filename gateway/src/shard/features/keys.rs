//! The key directory, as the gateway serves it: uploads, device lists and
//! bundle fetches against storage, and telling a user's devices when one's
//! one-time prekeys run low.
//!
//! Owns turning `keys_upload`, `devices` and `keys_fetch` into storage
//! requests and their answers into frames, and the key-fetch allowance.
//! Storage takes each one-time prekey atomically, so no two fetches (on any
//! node) get the same one. Runs as tasks on the shard; never reads a key
//! (they are opaque base64), never blocks, never imports another feature.

use std::rc::Rc;

use chat_protocol::keys::{self, KeysUpload};
use chat_protocol::store_wire::{Request, Response};

use crate::shard::send::deliver::deliver_ephemeral;
use crate::shard::send::reply;
use crate::shard::state::conn::Conn;
use crate::shard::state::store_client::StoreError;
use crate::shard::state::users::Allowance;
use crate::shard::state::Shard;

/// `keys_upload`: stored, then answered with how many one-time prekeys the
/// device has.
pub fn on_upload(shard: &Rc<Shard>, conn: &Rc<Conn>, upload: KeysUpload<'_>) {
    monoio::spawn(upload_keys(
        shard.clone(),
        conn.clone(),
        upload.into_owned(),
    ));
}

/// `devices` and `keys_fetch` share the key-fetch allowance.
fn take_fetch_allowance(shard: &Shard, conn: &Conn) -> bool {
    let message = "too many key fetches by this user";
    reply::take_allowance(shard, conn, Allowance::KeyFetch, None, message, false)
}

/// `devices`: the devices of `user` in the key directory (so a sender
/// knows whom to encrypt for without taking one-time prekeys).
pub fn on_devices(shard: &Rc<Shard>, conn: &Rc<Conn>, user: &str) {
    if take_fetch_allowance(shard, conn) {
        monoio::spawn(devices(shard.clone(), conn.clone(), user.to_owned()));
    }
}

/// `keys_fetch`: a bundle per device of `user`.
pub fn on_fetch(shard: &Rc<Shard>, conn: &Rc<Conn>, user: &str) {
    if take_fetch_allowance(shard, conn) {
        monoio::spawn(fetch(shard.clone(), conn.clone(), user.to_owned()));
    }
}

async fn upload_keys(shard: Rc<Shard>, conn: Rc<Conn>, upload: KeysUpload<'static>) {
    let request = |req| Request::KeysUpload {
        req,
        user: conn.user_id.to_string(),
        device: conn.device_id.to_string(),
        identity_key: upload.identity_key.into_owned(),
        signed_prekey: upload.signed_prekey.into_owned(),
        signed_prekey_signature: upload.signed_prekey_signature.into_owned(),
        one_time_prekeys: upload
            .one_time_prekeys
            .into_iter()
            .map(|key| key.into_owned())
            .collect(),
    };
    match shard.store.request(request, shard.storage_timeout()).await {
        Ok(Response::KeysUploaded { stored, .. }) => {
            reply::send_json(&conn, &keys::encode_uploaded(stored));
        }
        Ok(_) => reply::storage_error(&shard, &conn, "keys_upload", StoreError::Unavailable),
        Err(error) => reply::storage_error(&shard, &conn, "keys_upload", error),
    }
}

async fn devices(shard: Rc<Shard>, conn: Rc<Conn>, user: String) {
    let users = vec![user.clone()];
    let request = |req| Request::Devices { req, users };
    match shard.store.request(request, shard.storage_timeout()).await {
        Ok(Response::Devices { devices, .. }) => {
            let names: Vec<&str> = devices.iter().map(|(_, device)| device.as_str()).collect();
            reply::send_json(&conn, &keys::encode_devices(&user, &names));
        }
        Ok(_) => reply::storage_error(&shard, &conn, "devices", StoreError::Unavailable),
        Err(error) => reply::storage_error(&shard, &conn, "devices", error),
    }
}

/// Answers with a bundle per device of `user`, and tells `user`'s devices
/// when a device's one-time prekeys run low.
async fn fetch(shard: Rc<Shard>, conn: Rc<Conn>, user: String) {
    let request = |req| Request::KeysFetch {
        req,
        user: user.clone(),
    };
    let bundles = match shard.store.request(request, shard.storage_timeout()).await {
        Ok(Response::Keys { bundles, .. }) => bundles,
        Ok(_) => return reply::storage_error(&shard, &conn, "keys_fetch", StoreError::Unavailable),
        Err(error) => return reply::storage_error(&shard, &conn, "keys_fetch", error),
    };
    let threshold = shard.config.prekeys_low_threshold;
    for (bundle, remaining) in &bundles {
        if *remaining < threshold {
            let json = keys::encode_low(&bundle.device, *remaining);
            deliver_ephemeral(&shard, &[user.as_str()], json);
        }
    }
    let devices: Vec<_> = bundles.into_iter().map(|(bundle, _)| bundle).collect();
    reply::send_json(&conn, &keys::encode_keys(&user, &devices));
}
