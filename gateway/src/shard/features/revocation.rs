//! Revoking a device, or all of a user's devices, and deleting an account,
//! on the user's home shard.
//!
//! Owns the order of each. A revocation an operator gave this node: store
//! it, durable before anything else, then close the revoked devices'
//! connections here and tell the other nodes with devices of the user
//! through the backplane; one another node stored: close connections here
//! only. An account deletion (the user's own `delete_account`, or an
//! operator's): revoke every device, close every connection of the user
//! (the asker's is paused instead, to hear the answer), leave every group
//! the user is in (a `left` change from them, which the other members see
//! like any other), then ask storage to remove every row of the user,
//! which it does once the records already in its rings are committed, and
//! make every shard and node forget the member lists of the groups the
//! user was still in. The check at connect, which
//! refuses tokens issued before a revocation, is in `shard::accept`. Never
//! imports another feature.

use std::rc::Rc;

use backplane_bridge::Outbound;
use chat_protocol::codes::{CloseCode, ErrorCode};
use chat_protocol::records::GroupAction;
use chat_protocol::store_wire::{Request, Response};

use crate::limits::UNAVAILABLE_RETRY_AFTER_MS;
use crate::mesh::{Revocation, RevokeOutcome};
use crate::shard::send::group_change::{self, Change};
use crate::shard::send::members::member_roles;
use crate::shard::send::{pipeline, reply};
use crate::shard::state::conn::Conn;
use crate::shard::state::store_client::StoreError;
use crate::shard::state::Shard;

/// A revocation (or an operator's account deletion) for a user homed here.
pub fn on_revoke(shard: &Rc<Shard>, revocation: Revocation) {
    let Revocation {
        user,
        device,
        order,
    } = revocation;
    let Some(order) = order else {
        close_revoked(shard, &user, device.as_deref(), CloseCode::Revoked, None);
        return;
    };
    let shard = shard.clone();
    monoio::spawn(async move {
        let outcome = if order.delete_account {
            delete_account(&shard, &user, order.at_unix_ms, None)
                .await
                .map_err(|failed| failed.to_string())
        } else {
            let code = CloseCode::Revoked;
            revoke(
                &shard,
                &user,
                device.as_deref(),
                order.at_unix_ms,
                code,
                None,
            )
            .await
            .map_err(|error| error.to_string())
        };
        // The operator may have stopped waiting; what was stored stands.
        let _ = order.answer.send(outcome);
    });
}

/// `delete_account`: the asker deletes their own account. `user` must be
/// the asker's (the confirmation). Answered `account_deleted` (with the
/// frame's `id`, and the rows removed), then closed with 4004.
pub fn on_delete_account(shard: &Rc<Shard>, conn: &Rc<Conn>, client_id: Option<&str>, user: &str) {
    if *conn.user_id != *user {
        let message = "`user` must be your own user id: it confirms the deletion";
        return reply::invalid(shard, conn, client_id, message);
    }
    let client_id = client_id.map(str::to_owned);
    // Nothing more from this connection is processed: what it sent before
    // is in the ring, which storage commits before it removes the rows.
    conn.pause();
    let (shard, conn) = (shard.clone(), conn.clone());
    monoio::spawn(async move {
        let at_unix_ms = crate::clock::unix_ms();
        let user = conn.user_id.clone();
        match delete_account(&shard, &user, at_unix_ms, Some(&conn)).await {
            Ok(outcome) => {
                let mut frame = serde_json::json!({
                    "type": "account_deleted",
                    "rows": outcome.rows_removed,
                });
                if let Some(id) = &client_id {
                    frame["id"] = id.as_str().into();
                }
                reply::send_json(&conn, frame.to_string().as_bytes());
                conn.request_close(CloseCode::AccountDeleted);
            }
            // Nothing was stored: the account stands, the connection goes on.
            Err(Failed::Revoking(error)) => {
                let id = client_id.as_deref();
                reply::storage_error_for(&shard, &conn, id, "delete_account", error);
                conn.resume();
            }
            // Revoked but not yet erased: its tokens no longer work. A new
            // sign-in (a token issued now) may ask again; so may an operator.
            Err(Failed::Erasing(error)) => {
                let message = format!(
                    "delete_account: your devices are revoked but the rows are not all removed ({error}); sign in again and retry"
                );
                let id = client_id.as_deref();
                let unavailable = ErrorCode::Unavailable;
                let retry = Some(UNAVAILABLE_RETRY_AFTER_MS);
                reply::send_error(&shard, &conn, id, unavailable, &message, retry);
                conn.request_close(CloseCode::Revoked);
            }
        }
    });
}

/// Stores the revocation, then closes the revoked connections here (all
/// but `keep`) with `code` and has the other nodes close theirs (4003).
async fn revoke(
    shard: &Rc<Shard>,
    user: &str,
    device: Option<&str>,
    at_unix_ms: u64,
    code: CloseCode,
    keep: Option<&Conn>,
) -> Result<RevokeOutcome, StoreError> {
    let request = |req| Request::Revoke {
        req,
        user: user.to_owned(),
        device: device.map(str::to_owned),
        at_unix_ms,
    };
    match shard
        .store
        .request(request, shard.storage_timeout())
        .await?
    {
        Response::Revoked { keys_removed, .. } => {
            let closed_here = close_revoked(shard, user, device, code, keep);
            // The other nodes with devices of the user close theirs.
            shard.publish(Outbound::Revoke {
                user: user.into(),
                device: device.map(Into::into),
            });
            Ok(RevokeOutcome {
                keys_removed,
                closed_here,
                rows_removed: 0,
            })
        }
        _ => Err(StoreError::Unavailable),
    }
}

/// Where an account deletion stopped.
#[derive(Debug, thiserror::Error)]
enum Failed {
    #[error("not revoked: {0}")]
    Revoking(StoreError),
    #[error("revoked, rows not all removed: {0}")]
    Erasing(StoreError),
}

/// Revokes every device of `user`, closes their connections (all but
/// `keep`), then removes every row of theirs; every shard and node
/// forgets the member lists of the groups they left.
async fn delete_account(
    shard: &Rc<Shard>,
    user: &str,
    at_unix_ms: u64,
    keep: Option<&Conn>,
) -> Result<RevokeOutcome, Failed> {
    let code = CloseCode::AccountDeleted;
    let mut outcome = revoke(shard, user, None, at_unix_ms, code, keep)
        .await
        .map_err(Failed::Revoking)?;
    let device = keep.map_or("", |conn| &*conn.device_id);
    let groups_left = leave_groups(shard, user, device)
        .await
        .map_err(Failed::Erasing)?;
    let request = |req| Request::DeleteAccount {
        req,
        user: user.to_owned(),
        at_unix_ms,
    };
    let timeout = shard.config.account_deletion_timeout();
    match shard.store.request(request, timeout).await {
        Ok(Response::AccountDeleted { rows, groups, .. }) => {
            for group in groups {
                shard.forget_group_everywhere(&group);
                shard.publish(Outbound::GroupChanged {
                    group: group.into(),
                });
            }
            tracing::info!(%user, rows, groups_left, "account deleted");
            outcome.rows_removed = rows;
            Ok(outcome)
        }
        Ok(_) => Err(Failed::Erasing(StoreError::Unavailable)),
        Err(error) => Err(Failed::Erasing(error)),
    }
}

/// The user leaves every group they are in (the first page storage lists,
/// `MEMBERSHIP_READ_MAX` groups; the deletion removes the rest without a
/// change), each a `left` change from them, from `device` (the asker's;
/// empty for an operator's deletion), delivered to the members at once.
/// The changes are in this shard's ring before `DeleteAccount`, which
/// storage handles only after them; it then removes the user's own copy
/// and idempotency keys with their other rows. Returns how many.
async fn leave_groups(shard: &Rc<Shard>, user: &str, device: &str) -> Result<usize, StoreError> {
    let request = |req| Request::GroupsOf {
        req,
        user: user.to_owned(),
    };
    let Response::Groups { groups, .. } = shard
        .store
        .request(request, shard.storage_timeout())
        .await?
    else {
        return Err(StoreError::Unavailable);
    };
    let mut left = 0;
    for group in &groups {
        let roles = member_roles(shard, group).await?;
        if !roles.members.iter().any(|member| *member.user == *user) {
            continue;
        }
        // One key per group: a retried deletion finds the user gone from
        // the groups it already left.
        let client_msg_id = format!("account-deleted:{group}");
        let change = Change {
            group,
            action: GroupAction::Leave,
            named: vec![user],
            recipients: roles.members.iter().map(|m| m.user.as_str()).collect(),
            from: user,
            from_device: device,
            client_msg_id: &client_msg_id,
            id: pipeline::next_message_id(shard),
        };
        // A full ring or queue: the caller answers "retry".
        group_change::store(shard, change, None).map_err(|_| StoreError::Unavailable)?;
        left += 1;
    }
    Ok(left)
}

/// Closes every connection here of `user`'s `device` (every device for
/// `None`) with `code`, except `keep`. Returns how many.
fn close_revoked(
    shard: &Shard,
    user: &str,
    device: Option<&str>,
    code: CloseCode,
    keep: Option<&Conn>,
) -> usize {
    let devices = shard.users.borrow().devices_of(user);
    let mut closed = 0;
    for conn in devices {
        let kept = keep.is_some_and(|keep| std::ptr::eq(keep, &*conn));
        if !kept && device.is_none_or(|device| *conn.device_id == *device) {
            conn.request_close(code);
            closed += 1;
        }
    }
    closed
}
