//! Push registration, as the gateway serves it: a device says where it
//! wants to be woken while it is not connected (`push_register`), or that
//! it no longer wants to be (`push_unregister`).
//!
//! Owns checking a target against the node's policy (Web Push endpoints
//! must be `https://` unless `push_loopback_endpoints`), storing it through
//! the read path (durable before the answer) and the answer frames. The
//! pushes themselves are the storage-writer's push worker's: this never
//! sends one. Runs as tasks on the shard; never blocks, never imports
//! another feature.

use std::rc::Rc;

use chat_protocol::codes::ErrorCode;
use chat_protocol::push::{self, PushTarget};
use chat_protocol::store_wire::{Request, Response};

use crate::shard::send::reply;
use crate::shard::state::conn::Conn;
use crate::shard::state::store_client::StoreError;
use crate::shard::state::users::Allowance;
use crate::shard::state::Shard;

/// Registrations share the key directory's allowance: both are rare,
/// stored requests of a device about itself.
fn take_allowance(shard: &Shard, conn: &Conn, client_id: &str) -> bool {
    let message = "too many push registrations by this user";
    reply::take_allowance(
        shard,
        conn,
        Allowance::KeyFetch,
        Some(client_id),
        message,
        false,
    )
}

/// `push_register`: checked, stored, answered `push_registered`.
pub fn on_register(shard: &Rc<Shard>, conn: &Rc<Conn>, client_id: &str, target: PushTarget) {
    if let Some(problem) = target.problem(shard.config.push_loopback_endpoints) {
        reply::send_error(
            shard,
            conn,
            Some(client_id),
            ErrorCode::InvalidField,
            &problem,
            None,
        );
        return;
    }
    if take_allowance(shard, conn, client_id) {
        let task = store(
            shard.clone(),
            conn.clone(),
            client_id.to_owned(),
            Some(target),
        );
        monoio::spawn(task);
    }
}

/// `push_unregister`: the device's target removed, answered `push_unregistered`.
pub fn on_unregister(shard: &Rc<Shard>, conn: &Rc<Conn>, client_id: &str) {
    if take_allowance(shard, conn, client_id) {
        monoio::spawn(store(
            shard.clone(),
            conn.clone(),
            client_id.to_owned(),
            None,
        ));
    }
}

async fn store(shard: Rc<Shard>, conn: Rc<Conn>, client_id: String, target: Option<PushTarget>) {
    let kind = target.as_ref().map(PushTarget::kind);
    let request = |req| Request::PutPushTarget {
        req,
        user: conn.user_id.to_string(),
        device: conn.device_id.to_string(),
        target: target.as_ref().map(PushTarget::encode),
    };
    let what = if kind.is_some() {
        "push_register"
    } else {
        "push_unregister"
    };
    match shard.store.request(request, shard.storage_timeout()).await {
        Ok(Response::PushTargetStored { .. }) => {
            reply::send_json(&conn, &push::encode_push_answer(&client_id, kind));
        }
        Ok(_) => reply::storage_error(&shard, &conn, what, StoreError::Unavailable),
        Err(error) => reply::storage_error(&shard, &conn, what, error),
    }
}
