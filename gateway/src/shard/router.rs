//! What a shard does with a client's text frame: validate, dedupe, number, route, answer.
//!
//! Owns the send path of protocol v1: idempotency look-up, snowflake id,
//! conversation id, one encoding of the `message` frame shared by every device,
//! local delivery or a hand-off to the recipient's home shard, then `sent`.
//! Runs on the sending connection's shard. Never does I/O and never awaits.

use bytes::Bytes;
use chat_protocol::codes::{CloseCode, ErrorCode};
use chat_protocol::frames::{self, ClientFrame, MessageFrame, SendFrame};
use chat_protocol::{ids, snowflake, ws};

use super::connection::Conn;
use super::dedup::{self, PriorSend};
use super::Shard;
use crate::mesh::{Delivery, Sender, ShardMessage};
use crate::metrics::bump;

/// How long a client should wait before retrying after `overloaded`.
const OVERLOADED_RETRY_AFTER_MS: u64 = 100;

/// Handles one complete text message from `conn`.
pub fn on_text(shard: &Shard, conn: &Conn, text: &[u8]) {
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

fn on_send(shard: &Shard, conn: &Conn, send: SendFrame<'_>) {
    if let Err(retry_after_ms) = shard
        .users
        .borrow_mut()
        .take_send(&conn.user_id, shard.now_ms())
    {
        let message = "too many sends by this user (all devices count)";
        refuse(
            shard,
            conn,
            Some(&send.client_msg_id),
            ErrorCode::RateLimited,
            message,
            retry_after_ms,
        );
        return;
    }
    let now_unix_ms = crate::clock::unix_ms();
    let key = dedup::key(&conn.user_id, &conn.device_id, &send.client_msg_id);
    if let Some(prior) = shard.idempotency.borrow_mut().get(&key, now_unix_ms) {
        // A retry: same answer, no second delivery.
        let ts = snowflake::decode(prior.message_id).unix_ms;
        let sent = frames::encode_sent(
            &send.client_msg_id,
            prior.message_id,
            &prior.conversation,
            ts,
        );
        conn.enqueue(Bytes::from(ws::text_frame(&sent)));
        bump(&shard.metrics().idempotent_replays, 1);
        return;
    }

    let message_id = shard.snowflake.borrow_mut().next_id(now_unix_ms);
    let ts = snowflake::decode(message_id).unix_ms;
    let conversation = ids::direct_conversation_id(&conn.user_id, &send.to);
    let json = frames::encode_message(&MessageFrame {
        kind: "message",
        message_id: frames::IdText(message_id),
        conversation: &conversation,
        from: &conn.user_id,
        from_device: &conn.device_id,
        to: &send.to,
        body: &send.body,
        ts,
    });
    let frame = Bytes::from(ws::text_frame(&json));

    let to_self = *send.to == *conn.user_id;
    let home = ids::home_shard(&send.to, shard.mesh.shard_count());
    if !to_self && home != shard.id {
        let delivery = ShardMessage::Deliver(Delivery {
            to_user: send.to.as_ref().into(),
            frame: frame.clone(),
        });
        if shard
            .mesh
            .send(Sender::Shard(shard.id), home, delivery)
            .is_err()
        {
            // Not queued, not remembered: the client's retry with the same id is a first send.
            let message = "the recipient's shard queue is full; retry this send";
            send_error(
                shard,
                conn,
                Some(&send.client_msg_id),
                ErrorCode::Overloaded,
                message,
                Some(OVERLOADED_RETRY_AFTER_MS),
            );
            return;
        }
        bump(&shard.metrics().messages_routed_cross_shard, 1);
    } else {
        bump(&shard.metrics().messages_routed_local, 1);
    }

    {
        let users = shard.users.borrow();
        if !to_self && home == shard.id {
            users.deliver(&send.to, &frame, None);
        }
        // The sender's other devices see what this device sent.
        users.deliver(&conn.user_id, &frame, Some(conn.slot));
    }

    let sent = frames::encode_sent(&send.client_msg_id, message_id, &conversation, ts);
    shard.idempotency.borrow_mut().insert(
        key,
        PriorSend {
            message_id,
            conversation,
        },
        now_unix_ms,
    );
    conn.enqueue(Bytes::from(ws::text_frame(&sent)));
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

fn send_error(
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
