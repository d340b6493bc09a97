//! Receipts: "delivered" (from an `ack` that names the message's sender)
//! and "read", batched per sender and conversation.
//!
//! Owns the rules: a receipt only about a conversation the reader is in,
//! never to oneself, `from` the other user of a direct conversation or a
//! member of a group. Receipts by users homed here wait up to
//! `receipt_window_ms` in the shard's batcher, then go out as one stored
//! `receipts` record per sender and conversation (in the sender's inbox, so
//! an offline sender gets it on sync), through the same pipeline as every
//! message. Never imports another feature; a batch whose ring had no room is
//! dropped and counted (nothing waits on a receipt).

use std::rc::Rc;
use std::time::Duration;

use chat_protocol::frames::ReceiptFrame;
use chat_protocol::ids;
use chat_protocol::records::{Event, MessageRecord, Receipt, ReceiptStatus};

use crate::metrics::bump;
use crate::shard::send::members::{cached, members};
use crate::shard::send::pipeline::{self, HandOff, Outgoing};
use crate::shard::send::reply;
use crate::shard::state::conn::Conn;
use crate::shard::state::group_cache::{is_member, Members};
use crate::shard::state::receipt_batch::Pending;
use crate::shard::state::Shard;

/// A device acknowledged (`Delivered`) or its user read (`Read`) messages of
/// `receipt.conversation` up to `receipt.up_to`, sent by `receipt.from`.
pub fn on_receipt(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    receipt: ReceiptFrame<'_>,
    status: ReceiptStatus,
) {
    let user: &str = &conn.user_id;
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
        match cached(shard, group) {
            Some(members) => add_if_member(shard, conn, &members, pending, status),
            None => {
                let (shard, conn, group) = (shard.clone(), conn.clone(), group.to_owned());
                monoio::spawn(async move {
                    match members(&shard, &group, false).await {
                        Ok(members) => add_if_member(&shard, &conn, &members, pending, status),
                        Err(error) => reply::storage_error(&shard, &conn, "receipt", error),
                    }
                });
            }
        }
        return;
    }
    if !ids::is_direct_member(&receipt.conversation, user) {
        return reply::invalid(shard, conn, None, "not a conversation of this user");
    }
    let pair = receipt.conversation.trim_start_matches("dm:");
    let other = pair.split(':').find(|u| *u != user).unwrap_or(user);
    if other == user {
        return; // a note to self
    }
    if receipt.from.as_deref().is_some_and(|from| from != other) {
        let message = "`from` must be the other user of a direct conversation";
        return reply::invalid(shard, conn, None, message);
    }
    let target = other.into();
    add(
        shard,
        conn,
        target,
        receipt.conversation.as_ref().into(),
        receipt.up_to,
        status,
    );
}

fn add_if_member(
    shard: &Shard,
    conn: &Conn,
    members: &Members,
    (from, conversation, up_to): (Box<str>, Box<str>, u64),
    status: ReceiptStatus,
) {
    if !is_member(members, &conn.user_id) {
        return reply::forbidden(shard, conn, None, "not a member of this group");
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
    let pending = Pending {
        user: conn.user_id.clone(),
        device: conn.device_id.as_ref().into(),
        status,
        up_to,
    };
    let full = shard
        .receipts
        .borrow_mut()
        .add((target, conversation), pending);
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
    let pending = shard.receipts.borrow_mut().take();
    for ((target, conversation), entries) in pending {
        send_batch(shard, &target, &conversation, &entries);
    }
}

fn send_batch(shard: &Shard, target: &str, conversation: &str, entries: &[Pending]) {
    let (message_id, ts) = pipeline::next_message_id(shard);
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
            receipts,
        }),
        recipients: vec![target],
        bodies: Vec::new(),
    };
    let out = Outgoing {
        record: &record,
        users: &record.recipients,
        sender: None,
        notice: None,
        // A full queue: the sender gets it on its next sync.
        hand_off: HandOff::BestEffort,
    };
    match pipeline::store_and_deliver(shard, out) {
        Ok(_) => bump(&shard.metrics().receipt_batches, 1),
        Err(_) => bump(&shard.metrics().receipts_dropped, entries.len() as u64),
    }
}
