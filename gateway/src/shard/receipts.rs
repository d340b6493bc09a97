//! Receipts on a shard: "delivered" (from an `ack` that names the message's
//! sender) and "read", batched per sender and conversation.
//!
//! Owns the batcher: receipts by users homed here wait up to
//! `receipt_window_ms`, merged per (reader, device, status) to the highest
//! message, then go out as one `receipts` frame per sender and conversation.
//! Each batch is a stored record in the sender's inbox (so an offline sender
//! gets it on sync, and acknowledges it like a message) and is delivered live
//! on this node and, once durable, on others. Never tells a user about a
//! conversation it is not in, and never lets a batch or the pending map grow
//! past its bound (it flushes early instead).

use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use chat_backplane::Outbound;
use chat_protocol::codes::ErrorCode;
use chat_protocol::frames::ReceiptFrame;
use chat_protocol::records::{Event, MessageRecord, Receipt, ReceiptStatus, RECEIPTS_MAX};
use chat_protocol::{ids, snowflake, social_frames, ws};

use super::connection::Conn;
use super::groups::{self, is_member};
use super::router::{send_error, storage_error};
use super::Shard;
use crate::mesh::{Delivery, Sender, ShardMessage};
use crate::metrics::bump;

/// (sender told, conversation) pairs waiting at once; past it, all flush.
const PENDING_MAX: usize = 65_536;

struct Pending {
    user: Rc<str>,
    device: Box<str>,
    status: ReceiptStatus,
    up_to: u64,
}

type Key = (Box<str>, Box<str>);

/// Receipts waiting for the end of the window.
#[derive(Default)]
pub struct ReceiptBatcher {
    pending: HashMap<Key, Vec<Pending>>,
}

/// A device acknowledged (`Delivered`) or its user read (`Read`) messages of
/// `receipt.conversation` up to `receipt.up_to`, sent by `receipt.from`.
pub fn on_receipt(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    receipt: ReceiptFrame<'_>,
    status: ReceiptStatus,
) {
    let user: &str = &conn.user_id;
    let invalid = |message: &str| {
        send_error(shard, conn, None, ErrorCode::InvalidField, message, None);
    };
    if let Some(group) = ids::group_of_conversation(&receipt.conversation) {
        let from = receipt
            .from
            .as_deref()
            .expect("decoding requires `from` in a group");
        if from == user {
            return; // its own message: nobody to tell
        }
        let pending = (
            from.into(),
            receipt.conversation.as_ref().into(),
            receipt.up_to,
        );
        match groups::cached(shard, group) {
            Some(members) => add_if_members(shard, conn, &members, pending, status),
            None => {
                let (shard, conn, group) = (shard.clone(), conn.clone(), group.to_owned());
                monoio::spawn(async move {
                    match groups::members(&shard, &group, false).await {
                        Ok(members) => add_if_members(&shard, &conn, &members, pending, status),
                        Err(error) => storage_error(&shard, &conn, "receipt", error),
                    }
                });
            }
        }
        return;
    }
    if !ids::is_direct_member(&receipt.conversation, user) {
        return invalid("not a conversation of this user");
    }
    let pair = receipt.conversation.trim_start_matches("dm:");
    let other = pair.split(':').find(|u| *u != user).unwrap_or(user);
    if other == user {
        return; // a note to self
    }
    if receipt.from.as_deref().is_some_and(|from| from != other) {
        return invalid("`from` must be the other user of a direct conversation");
    }
    add(
        shard,
        conn,
        other.into(),
        receipt.conversation.as_ref().into(),
        receipt.up_to,
        status,
    );
}

fn add_if_members(
    shard: &Shard,
    conn: &Conn,
    members: &groups::Members,
    (from, conversation, up_to): (Box<str>, Box<str>, u64),
    status: ReceiptStatus,
) {
    if !is_member(members, &conn.user_id) {
        let message = "not a member of this group";
        send_error(shard, conn, None, ErrorCode::Forbidden, message, None);
        return;
    }
    // A sender who has since left still hears about its messages.
    add(shard, conn, from, conversation, up_to, status);
}

fn add(
    shard: &Shard,
    conn: &Conn,
    target: Box<str>,
    conversation: Box<str>,
    up_to: u64,
    status: ReceiptStatus,
) {
    bump(&shard.metrics().receipts, 1);
    let full = {
        let mut batcher = shard.receipts.borrow_mut();
        let entries = batcher
            .pending
            .entry((target.clone(), conversation.clone()))
            .or_default();
        let same = entries.iter_mut().find(|p| {
            p.status == status && *p.user == *conn.user_id && *p.device == *conn.device_id
        });
        match same {
            Some(pending) => pending.up_to = pending.up_to.max(up_to),
            None => entries.push(Pending {
                user: conn.user_id.clone(),
                device: conn.device_id.as_ref().into(),
                status,
                up_to,
            }),
        }
        let batch_full = entries.len() >= RECEIPTS_MAX;
        batch_full || batcher.pending.len() >= PENDING_MAX
    };
    if full {
        flush(shard);
    }
}

/// Flushes the batcher every `receipt_window_ms`, for the shard's life.
pub async fn flush_loop(shard: Rc<Shard>) {
    let window = Duration::from_millis(shard.config.receipt_window_ms);
    loop {
        monoio::time::sleep(window).await;
        flush(&shard);
    }
}

/// Stores and sends every waiting batch.
fn flush(shard: &Shard) {
    let pending = std::mem::take(&mut shard.receipts.borrow_mut().pending);
    for ((target, conversation), entries) in pending {
        send_batch(shard, &target, &conversation, &entries);
    }
}

fn send_batch(shard: &Shard, target: &str, conversation: &str, entries: &[Pending]) {
    let now_unix_ms = crate::clock::unix_ms();
    let message_id = shard.snowflake.borrow_mut().next_id(now_unix_ms);
    let ts = snowflake::decode(message_id).unix_ms;
    let receipts: Vec<Receipt<'_>> = entries
        .iter()
        .map(|p| Receipt {
            user: &p.user,
            device: &p.device,
            status: p.status,
            up_to: p.up_to,
        })
        .collect();
    let stored_under = ids::receipts_conversation_id(target);
    let record = MessageRecord {
        message_id,
        ts,
        conversation: &stored_under,
        from: target,
        from_device: "",
        to: target,
        client_msg_id: "",
        body: "",
        media: None,
        event: Some(Event::Receipts {
            conversation,
            receipts: receipts.clone(),
        }),
        recipients: vec![target],
        bodies: Vec::new(),
    };
    let end = match shard.durability.append(&record.encode()) {
        Ok(end) => end,
        Err(_) => {
            // Nothing waits on a receipt: dropped rather than queued.
            bump(&shard.metrics().receipts_dropped, entries.len() as u64);
            return;
        }
    };
    let json = social_frames::encode_receipts(message_id, conversation, &receipts, ts);
    let frame = Bytes::from(ws::text_frame(&json));
    let home = ids::home_shard(target, shard.mesh.shard_count());
    if home == shard.id {
        shard
            .users
            .borrow()
            .deliver(target, message_id, &frame, None);
    } else {
        let delivery = ShardMessage::Deliver(Delivery {
            to_user: target.into(),
            message_id,
            frame,
        });
        // Full queue: the sender gets it on its next sync.
        let _ = shard.mesh.send(Sender::Shard(shard.id), home, delivery);
    }
    bump(&shard.metrics().receipt_batches, 1);
    if shard.backplane.is_some() {
        let publish = Box::new(Outbound::Publish {
            users: vec![target.into()],
            message_id,
            json: Bytes::from(json),
        });
        shard
            .durability
            .publish_when_durable(end, publish, |publish| shard.publish(*publish));
    }
}
