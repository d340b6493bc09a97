//! Revoking a device, or all of a user's devices, on the user's home shard.
//!
//! Owns the order an operator gave this node (store the revocation, durable
//! before anything else, then close the revoked devices' connections here
//! and tell the other nodes with devices of the user through the backplane)
//! and a revocation another node stored (close connections here only). The
//! check at connect, which refuses tokens issued before a revocation, is in
//! `shard::accept`. Never imports another feature.

use std::rc::Rc;

use backplane_bridge::Outbound;
use chat_protocol::codes::CloseCode;
use chat_protocol::store_wire::{Request, Response};

use crate::mesh::{Revocation, RevokeOutcome};
use crate::shard::state::Shard;

/// A revocation for a user homed here.
pub fn on_revoke(shard: &Rc<Shard>, revocation: Revocation) {
    let Revocation {
        user,
        device,
        order,
    } = revocation;
    let Some(order) = order else {
        close_revoked(shard, &user, device.as_deref());
        return;
    };
    let shard = shard.clone();
    monoio::spawn(async move {
        let request = |req| Request::Revoke {
            req,
            user: user.to_string(),
            device: device.as_deref().map(str::to_owned),
            at_unix_ms: order.at_unix_ms,
        };
        let outcome = match shard.store.request(request, shard.storage_timeout()).await {
            Ok(Response::Revoked { keys_removed, .. }) => {
                let closed_here = close_revoked(&shard, &user, device.as_deref());
                // The other nodes with devices of the user close theirs.
                shard.publish(Outbound::Revoke {
                    user: user.clone(),
                    device: device.clone(),
                });
                Ok(RevokeOutcome {
                    keys_removed,
                    closed_here,
                })
            }
            Ok(Response::Failed { reason, .. }) => Err(reason),
            Ok(_) => Err("storage answered something else".into()),
            Err(error) => Err(error.to_string()),
        };
        // The operator may have stopped waiting; the revocation stands.
        let _ = order.answer.send(outcome);
    });
}

/// Closes every connection here of `user`'s `device` (every device for
/// `None`) with 4003. Returns how many.
fn close_revoked(shard: &Shard, user: &str, device: Option<&str>) -> usize {
    let devices = shard.users.borrow().devices_of(user);
    let mut closed = 0;
    for conn in devices {
        if device.is_none_or(|device| *conn.device_id == *device) {
            conn.request_close(CloseCode::Revoked);
            closed += 1;
        }
    }
    closed
}
