//! The send pipeline: the one implementation of "store a message and answer".
//!
//! Owns, for every stored message (a 1:1 send, a group send, a membership
//! change, a receipt batch): idempotency (a replayed `client_msg_id` is
//! answered with its first `sent`; an id the warm-up could not vouch for is
//! looked up in storage first), the room check of every shard a hand-off
//! needs, appending the record to the shard's ring (a full ring is
//! `overloaded`, nothing stored), delivering it here and to other shards,
//! remembering the id, and releasing `sent` and the backplane publish once
//! the record is durable. A membership change is delivered here only once
//! durable (`HandOff::WhenDurable`): the writer may refuse it (a group past
//! its bound by changes on two nodes), and then its sender gets
//! `group_full` and nobody sees it. So is a delete for everyone (the
//! writer checks that the target is the sender's; if not, `forbidden`),
//! after the pipeline checked its window (`delete_window_ms`). Features
//! build the record and say who receives it; they never append, deliver or
//! answer `sent` themselves.
//! Never delivers a message before its record is in the ring.

use std::rc::Rc;

use backplane_bridge::Outbound;
use bytes::Bytes;
use chat_protocol::codes::ErrorCode;
use chat_protocol::frames::SendFrame;
use chat_protocol::records::{Event, MessageRecord};
use chat_protocol::store_wire::{Request, Response};
use chat_protocol::{render, snowflake, ws};

use super::deliver::{deliver_per_device, fan_out, shards_have_room};
use super::reply::{overloaded, send_error, sent_frame};
use crate::metrics::bump;
use crate::shard::state::conn::Conn;
use crate::shard::state::durable::{Held, Released};
use crate::shard::state::idempotency::{self, PriorSend};
use crate::shard::state::Shard;

/// Whether a message's hand-offs to other shards must be certain before it
/// is stored (a send: a live device must not miss it), or may be dropped
/// when a queue is full (a receipt batch: its user gets it on next sync).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandOff {
    Required,
    BestEffort,
    /// Like `Required`, but delivered only once durable, and not at all if
    /// the writer refuses it (a membership change).
    WhenDurable,
}

/// Why a message was not stored; the sender (if any) has been told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// A shard that must receive it had a full queue.
    QueueFull,
    /// The ring is full: storage is behind.
    RingFull,
    /// This node's id lease lapsed: a message id made now could repeat one
    /// another node makes.
    NoNodeId,
    /// The writer commits, but `sent` already waits longer than
    /// `sent_wait_ms_max`: accepting more would only lengthen the wait.
    Lagging,
    /// Nothing has become durable for longer than `storage_stall_ms_max`
    /// (the writer or its store is away or failing): what waits rides on
    /// the ring, new sends are told to come back.
    Stalled,
}

/// A message ready to be stored, and who gets it.
pub struct Outgoing<'r> {
    pub record: &'r MessageRecord<'r>,
    /// Every user whose devices get it, once each: here, on other shards,
    /// and (once durable) on other nodes.
    pub users: &'r [&'r str],
    /// The connection that sent it: answered `sent` once durable, its id
    /// remembered, and not given the message itself. `None` for a message
    /// the server makes (a receipt batch).
    pub sender: Option<&'r Rc<Conn>>,
    /// Published to every node once durable, before the message itself (a
    /// membership change's notice, so no node serves a stale member list).
    pub notice: Option<Box<Outbound>>,
    pub hand_off: HandOff,
}

/// Stores `out.record` and delivers it; answers `sent` once durable.
/// Returns the ring position that makes it durable.
pub fn store_and_deliver(shard: &Shard, out: Outgoing<'_>) -> Result<u64, Refused> {
    let record = out.record;
    // A held record is released with its sender's `sent`: without one it
    // would never be delivered (`send::group_change` picks `Required`).
    debug_assert!(
        out.hand_off != HandOff::WhenDurable || out.sender.is_some(),
        "a record held until durable needs a sender"
    );
    if !shard.node.may_make_ids() {
        return Err(refuse(shard, out.sender, record, Refused::NoNodeId));
    }
    let lag_bound_ms = shard.config.sent_wait_ms_max;
    if out.sender.is_some()
        && lag_bound_ms > 0
        && shard
            .durability
            .is_lagging(std::time::Duration::from_millis(lag_bound_ms))
    {
        bump(&shard.metrics().sends_refused_lagging, 1);
        return Err(refuse(shard, out.sender, record, Refused::Lagging));
    }
    if out.sender.is_some() && shard.storage_stalled() {
        bump(&shard.metrics().sends_refused_stalled, 1);
        return Err(refuse(shard, out.sender, record, Refused::Stalled));
    }
    // Checked before the record is stored: after, hand-offs must not fail
    // (this shard is its lanes' only producer, so room now is room then).
    if out.hand_off != HandOff::BestEffort && !shards_have_room(shard, out.users) {
        return Err(refuse(shard, out.sender, record, Refused::QueueFull));
    }
    let Ok(end) = shard.durability.append(&record.encode()) else {
        bump(&shard.metrics().ring_full, 1);
        return Err(refuse(shard, out.sender, record, Refused::RingFull));
    };
    let except = out.sender.map(|conn| conn.slot);
    let json = render::encode_for_nodes(record);
    let held = (out.hand_off == HandOff::WhenDurable).then(|| {
        debug_assert!(record.bodies.is_empty(), "held records have one frame");
        let key = out.sender.map_or_else(String::new, |conn| {
            idempotency::key(&conn.user_id, &conn.device_id, record.client_msg_id)
        });
        Box::new(Held {
            message_id: record.message_id,
            client_msg_id: record.client_msg_id.into(),
            idempotency_key: key,
            users: out.users.iter().map(|user| Box::from(*user)).collect(),
            frame: Bytes::from(ws::text_frame(&json)),
            except,
            refused: None,
            refusal_code: match record.event {
                Some(Event::Delete { .. }) => ErrorCode::Forbidden,
                _ => ErrorCode::GroupFull,
            },
        })
    });
    if held.is_none() {
        let all_handed = deliver(shard, record, out.users, &json, except);
        debug_assert!(
            all_handed || out.hand_off == HandOff::BestEffort,
            "room was checked above"
        );
    }
    let publish = shard.backplane.is_some().then(|| {
        Box::new(Outbound::Publish {
            users: out.users.iter().map(|user| Box::from(*user)).collect(),
            message_id: record.message_id,
            json: Bytes::from(json),
        })
    });
    if let (Some(notice), true) = (out.notice, shard.backplane.is_some()) {
        shard
            .durability
            .publish_when_durable(end, notice, |notice| shard.publish(*notice));
    }
    match out.sender {
        Some(conn) => {
            remember(
                shard,
                conn,
                record.client_msg_id,
                record.message_id,
                record.conversation,
                end,
            );
            let sent = sent_frame(
                record.client_msg_id,
                record.message_id,
                record.conversation,
                record.ts,
            );
            shard
                .durability
                .send_when_durable(end, conn, sent, publish, held, |publish| {
                    shard.publish(*publish)
                });
        }
        None => {
            if let Some(publish) = publish {
                shard
                    .durability
                    .publish_when_durable(end, publish, |publish| shard.publish(*publish));
            }
        }
    }
    Ok(end)
}

/// Queues `record` (encoded between nodes as `json`) to every device of
/// `users` here and on other shards, but not to the connection in slot
/// `except`. False when some shard's queue was full.
fn deliver(
    shard: &Shard,
    record: &MessageRecord<'_>,
    users: &[&str],
    json: &[u8],
    except: Option<usize>,
) -> bool {
    let (handed, all_handed) = if record.bodies.is_empty() {
        // One encoding for every device of every user.
        let frame = Bytes::from(ws::text_frame(json));
        match fan_out(shard, users, record.message_id, &frame, except) {
            Ok(handed) => (handed, true),
            Err(handed) => (handed, false),
        }
    } else {
        let mut handed = 0;
        let mut all_handed = true;
        for user in users {
            match deliver_per_device(shard, record, user, except) {
                Ok(to_shard) => handed += usize::from(to_shard),
                Err(()) => all_handed = false,
            }
        }
        (handed, all_handed)
    };
    if handed == 0 {
        bump(&shard.metrics().messages_routed_local, 1);
    }
    all_handed
}

/// A held record whose fate is known: delivered to this node's devices,
/// then `sent` and the publish to other nodes; or, refused by the writer,
/// its sender told why and its id forgotten (a retry is a new change).
pub fn release(shard: &Shard, released: Released) {
    let Released {
        held,
        sender,
        sent,
        publish,
    } = released;
    match &held.refused {
        None => {
            let users: Vec<&str> = held.users.iter().map(|user| &**user).collect();
            // Room was there at the append; a queue full since is a device
            // that gets the change on its next sync.
            let _ = fan_out(shard, &users, held.message_id, &held.frame, held.except);
            if let Some(conn) = sender {
                conn.enqueue(sent);
            }
            if let Some(publish) = publish {
                shard.publish(*publish);
            }
        }
        Some(reason) => {
            if !held.idempotency_key.is_empty() {
                shard.idempotency.borrow_mut().remove(&held.idempotency_key);
            }
            if let Some(conn) = sender {
                let id = Some(&*held.client_msg_id);
                send_error(shard, &conn, id, held.refusal_code, reason, None);
            }
        }
    }
}

/// Delivers and publishes again a message that is already stored: a retry
/// answered from storage (after a failover or a restart) whose first node
/// may have died between storing it and delivering it. Best effort, like
/// any repeat: devices that have it ignore it by `message_id`.
pub fn deliver_again(shard: &Shard, conn: &Conn, record: &MessageRecord<'_>, users: &[&str]) {
    let json = render::encode_for_nodes(record);
    deliver(shard, record, users, &json, Some(conn.slot));
    if shard.backplane.is_some() {
        shard.publish(Outbound::Publish {
            users: users.iter().map(|user| Box::from(*user)).collect(),
            message_id: record.message_id,
            json: Bytes::from(json),
        });
    }
    bump(&shard.metrics().redeliveries_after_failover, 1);
}

/// Tells the sender (if any) why nothing was stored.
fn refuse(
    shard: &Shard,
    sender: Option<&Rc<Conn>>,
    record: &MessageRecord<'_>,
    why: Refused,
) -> Refused {
    let Some(conn) = sender else {
        return why;
    };
    let id = Some(record.client_msg_id);
    match why {
        Refused::QueueFull => {
            let message = "a recipient's shard queue is full; retry this send";
            overloaded(shard, conn, id, message);
        }
        Refused::RingFull => overloaded(shard, conn, id, "storage is behind; retry this send"),
        Refused::Lagging => {
            let message = "storage is behind (sent waits past sent_wait_ms_max); retry this send";
            overloaded(shard, conn, id, message);
        }
        Refused::NoNodeId => {
            let message = "this node's id lease could not be renewed; retry (on another node)";
            let retry = Some(crate::limits::UNAVAILABLE_RETRY_AFTER_MS);
            send_error(shard, conn, id, ErrorCode::Unavailable, message, retry);
        }
        Refused::Stalled => {
            let message = "storage is not committing (see /readyz); retry this send";
            let retry = Some(crate::limits::UNAVAILABLE_RETRY_AFTER_MS);
            send_error(shard, conn, id, ErrorCode::Unavailable, message, retry);
        }
    }
    why
}

/// Remembers what `client_msg_id` of this device was answered with.
fn remember(
    shard: &Shard,
    conn: &Conn,
    client_msg_id: &str,
    message_id: u64,
    conversation: &str,
    end: u64,
) {
    let key = idempotency::key(&conn.user_id, &conn.device_id, client_msg_id);
    let prior = PriorSend {
        message_id,
        conversation: conversation.to_owned(),
        end,
    };
    shard
        .idempotency
        .borrow_mut()
        .insert(key, prior, crate::clock::unix_ms());
}

/// Whether this device's `client_msg_id` is in the idempotency table.
pub fn is_known(shard: &Shard, conn: &Conn, client_msg_id: &str) -> bool {
    let key = idempotency::key(&conn.user_id, &conn.device_id, client_msg_id);
    shard
        .idempotency
        .borrow_mut()
        .get(&key, crate::clock::unix_ms())
        .is_some()
}

/// Whether `client_msg_id` must be looked up in storage before it may be
/// taken as new: this device sent more than its connect-time warm-up loaded,
/// and the id is not in the table (it may be an older send). Only devices
/// past the warm-up bound pay for this.
pub fn needs_look_up(shard: &Shard, conn: &Conn, client_msg_id: &str) -> bool {
    conn.warm_truncated() && !is_known(shard, conn, client_msg_id)
}

/// Makes the idempotency table the truth about `client_msg_id`: looks it up
/// in storage when `needs_look_up` says so (behind the read barrier, so a
/// first attempt still in the ring is found) and remembers what it finds.
/// False when storage did not answer: the send must not be accepted as new.
pub async fn ensure_known(
    shard: &Shard,
    conn: &Conn,
    client_msg_id: &str,
    conversation: &str,
) -> bool {
    if !needs_look_up(shard, conn, client_msg_id) {
        return true;
    }
    let request = |req| Request::SendOf {
        req,
        user: conn.user_id.to_string(),
        device: conn.device_id.to_string(),
        client_msg_id: client_msg_id.to_owned(),
    };
    let response = shard.store.request(request, shard.storage_timeout()).await;
    let Ok(Response::SendOf { message_id, .. }) = response else {
        return false;
    };
    if let Some(message_id) = message_id {
        // Stored, so durable: a replay is answered at once.
        remember(shard, conn, client_msg_id, message_id, conversation, 0);
    }
    true
}

/// What a replayed send was first answered with.
#[derive(Debug, Clone, Copy)]
pub struct Replayed {
    pub message_id: u64,
    pub ts: u64,
    /// Known from storage (the connect-time warm-up or a look-up), not from
    /// this node's own ring: the node that first stored it may have died
    /// before delivering it (see `deliver_again`).
    pub from_storage: bool,
}

/// When this device already sent `client_msg_id`: answers the retry with the
/// first send's `sent` (once durable) and says what it was. The caller
/// delivers it again only when `from_storage`.
pub fn replay_if_known(shard: &Shard, conn: &Rc<Conn>, client_msg_id: &str) -> Option<Replayed> {
    let key = idempotency::key(&conn.user_id, &conn.device_id, client_msg_id);
    let prior = shard
        .idempotency
        .borrow_mut()
        .get(&key, crate::clock::unix_ms())
        .cloned()?;
    let ts = snowflake::decode(prior.message_id).unix_ms;
    let sent = sent_frame(client_msg_id, prior.message_id, &prior.conversation, ts);
    shard
        .durability
        .send_when_durable(prior.end, conn, sent, None, None, |_| {});
    bump(&shard.metrics().idempotent_replays, 1);
    Some(Replayed {
        message_id: prior.message_id,
        ts,
        // Ring positions are past a record, never 0: 0 marks a stored send.
        from_storage: prior.end == 0,
    })
}

/// The record of a client's `send` in `conversation` under `(message_id,
/// ts)` (a new one from `next_message_id`, or a replay's first): the
/// feature adds what is its own (a group's recipients, per-device bodies).
pub fn record_of_send<'a>(
    conn: &'a Conn,
    send: &'a SendFrame<'_>,
    conversation: &'a str,
    (message_id, ts): (u64, u64),
) -> MessageRecord<'a> {
    MessageRecord {
        message_id,
        ts,
        conversation,
        from: &conn.user_id,
        from_device: &conn.device_id,
        to: &send.to,
        client_msg_id: &send.client_msg_id,
        body: &send.body,
        media: send.media.clone(),
        event: send.delete.map(|target| Event::Delete { target }),
        recipients: Vec::new(),
        bodies: Vec::new(),
    }
}

/// How a send is handed off: a delete for everyone is seen by nobody until
/// the writer has checked it is the sender's own message.
pub fn hand_off_of(send: &SendFrame<'_>) -> HandOff {
    if send.delete.is_some() {
        HandOff::WhenDurable
    } else {
        HandOff::Required
    }
}

/// Whether a delete for everyone is still allowed: its target must have
/// been made at most `delete_window_ms` ago (a snowflake holds its time).
/// Told `forbidden` otherwise. A send that deletes nothing passes.
pub fn delete_in_window(shard: &Shard, conn: &Rc<Conn>, send: &SendFrame<'_>) -> bool {
    let Some(target) = send.delete else {
        return true;
    };
    let window = shard.config.delete_window_ms;
    let now_ms = crate::clock::unix_ms();
    if target >= snowflake::first_id_at(now_ms.saturating_sub(window)) {
        return true;
    }
    let message = format!("a message can be deleted for everyone within {window} ms of sending it");
    send_error(
        shard,
        conn,
        Some(&send.client_msg_id),
        ErrorCode::Forbidden,
        &message,
        None,
    );
    false
}

/// A new message id and its timestamp (Unix ms, as the snowflake holds it).
pub fn next_message_id(shard: &Shard) -> (u64, u64) {
    let message_id = shard
        .snowflake
        .borrow_mut()
        .next_id(crate::clock::unix_ms());
    (message_id, snowflake::decode(message_id).unix_ms)
}
