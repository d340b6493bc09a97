//! The reads a device asks for, served from storage: sync (on connect and on
//! request), history, warming idempotency after a restart; and `ack`, which
//! moves the device's sync cursor.
//!
//! Owns paging a sync (each page read only once the device's outbox is half
//! empty, so a large backlog never overruns the send queue), the `synced`
//! frame, the end of the device's sync hold (live messages that arrived
//! meanwhile, minus those the sync already sent), and history pages for
//! members only. What a device is shown of a stored record is
//! `chat_protocol::render`. Runs as tasks on the shard; never blocks it,
//! never holds a `RefCell` borrow across an await, never imports another feature.

use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use chat_protocol::frames::{self, HistoryFrame};
use chat_protocol::records::{decode_message, AckRecord, MessageRecord};
use chat_protocol::store_wire::{Request, Response, SyncFrom};
use chat_protocol::{ids, render, ws};

use crate::limits::{
    HISTORY_FRAME_OVERHEAD_BYTES, SYNC_OUTBOX_POLL_MS, SYNC_PAGE_BYTES, SYNC_RETRY_MS,
    SYNC_RETRY_MS_MAX,
};
use crate::metrics::bump;
use crate::shard::send::members::member_roles;
use crate::shard::send::reply;
use crate::shard::state::conn::Conn;
use crate::shard::state::idempotency::{self, PriorSend};
use crate::shard::state::store_client::StoreError;
use crate::shard::state::Shard;

/// Loads the device's recent sends so that a retry after a gateway restart
/// is answered with its first message id.
pub async fn warm_idempotency(shard: &Rc<Shard>, conn: &Rc<Conn>) -> Result<(), StoreError> {
    let now_unix_ms = crate::clock::unix_ms();
    let since = now_unix_ms.saturating_sub(shard.config.idempotency_window_ms);
    let request = |req| Request::Recent {
        req,
        user: conn.user_id.to_string(),
        device: conn.device_id.to_string(),
        since_unix_ms: since,
        limit: shard.config.idempotency_warm_max,
    };
    let response = shard
        .store
        .request(request, shard.storage_timeout())
        .await?;
    let Response::RecentSends { sends, .. } = response else {
        return Err(StoreError::Unavailable);
    };
    // Fewer than the bound: every send in the window is known now. At the
    // bound, an unknown id is looked up before it becomes a new message.
    conn.set_warm_truncated(sends.len() >= usize::from(shard.config.idempotency_warm_max));
    let mut table = shard.idempotency.borrow_mut();
    for send in sends {
        let key = idempotency::key(&conn.user_id, &conn.device_id, &send.client_msg_id);
        if table.get(&key, now_unix_ms).is_none() {
            let prior = PriorSend {
                message_id: send.message_id,
                conversation: send.conversation,
                // Stored, so durable: a replay is answered at once.
                end: 0,
            };
            table.insert(key, prior, now_unix_ms);
        }
    }
    Ok(())
}

/// Starts the sync of a device whose sync hold has begun (at registration,
/// before its client could see `hello`).
pub fn start(shard: &Rc<Shard>, conn: &Rc<Conn>, from: SyncFrom) {
    monoio::spawn(sync_device(shard.clone(), conn.clone(), from, 0));
}

/// Starts a sync unless one is running on the connection; false if one is.
pub fn begin(shard: &Rc<Shard>, conn: &Rc<Conn>, from: SyncFrom) -> bool {
    let begun = conn.begin_sync();
    if begun {
        start(shard, conn, from);
    }
    begun
}

/// A resync of every message made since `since_unix_ms`, which the node
/// asks for when the backplane may have lost some: now, or right after the
/// sync that runs. From a time, not from the device's cursor: the device
/// may have acknowledged a later message that did arrive, and acks are
/// cumulative per conversation. What it had already is sent again, and the
/// client drops it by `message_id`.
pub fn resync(shard: &Rc<Shard>, conn: &Rc<Conn>, since_unix_ms: u64) {
    let first = chat_protocol::snowflake::first_id_at(since_unix_ms);
    if !conn.queue_resync(first) {
        begin(shard, conn, SyncFrom::MadeSince(first));
    }
}

/// `sync` (or `sync` with `after`), asked by the client.
pub fn on_request(shard: &Rc<Shard>, conn: &Rc<Conn>, after: Option<u64>) {
    let from = after.map_or(SyncFrom::Cursor, SyncFrom::AfterMessage);
    if !begin(shard, conn, from) {
        let message = "a sync is already running on this connection";
        reply::overloaded(shard, conn, None, message);
    }
}

/// A device has `message_id`: recorded for its cursor. Best effort: a lost
/// acknowledgement only means the message is offered again on the next sync.
pub fn on_ack(shard: &Shard, conn: &Conn, message_id: u64) {
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

/// Sends the device what it has not acknowledged (or everything from
/// `from`), then `synced`, then what arrived live meanwhile. The caller has
/// started the device's sync hold.
/// `attempt` counts the failures before this try (0 for a first try).
async fn sync_device(shard: Rc<Shard>, conn: Rc<Conn>, from: SyncFrom, attempt: u32) {
    let mut failed = false;
    match sync_pages(&shard, &conn, from).await {
        Ok(Synced {
            last,
            count,
            more,
            expired,
        }) => {
            reply::send_json(&conn, &frames::encode_synced(last, count, more, expired));
            bump(&shard.metrics().syncs, 1);
        }
        Err(SyncError::Closed) => {}
        Err(SyncError::Store(error)) => {
            reply::storage_error(&shard, &conn, "sync", error);
            failed = true;
        }
    }
    let then_from = conn.end_sync();
    if conn.is_closing() {
        return;
    }
    if failed {
        // The node's own syncs (on connect, after an outage or a move) are
        // how a device gets what it missed: one that storage failed is tried
        // again, spread and backing off, until it succeeds or the device leaves.
        monoio::spawn(retry(shard, conn, from, then_from, attempt + 1));
    } else if let Some(first) = then_from {
        begin(&shard, &conn, SyncFrom::MadeSince(first));
    }
}

/// Tries a failed sync again after a jittered, growing delay; a resync that
/// was asked for meanwhile joins it.
async fn retry(
    shard: Rc<Shard>,
    conn: Rc<Conn>,
    from: SyncFrom,
    then_from: Option<u64>,
    attempt: u32,
) {
    let ceiling = SYNC_RETRY_MS
        .saturating_mul(1 << attempt.min(16))
        .min(SYNC_RETRY_MS_MAX);
    let delay = ceiling / 2 + fastrand::u64(0..=ceiling / 2);
    monoio::time::sleep(Duration::from_millis(delay)).await;
    if conn.is_closing() {
        return;
    }
    // Both the failed sync and any resync queued behind it: the earlier start.
    let from = match (from, then_from) {
        (SyncFrom::MadeSince(first), Some(then)) => SyncFrom::MadeSince(first.min(then)),
        (from, _) => from,
    };
    if conn.begin_sync() {
        if let (Some(then), false) = (then_from, matches!(from, SyncFrom::MadeSince(_))) {
            conn.queue_resync(then);
        }
        bump(&shard.metrics().sync_retries, 1);
        monoio::spawn(sync_device(shard, conn, from, attempt));
    } else if let SyncFrom::MadeSince(first) = from {
        // A sync started meanwhile (the client asked): this one follows it.
        conn.queue_resync(first);
    }
}

enum SyncError {
    Closed,
    Store(StoreError),
}

/// What a sync sent, for its `synced` frame.
struct Synced {
    last: Option<u64>,
    count: u64,
    more: bool,
    /// Unacknowledged messages retention removed before the device saw them.
    expired: u64,
}

async fn sync_pages(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    mut from: SyncFrom,
) -> Result<Synced, SyncError> {
    let mut last = None;
    let mut count = 0u64;
    let mut expired = 0u64;
    let half_queue = shard.config.send_queue_bytes_max / 2;
    loop {
        while conn.queued_bytes() > half_queue && !conn.is_closing() {
            monoio::time::sleep(Duration::from_millis(SYNC_OUTBOX_POLL_MS)).await;
        }
        if conn.is_closing() {
            return Err(SyncError::Closed);
        }
        let request = |req| Request::Sync {
            req,
            user: conn.user_id.to_string(),
            device: conn.device_id.to_string(),
            from,
            limit: shard.config.sync_page_messages,
            bytes_max: SYNC_PAGE_BYTES,
        };
        let response = shard
            .store
            .request(request, shard.storage_timeout())
            .await
            .map_err(SyncError::Store)?;
        let Response::SyncPage {
            entries,
            last_seq,
            more,
            expired: expired_here,
            ..
        } = response
        else {
            return Err(SyncError::Store(StoreError::Unavailable));
        };
        for entry in &entries {
            let Ok(message) = decode_message(&entry.record) else {
                tracing::warn!(
                    shard = shard.id,
                    "undecodable stored message skipped in sync"
                );
                continue;
            };
            let Some(json) = render::encode_for_device(&message, &conn.user_id, &conn.device_id)
            else {
                continue; // a per-device message for other devices
            };
            if !conn.enqueue_synced(message.message_id, Bytes::from(ws::text_frame(&json))) {
                return Err(SyncError::Closed);
            }
            last = Some(message.message_id);
            count += 1;
        }
        bump(&shard.metrics().synced_messages, entries.len() as u64);
        expired += expired_here;
        if !more || count >= u64::from(shard.config.sync_messages_max) {
            return Ok(Synced {
                last,
                count,
                more,
                expired,
            });
        }
        from = match from {
            SyncFrom::Cursor | SyncFrom::AfterSeq(_) => SyncFrom::AfterSeq(last_seq),
            SyncFrom::AfterMessage(_) | SyncFrom::MadeSince(_) | SyncFrom::AfterSeqAll(_) => {
                SyncFrom::AfterSeqAll(last_seq)
            }
        };
    }
}

/// `history`: a page of a conversation the user belongs to.
pub fn on_history(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    conversation: &str,
    before: Option<u64>,
    limit: u16,
) {
    let task = history(
        shard.clone(),
        conn.clone(),
        conversation.to_owned(),
        before,
        limit,
    );
    monoio::spawn(task);
}

async fn history(
    shard: Rc<Shard>,
    conn: Rc<Conn>,
    conversation: String,
    before: Option<u64>,
    limit: u16,
) {
    // A group member reads from where they joined: what was said before
    // (and every ciphertext in it) was never meant for them.
    let since = match ids::group_of_conversation(&conversation) {
        Some(group) => match member_roles(&shard, group).await {
            Ok(roles) => roles
                .members
                .iter()
                .find(|role| *role.user == *conn.user_id)
                .map(|role| Some(role.joined_id).filter(|joined| *joined > 0)),
            Err(error) => return reply::storage_error(&shard, &conn, "history", error),
        },
        None => ids::is_direct_member(&conversation, &conn.user_id).then_some(None),
    };
    let Some(since) = since else {
        return reply::forbidden(&shard, &conn, None, "not a conversation of this user");
    };
    let request = |req| Request::History {
        req,
        asker: conn.user_id.to_string(),
        conversation: conversation.clone(),
        before,
        since,
        limit,
    };
    let records = match shard.store.request(request, shard.storage_timeout()).await {
        Ok(Response::Messages { records, .. }) => records,
        // Any failure of the page itself is worth a retry.
        Ok(_) | Err(_) => {
            return reply::storage_error(&shard, &conn, "history", StoreError::Unavailable)
        }
    };
    // Newest first, cut to half a send queue: the client pages with `before`.
    let budget = shard.config.send_queue_bytes_max / 2;
    let mut bytes = 0;
    let messages: Vec<MessageRecord<'_>> = records
        .iter()
        .take_while(|record| {
            bytes += record.len() + HISTORY_FRAME_OVERHEAD_BYTES;
            bytes <= budget
        })
        .filter_map(|record| decode_message(record).ok())
        .collect();
    let json = frames::encode_history(&HistoryFrame {
        kind: "history",
        conversation: &conversation,
        messages: messages
            .iter()
            .map(|message| render::history_frame(message, &conn.user_id, &conn.device_id))
            .collect(),
    });
    reply::send_json(&conn, &json);
}
