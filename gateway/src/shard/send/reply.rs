//! Every answer a shard gives a client that is not a delivered message:
//! error frames, `overloaded`, `unavailable`, `rate_limited`, `sent`.
//!
//! Owns the error codes' retry hints (`OVERLOADED_RETRY_AFTER_MS`,
//! `UNAVAILABLE_RETRY_AFTER_MS`), taking from a user's allowances, and
//! counting client faults toward the abuse limit (1008). Never decides
//! whether a send is accepted: the pipeline and the features do, and call
//! these to say so.

use bytes::Bytes;
use chat_protocol::codes::{CloseCode, ErrorCode};
use chat_protocol::frames::{self, FrameError};
use chat_protocol::{ids, social_frames, ws};

use crate::limits::{OVERLOADED_RETRY_AFTER_MS, UNAVAILABLE_RETRY_AFTER_MS};
use crate::shard::state::conn::Conn;
use crate::shard::state::store_client::StoreError;
use crate::shard::state::users::Allowance;
use crate::shard::state::Shard;

/// Queues one JSON frame to `conn`. False when the connection is closing
/// or its outbox is full (it is then closed as a slow consumer).
pub fn send_json(conn: &Conn, json: &[u8]) -> bool {
    conn.enqueue(Bytes::from(ws::text_frame(json)))
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
    send_json(
        conn,
        &frames::encode_error(client_msg_id, code, message, retry_after_ms),
    );
}

/// A queue or the ring had no room: nothing was stored or delivered, and
/// the retry is a first send.
pub fn overloaded(shard: &Shard, conn: &Conn, client_msg_id: Option<&str>, message: &str) {
    let code = ErrorCode::Overloaded;
    let retry = Some(OVERLOADED_RETRY_AFTER_MS);
    send_error(shard, conn, client_msg_id, code, message, retry);
}

/// A send (or change) that needed storage, which did not answer: not
/// accepted (a new id could duplicate an older send); retry later.
pub fn not_answered(shard: &Shard, conn: &Conn, client_msg_id: &str) {
    let message = "storage did not answer; retry this send";
    let retry = Some(UNAVAILABLE_RETRY_AFTER_MS);
    send_error(
        shard,
        conn,
        Some(client_msg_id),
        ErrorCode::Unavailable,
        message,
        retry,
    );
}

/// A storage request for `what` failed: retry later (`unavailable`), or
/// (refused) why it was wrong.
pub fn storage_error(shard: &Shard, conn: &Conn, what: &str, error: StoreError) {
    storage_error_for(shard, conn, None, what, error);
}

/// `storage_error` answering the frame with `client_msg_id`.
pub fn storage_error_for(
    shard: &Shard,
    conn: &Conn,
    client_msg_id: Option<&str>,
    what: &str,
    error: StoreError,
) {
    let (code, retry) = match error {
        StoreError::Unavailable => (ErrorCode::Unavailable, Some(UNAVAILABLE_RETRY_AFTER_MS)),
        StoreError::Refused(_) => (ErrorCode::InvalidField, None),
    };
    let message = format!("{what}: {error}");
    send_error(shard, conn, client_msg_id, code, &message, retry);
}

/// The asker may not see or do this (not a member, not its conversation).
pub fn forbidden(shard: &Shard, conn: &Conn, client_msg_id: Option<&str>, message: &str) {
    send_error(
        shard,
        conn,
        client_msg_id,
        ErrorCode::Forbidden,
        message,
        None,
    );
}

/// A field that decoded but makes no sense here.
pub fn invalid(shard: &Shard, conn: &Conn, client_msg_id: Option<&str>, message: &str) {
    send_error(
        shard,
        conn,
        client_msg_id,
        ErrorCode::InvalidField,
        message,
        None,
    );
}

/// A frame that did not decode: answered, and counted toward the abuse
/// limit when it was the client's fault.
pub fn frame_error(shard: &Shard, conn: &Conn, error: FrameError) {
    let client_msg_id = error.client_msg_id.as_deref();
    send_error(shard, conn, client_msg_id, error.code, &error.message, None);
    if error.code.is_client_fault() {
        count_client_error(shard, conn);
    }
}

/// Takes one from the user's `allowance`; when it is spent, answers
/// `rate_limited` with `retry_after_ms` (counted toward the abuse limit if
/// `abusive`) and returns false.
pub fn take_allowance(
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
        .take(&conn.user_id, allowance, shard.monotonic_ms());
    let Err(retry_after_ms) = taken else {
        return true;
    };
    rate_limited(shard, conn, client_msg_id, message, retry_after_ms, abusive);
    false
}

/// Takes one text frame from the connection's own allowance (before the
/// frame is even parsed: a flood costs as little as possible).
pub fn take_frame(shard: &Shard, conn: &Conn) -> bool {
    let mut frames = conn.frames.get();
    let allowed = frames.try_take(shard.frames_limit(), shard.monotonic_ms());
    conn.frames.set(frames);
    let Err(retry_after_ms) = allowed else {
        return true;
    };
    let message = "too many frames on this connection";
    rate_limited(shard, conn, None, message, retry_after_ms, true);
    false
}

fn rate_limited(
    shard: &Shard,
    conn: &Conn,
    client_msg_id: Option<&str>,
    message: &str,
    retry_after_ms: u64,
    abusive: bool,
) {
    let code = ErrorCode::RateLimited;
    send_error(
        shard,
        conn,
        client_msg_id,
        code,
        message,
        Some(retry_after_ms),
    );
    if abusive {
        count_client_error(shard, conn);
    }
}

/// Closes with 1008 once a connection passes `protocol_errors_max` client errors in a minute.
fn count_client_error(shard: &Shard, conn: &Conn) {
    if conn.count_error(shard.monotonic_ms(), shard.config.protocol_errors_max) {
        conn.request_close(CloseCode::PolicyViolation);
    }
}

/// The `sent` frame, WebSocket-framed; a group conversation's names its group too.
pub fn sent_frame(client_msg_id: &str, message_id: u64, conversation: &str, ts: u64) -> Bytes {
    let json = match ids::group_of_conversation(conversation) {
        Some(group) => {
            social_frames::encode_group_sent(client_msg_id, message_id, conversation, group, ts)
        }
        None => frames::encode_sent(client_msg_id, message_id, conversation, ts),
    };
    Bytes::from(ws::text_frame(&json))
}

/// Sends and membership changes share the user's send allowance; floods
/// count toward the abuse limit (a client's loop gone wrong).
pub fn take_send_allowance(shard: &Shard, conn: &Conn, client_msg_id: &str) -> bool {
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
