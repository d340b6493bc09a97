//! What a shard does with a client's text frame: validate, dedupe, number, route, answer.
//!
//! Owns the dispatch of every client frame, the per-user allowances they
//! take, and the 1:1 send path: idempotency look-up, snowflake id,
//! conversation id, the record appended to the shard's ring, one encoding of
//! the `message` frame shared by every device, local delivery or a hand-off to
//! the recipient's home shard, and `sent` once the record is durable. Also
//! routes `ack` (a ring record) and typing; groups, receipts, presence,
//! per-device sends, keys, sync and history live in their own modules. Runs
//! on the sending connection's shard. Never does I/O; a frame that must wait
//! for storage runs as a task while its connection's later frames wait (so
//! their order is kept). Never delivers a message before its record is in
//! the ring.

use std::rc::Rc;

use bytes::Bytes;
use chat_backplane::Outbound;
use chat_protocol::codes::{CloseCode, ErrorCode};
use chat_protocol::frames::{self, ClientFrame, MessageFrame, SendFrame, TypingFrame};
use chat_protocol::records::{AckRecord, MessageRecord, ReceiptStatus};
use chat_protocol::store_wire::{Request, Response};
use chat_protocol::{ids, snowflake, social_frames, ws};

use super::connection::{Conn, EPHEMERAL};
use super::dedup::{self, PriorSend};
use super::per_device::Payload;
use super::store_client::StoreError;
use super::users::Allowance;
use super::{groups, keys, per_device, presence, receipts, sync, Shard};
use crate::mesh::{Delivery, Sender, ShardMessage};
use crate::metrics::bump;

/// How long a client should wait before retrying after `overloaded`.
const OVERLOADED_RETRY_AFTER_MS: u64 = 100;

/// Handles one complete text message from `conn`.
pub fn on_text(shard: &Rc<Shard>, conn: &Rc<Conn>, text: &[u8]) {
    if std::str::from_utf8(text).is_err() {
        conn.request_close(CloseCode::InvalidPayload);
        return;
    }
    let mut frames = conn.frames.get();
    let allowed = frames.try_take(shard.frames_limit(), shard.now_ms());
    conn.frames.set(frames);
    if let Err(retry_after_ms) = allowed {
        // Not even parsed: a flood costs us as little as possible.
        refuse(
            shard,
            conn,
            None,
            ErrorCode::RateLimited,
            "too many frames on this connection",
            retry_after_ms,
        );
        return;
    }
    match frames::decode_client_frame(text, shard.config.body_bytes_max) {
        Ok(ClientFrame::Ping) => {
            conn.enqueue(shard.pong_frame.clone());
        }
        Ok(ClientFrame::Send(send)) => on_send(shard, conn, send),
        Ok(ClientFrame::Ack {
            message_id,
            receipt,
        }) => {
            on_ack(shard, conn, message_id);
            if let Some(receipt) = receipt {
                receipts::on_receipt(shard, conn, receipt, ReceiptStatus::Delivered);
            }
        }
        Ok(ClientFrame::Read(receipt)) => {
            receipts::on_receipt(shard, conn, receipt, ReceiptStatus::Read);
        }
        Ok(ClientFrame::Typing { to, group: false }) => on_typing(shard, conn, &to),
        Ok(ClientFrame::Typing { to, group: true }) => {
            let message = "too many typing frames by this user";
            if take_allowance(shard, conn, Allowance::Typing, None, message, false) {
                groups::on_typing(shard, conn, to.into_owned());
            }
        }
        Ok(ClientFrame::GroupChange(change)) => {
            if take_send_allowance(shard, conn, &change.client_msg_id) {
                groups::on_change(shard, conn, change.into());
            }
        }
        Ok(ClientFrame::GroupMembers { group }) => {
            monoio::spawn(groups::list_members(
                shard.clone(),
                conn.clone(),
                group.into_owned(),
            ));
        }
        Ok(ClientFrame::Presence { users }) => {
            let message = "too many presence requests by this user";
            if take_allowance(shard, conn, Allowance::Presence, None, message, false) {
                let users = users.into_iter().map(|u| u.into_owned()).collect();
                monoio::spawn(presence::query(shard.clone(), conn.clone(), users));
            }
        }
        Ok(ClientFrame::KeysUpload(upload)) => {
            monoio::spawn(keys::upload(
                shard.clone(),
                conn.clone(),
                keys::owned(upload),
            ));
        }
        Ok(ClientFrame::Devices { user }) => {
            let message = "too many key fetches by this user";
            if take_allowance(shard, conn, Allowance::KeyFetch, None, message, false) {
                monoio::spawn(keys::devices(
                    shard.clone(),
                    conn.clone(),
                    user.into_owned(),
                ));
            }
        }
        Ok(ClientFrame::KeysFetch { user }) => {
            let message = "too many key fetches by this user";
            if take_allowance(shard, conn, Allowance::KeyFetch, None, message, false) {
                monoio::spawn(keys::fetch(shard.clone(), conn.clone(), user.into_owned()));
            }
        }
        Ok(ClientFrame::Sync { after }) => {
            if conn.begin_sync() {
                monoio::spawn(sync::sync_device(shard.clone(), conn.clone(), after));
            } else {
                let message = "a sync is already running on this connection";
                send_error(
                    shard,
                    conn,
                    None,
                    ErrorCode::Overloaded,
                    message,
                    Some(OVERLOADED_RETRY_AFTER_MS),
                );
            }
        }
        Ok(ClientFrame::History {
            conversation,
            before,
            limit,
        }) => {
            monoio::spawn(sync::history(
                shard.clone(),
                conn.clone(),
                conversation.into_owned(),
                before,
                limit,
            ));
        }
        Err(error) => {
            send_error(
                shard,
                conn,
                error.client_msg_id.as_deref(),
                error.code,
                &error.message,
                None,
            );
            if error.code.is_client_fault()
                && conn.count_error(shard.now_ms(), shard.config.protocol_errors_max)
            {
                conn.request_close(CloseCode::PolicyViolation);
            }
        }
    }
}

/// Sends and membership changes share the user's send allowance; floods
/// count toward the abuse limit (a client's loop gone wrong).
fn take_send_allowance(shard: &Shard, conn: &Conn, client_msg_id: &str) -> bool {
    let message = "too many sends by this user (all devices count)";
    take_allowance(
        shard,
        conn,
        Allowance::Send,
        Some(client_msg_id),
        message,
        true,
    )
}

fn on_send(shard: &Rc<Shard>, conn: &Rc<Conn>, send: SendFrame<'_>) {
    if !take_send_allowance(shard, conn, &send.client_msg_id) {
        return;
    }
    if send.group {
        groups::on_send(shard, conn, OwnedSend::from(send));
        return;
    }
    if !send.bodies.is_empty() {
        per_device::on_send(shard, conn, OwnedSend::from(send));
        return;
    }
    // Only devices past the warm-up bound pay for this extra look-up.
    if conn.warm_truncated() && !known_send(shard, conn, &send.client_msg_id) {
        // This device sent more than the warm-up loaded: the id may be an
        // older send. Ask storage first; this connection's later frames wait.
        conn.pause();
        monoio::spawn(look_up_then_accept(
            shard.clone(),
            conn.clone(),
            OwnedSend::from(send),
        ));
        return;
    }
    accept_send(shard, conn, send);
}

/// Whether this device's `client_msg_id` is in the idempotency table.
pub(super) fn known_send(shard: &Shard, conn: &Conn, client_msg_id: &str) -> bool {
    let key = dedup::key(&conn.user_id, &conn.device_id, client_msg_id);
    shard
        .idempotency
        .borrow_mut()
        .get(&key, crate::clock::unix_ms())
        .is_some()
}

/// A send that may wait for storage before it is accepted.
pub(super) struct OwnedSend {
    pub client_msg_id: String,
    /// The user, or the group.
    pub to: String,
    pub body: String,
    pub bodies: Vec<(String, String)>,
    pub media: Option<frames::Media<'static>>,
}

impl From<SendFrame<'_>> for OwnedSend {
    fn from(send: SendFrame<'_>) -> Self {
        Self {
            client_msg_id: send.client_msg_id.into_owned(),
            to: send.to.into_owned(),
            body: send.body.into_owned(),
            bodies: send
                .bodies
                .into_iter()
                .map(|(device, body)| (device.into_owned(), body.into_owned()))
                .collect(),
            media: send.media.map(|m| frames::Media {
                url: m.url.into_owned().into(),
                size: m.size,
                sha256: m.sha256.into_owned().into(),
            }),
        }
    }
}

/// Looks a send's id up in storage (behind the read barrier, so a first
/// attempt still in the ring is found) and remembers what it finds. False
/// when storage did not answer (the send must not be accepted as new).
pub(super) async fn look_up_prior(
    shard: &Shard,
    conn: &Conn,
    client_msg_id: &str,
    conversation: &str,
) -> bool {
    let response = shard
        .store
        .request(
            |req| Request::SendOf {
                req,
                user: conn.user_id.to_string(),
                device: conn.device_id.to_string(),
                client_msg_id: client_msg_id.to_owned(),
            },
            std::time::Duration::from_millis(shard.config.storage_timeout_ms),
        )
        .await;
    let Ok(Response::SendOf { message_id, .. }) = response else {
        return false;
    };
    if let Some(message_id) = message_id {
        let key = dedup::key(&conn.user_id, &conn.device_id, client_msg_id);
        let prior = PriorSend {
            message_id,
            conversation: conversation.to_owned(),
            end: 0,
        };
        shard
            .idempotency
            .borrow_mut()
            .insert(key, prior, crate::clock::unix_ms());
    }
    true
}

/// Looks the send's id up in storage, then accepts the send as usual (a
/// replay if found) and resumes the connection.
async fn look_up_then_accept(shard: Rc<Shard>, conn: Rc<Conn>, send: OwnedSend) {
    accept_owned(&shard, &conn, send).await;
    conn.resume();
}

/// Accepts a direct send that waited for storage: its id is first looked
/// up when the device is past its warm-up bound.
pub(super) async fn accept_owned(shard: &Shard, conn: &Rc<Conn>, send: OwnedSend) {
    let conversation = ids::direct_conversation_id(&conn.user_id, &send.to);
    let looked_up = !conn.warm_truncated()
        || known_send(shard, conn, &send.client_msg_id)
        || look_up_prior(shard, conn, &send.client_msg_id, &conversation).await;
    match looked_up {
        true => {
            accept_send(
                shard,
                conn,
                SendFrame {
                    client_msg_id: send.client_msg_id.as_str().into(),
                    to: send.to.as_str().into(),
                    group: false,
                    body: send.body.as_str().into(),
                    bodies: send
                        .bodies
                        .iter()
                        .map(|(d, b)| (d.as_str().into(), b.as_str().into()))
                        .collect(),
                    media: send.media,
                },
            );
        }
        false => {
            // Not accepted (a new id could duplicate an older send): retry later.
            not_answered(shard, conn, &send.client_msg_id);
        }
    }
}

/// The `sent` frame; a group conversation's names its group too.
pub(super) fn sent_frame(
    client_msg_id: &str,
    message_id: u64,
    conversation: &str,
    ts: u64,
) -> Vec<u8> {
    match ids::group_of_conversation(conversation) {
        Some(group) => {
            social_frames::encode_group_sent(client_msg_id, message_id, conversation, group, ts)
        }
        None => frames::encode_sent(client_msg_id, message_id, conversation, ts),
    }
}

/// When this device already sent `client_msg_id`: answers the retry with the
/// first send's `sent` (once durable; not delivered or published again) and
/// returns true.
pub(super) fn replay_if_known(
    shard: &Shard,
    conn: &Rc<Conn>,
    client_msg_id: &str,
    now_unix_ms: u64,
) -> bool {
    let key = dedup::key(&conn.user_id, &conn.device_id, client_msg_id);
    let Some(prior) = shard
        .idempotency
        .borrow_mut()
        .get(&key, now_unix_ms)
        .cloned()
    else {
        return false;
    };
    let ts = snowflake::decode(prior.message_id).unix_ms;
    let sent = sent_frame(client_msg_id, prior.message_id, &prior.conversation, ts);
    shard.durability.send_when_durable(
        prior.end,
        conn,
        Bytes::from(ws::text_frame(&sent)),
        None,
        |_| {},
    );
    bump(&shard.metrics().idempotent_replays, 1);
    true
}

/// Accepts a send whose id is either known (a replay) or certainly new.
fn accept_send(shard: &Shard, conn: &Rc<Conn>, send: SendFrame<'_>) {
    let now_unix_ms = crate::clock::unix_ms();
    if replay_if_known(shard, conn, &send.client_msg_id, now_unix_ms) {
        return;
    }
    let key = dedup::key(&conn.user_id, &conn.device_id, &send.client_msg_id);

    let to_self = *send.to == *conn.user_id;
    let home = ids::home_shard(&send.to, shard.mesh.shard_count());
    let remote = !to_self && home != shard.id;
    // Checked before anything is stored: once the record is in the ring the
    // hand-off must not fail (this shard is its lane's only producer).
    if remote && !shard.mesh.has_room(Sender::Shard(shard.id), home) {
        let message = "the recipient's shard queue is full; retry this send";
        overloaded(shard, conn, &send.client_msg_id, message);
        return;
    }

    let message_id = shard.snowflake.borrow_mut().next_id(now_unix_ms);
    let ts = snowflake::decode(message_id).unix_ms;
    let conversation = ids::direct_conversation_id(&conn.user_id, &send.to);
    let record = MessageRecord {
        message_id,
        ts,
        conversation: &conversation,
        from: &conn.user_id,
        from_device: &conn.device_id,
        to: &send.to,
        client_msg_id: &send.client_msg_id,
        body: &send.body,
        media: send.media.clone(),
        event: None,
        recipients: Vec::new(),
        bodies: send.bodies.iter().map(|(d, b)| (&**d, &**b)).collect(),
    };
    let end = match shard.durability.append(&record.encode()) {
        Ok(end) => end,
        Err(_) => {
            // Back-pressure: nothing stored, nothing delivered; the retry is a first send.
            bump(&shard.metrics().ring_full, 1);
            let message = "storage is behind; retry this send";
            overloaded(shard, conn, &send.client_msg_id, message);
            return;
        }
    };
    // Between nodes a per-device message carries every ciphertext; the
    // receiving node hands each device its own.
    let json = frames::encode_message(&MessageFrame {
        bodies: (!record.bodies.is_empty()).then_some(frames::BodiesJson(&record.bodies)),
        ..sync::message_frame(&record)
    });
    let payload = Payload::of(&record, &json, &send.to);
    // The sender's other devices: the same frame, or their own ciphertexts.
    let own_payload = match &payload {
        Payload::Shared(frame) => Payload::Shared(frame.clone()),
        Payload::PerDevice(_) => Payload::of(&record, &json, &conn.user_id),
    };
    // Other nodes' devices of both users get it once it is durable.
    let publish = shard.backplane.is_some().then(|| {
        let mut users: Vec<Box<str>> = vec![send.to.as_ref().into()];
        if !to_self {
            users.push(conn.user_id.as_ref().into());
        }
        Box::new(Outbound::Publish {
            users,
            message_id,
            json: Bytes::from(json),
        })
    });

    if remote {
        let delivery = payload.to_shard(&send.to, message_id);
        let handed = shard.mesh.send(Sender::Shard(shard.id), home, delivery);
        debug_assert!(handed.is_ok(), "room was checked above");
        bump(&shard.metrics().messages_routed_cross_shard, 1);
    } else {
        bump(&shard.metrics().messages_routed_local, 1);
    }

    {
        let users = shard.users.borrow();
        if !to_self && home == shard.id {
            payload.deliver(&users, &send.to, message_id, None);
        }
        // The sender's other devices see what this device sent.
        own_payload.deliver(&users, &conn.user_id, message_id, Some(conn.slot));
    }

    let sent = frames::encode_sent(&send.client_msg_id, message_id, &conversation, ts);
    shard.idempotency.borrow_mut().insert(
        key,
        PriorSend {
            message_id,
            conversation,
            end,
        },
        now_unix_ms,
    );
    shard.durability.send_when_durable(
        end,
        conn,
        Bytes::from(ws::text_frame(&sent)),
        publish,
        |publish| shard.publish(*publish),
    );
}

/// Tells the other user's devices, on every node, that this user is typing.
/// Ephemeral: never stored, never held for a syncing device, dropped rather
/// than queued when any queue on the way is full.
fn on_typing(shard: &Shard, conn: &Rc<Conn>, to: &str) {
    if *to == *conn.user_id {
        let message = "`to` must be another user";
        send_error(shard, conn, None, ErrorCode::InvalidField, message, None);
        return;
    }
    let message = "too many typing frames by this user";
    if !take_allowance(shard, conn, Allowance::Typing, None, message, false) {
        return;
    }
    let conversation = ids::direct_conversation_id(&conn.user_id, to);
    let json = frames::encode_typing(&TypingFrame {
        kind: "typing",
        conversation: &conversation,
        from: &conn.user_id,
        from_device: &conn.device_id,
        expires_ms: shard.config.typing_expires_ms,
    });
    deliver_ephemeral(shard, to, json);
    bump(&shard.metrics().typing, 1);
}

/// Queues an ephemeral frame (never stored, never held for a syncing device)
/// to every device of `user`: on its home shard here, and on other nodes
/// through the backplane at once. Dropped where a queue is full.
pub fn deliver_ephemeral(shard: &Shard, user: &str, json: Vec<u8>) {
    let frame = Bytes::from(ws::text_frame(&json));
    let home = ids::home_shard(user, shard.mesh.shard_count());
    if home == shard.id {
        shard.users.borrow().deliver(user, EPHEMERAL, &frame, None);
    } else {
        let delivery = ShardMessage::Deliver(Delivery {
            to_user: user.into(),
            message_id: EPHEMERAL,
            frame,
        });
        let _ = shard.mesh.send(Sender::Shard(shard.id), home, delivery);
    }
    if shard.backplane.is_some() {
        shard.publish(Outbound::Publish {
            users: vec![user.into()],
            message_id: EPHEMERAL,
            json: Bytes::from(json),
        });
    }
}

/// A device has `message_id`: recorded for its cursor. Best effort: a lost
/// acknowledgement only means the message is offered again on the next sync.
fn on_ack(shard: &Shard, conn: &Conn, message_id: u64) {
    let record = AckRecord {
        user: &conn.user_id,
        device: &conn.device_id,
        message_id,
    };
    match shard.durability.append(&record.encode()) {
        Ok(_) => bump(&shard.metrics().acks, 1),
        Err(_) => bump(&shard.metrics().acks_dropped, 1),
    }
}

pub(super) fn overloaded(shard: &Shard, conn: &Conn, client_msg_id: &str, message: &str) {
    send_error(
        shard,
        conn,
        Some(client_msg_id),
        ErrorCode::Overloaded,
        message,
        Some(OVERLOADED_RETRY_AFTER_MS),
    );
}

/// Takes one from the user's `allowance`; when it is spent, answers
/// `rate_limited` with `retry_after_ms` (counted toward the abuse limit if
/// `abusive`) and returns false.
fn take_allowance(
    shard: &Shard,
    conn: &Conn,
    allowance: Allowance,
    client_msg_id: Option<&str>,
    message: &str,
    abusive: bool,
) -> bool {
    let taken = shard
        .users
        .borrow_mut()
        .take(&conn.user_id, allowance, shard.now_ms());
    let Err(retry_after_ms) = taken else {
        return true;
    };
    let code = ErrorCode::RateLimited;
    if abusive {
        refuse(shard, conn, client_msg_id, code, message, retry_after_ms);
    } else {
        send_error(
            shard,
            conn,
            client_msg_id,
            code,
            message,
            Some(retry_after_ms),
        );
    }
    false
}

/// Answers `rate_limited` and counts it toward the abuse limit.
fn refuse(
    shard: &Shard,
    conn: &Conn,
    client_msg_id: Option<&str>,
    code: ErrorCode,
    message: &str,
    retry_after_ms: u64,
) {
    send_error(
        shard,
        conn,
        client_msg_id,
        code,
        message,
        Some(retry_after_ms),
    );
    count_client_error(shard, conn);
}

/// Closes with 1008 once a connection passes `protocol_errors_max` client errors in a minute.
fn count_client_error(shard: &Shard, conn: &Conn) {
    if conn.count_error(shard.now_ms(), shard.config.protocol_errors_max) {
        conn.request_close(CloseCode::PolicyViolation);
    }
}

/// A send (or change) that needed storage, which did not answer: not
/// accepted (a new id could duplicate an older send); retry later.
pub(super) fn not_answered(shard: &Shard, conn: &Conn, client_msg_id: &str) {
    let message = "storage did not answer; retry this send";
    send_error(
        shard,
        conn,
        Some(client_msg_id),
        ErrorCode::Unavailable,
        message,
        Some(1_000),
    );
}

/// Tells the client a storage request for `what` failed: retry later, or
/// (refused) why it was wrong.
pub(super) fn storage_error(shard: &Shard, conn: &Conn, what: &str, error: StoreError) {
    let (code, retry) = match error {
        StoreError::Unavailable => (ErrorCode::Unavailable, Some(1_000)),
        StoreError::Refused(_) => (ErrorCode::InvalidField, None),
    };
    send_error(shard, conn, None, code, &format!("{what}: {error}"), retry);
}

pub fn send_error(
    shard: &Shard,
    conn: &Conn,
    client_msg_id: Option<&str>,
    code: ErrorCode,
    message: &str,
    retry_after_ms: Option<u64>,
) {
    shard.metrics().error(code);
    let json = frames::encode_error(client_msg_id, code, message, retry_after_ms);
    conn.enqueue(Bytes::from(ws::text_frame(&json)));
}
