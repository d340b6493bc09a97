//! The reads a device asks for, served from storage: sync (on connect and on
//! request), history, and warming idempotency after a restart.
//!
//! Owns turning a stored record into the frame a device gets (`message`,
//! with its group event or its own per-device ciphertext; `receipts`), paging a sync (each page read only once the device's outbox has room,
//! so a large backlog never overruns the send queue), the `synced` frame, and
//! the end of the device's sync hold (live messages that arrived meanwhile,
//! minus those the sync already sent). Runs as tasks on the shard; never
//! blocks it and never holds a `RefCell` borrow across an await.

use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use chat_protocol::codes::ErrorCode;
use chat_protocol::frames::{self, GroupEventJson, HistoryFrame, IdText, MessageFrame};
use chat_protocol::records::{decode_message, Event, MessageRecord};
use chat_protocol::store_wire::{Request, Response, SyncFrom};
use chat_protocol::{ids, social_frames, ws};

use super::connection::Conn;
use super::dedup::{self, PriorSend};
use super::router::send_error;
use super::store_client::StoreError;
use super::Shard;
use crate::metrics::bump;

/// Bytes of one sync page.
const SYNC_PAGE_BYTES: u32 = 512 * 1024;
/// How often a sync checks whether the device's outbox has drained.
const OUTBOX_POLL: Duration = Duration::from_millis(5);

/// The `message` frame of a stored (or just stored) message, as live
/// delivery encodes it: a group's names its group, and a membership change its event.
pub fn message_frame<'a>(message: &'a MessageRecord<'a>) -> MessageFrame<'a> {
    let group = ids::group_of_conversation(message.conversation);
    MessageFrame {
        kind: "message",
        message_id: IdText(message.message_id),
        conversation: message.conversation,
        from: message.from,
        from_device: message.from_device,
        to: message.to,
        body: message.body,
        ts: message.ts,
        media: message.media.clone(),
        bodies: None,
        group: group.map(|_| message.to),
        event: match &message.event {
            Some(Event::Group { action, members }) => Some(GroupEventJson {
                action: action.as_str(),
                members,
            }),
            _ => None,
        },
    }
}

/// The frame `device` gets for a stored record: `receipts` for a batch of
/// receipts, `message` for everything else (with the device's own
/// ciphertext, or nothing when the message has none for it).
pub fn encode_stored(message: &MessageRecord<'_>, user: &str, device: &str) -> Option<Vec<u8>> {
    Some(match &message.event {
        Some(Event::Receipts {
            conversation,
            receipts,
        }) => {
            social_frames::encode_receipts(message.message_id, conversation, receipts, message.ts)
        }
        _ => {
            let mut frame = message_frame(message);
            frame.body = message.body_for(user, device)?;
            frames::encode_message(&frame)
        }
    })
}

fn timeout(shard: &Shard) -> Duration {
    Duration::from_millis(shard.config.storage_timeout_ms)
}

/// Loads the device's recent sends so that a retry after a gateway restart
/// is answered with its first message id.
pub async fn warm_idempotency(shard: &Rc<Shard>, conn: &Rc<Conn>) -> Result<(), StoreError> {
    let now_ms = crate::clock::unix_ms();
    let since = now_ms.saturating_sub(shard.config.idempotency_window_ms);
    let response = shard
        .store
        .request(
            |req| Request::Recent {
                req,
                user: conn.user_id.to_string(),
                device: conn.device_id.to_string(),
                since_unix_ms: since,
                limit: shard.config.idempotency_warm_max,
            },
            timeout(shard),
        )
        .await?;
    let Response::RecentSends { sends, .. } = response else {
        return Err(StoreError::Unavailable);
    };
    // Fewer than the bound: every send in the window is known now. At the
    // bound, an unknown id is looked up before it becomes a new message.
    conn.set_warm_truncated(sends.len() >= usize::from(shard.config.idempotency_warm_max));
    let mut table = shard.idempotency.borrow_mut();
    for send in sends {
        let key = dedup::key(&conn.user_id, &conn.device_id, &send.client_msg_id);
        if table.get(&key, now_ms).is_none() {
            let prior = PriorSend {
                message_id: send.message_id,
                conversation: send.conversation,
                // Stored, so durable: a replay is answered at once.
                end: 0,
            };
            table.insert(key, prior, now_ms);
        }
    }
    Ok(())
}

/// Sends the device what it has not acknowledged (or everything after
/// `after`), then `synced`, then what arrived live meanwhile. The caller has
/// started the device's sync hold.
pub async fn sync_device(shard: Rc<Shard>, conn: Rc<Conn>, after: Option<u64>) {
    let outcome = sync_pages(&shard, &conn, after).await;
    match outcome {
        Ok((last, count, more)) => {
            conn.enqueue(Bytes::from(ws::text_frame(&frames::encode_synced(
                last, count, more,
            ))));
            bump(&shard.metrics().syncs, 1);
        }
        Err(SyncError::Closed) => {}
        Err(SyncError::Store(error)) => {
            let code = match error {
                StoreError::Unavailable => ErrorCode::Unavailable,
                StoreError::Refused(_) => ErrorCode::InvalidField,
            };
            let retry = (code == ErrorCode::Unavailable).then_some(1_000);
            send_error(&shard, &conn, None, code, &format!("sync: {error}"), retry);
        }
    }
    conn.end_sync();
}

enum SyncError {
    Closed,
    Store(StoreError),
}

async fn sync_pages(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    after: Option<u64>,
) -> Result<(Option<u64>, u64, bool), SyncError> {
    let mut from = match after {
        Some(message_id) => SyncFrom::AfterMessage(message_id),
        None => SyncFrom::Cursor,
    };
    let mut last = None;
    let mut count = 0u64;
    let half_queue = shard.config.send_queue_bytes_max / 2;
    loop {
        while conn.queued_bytes() > half_queue && !conn.is_closing() {
            monoio::time::sleep(OUTBOX_POLL).await;
        }
        if conn.is_closing() {
            return Err(SyncError::Closed);
        }
        let response = shard
            .store
            .request(
                |req| Request::Sync {
                    req,
                    user: conn.user_id.to_string(),
                    device: conn.device_id.to_string(),
                    from,
                    limit: shard.config.sync_page_messages,
                    bytes_max: SYNC_PAGE_BYTES,
                },
                timeout(shard),
            )
            .await
            .map_err(SyncError::Store)?;
        let Response::SyncPage {
            entries,
            last_seq,
            more,
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
            let Some(json) = encode_stored(&message, &conn.user_id, &conn.device_id) else {
                continue; // a per-device message for other devices
            };
            if !conn.enqueue_synced(message.message_id, Bytes::from(ws::text_frame(&json))) {
                return Err(SyncError::Closed);
            }
            last = Some(message.message_id);
            count += 1;
        }
        bump(&shard.metrics().synced_messages, entries.len() as u64);
        if !more {
            return Ok((last, count, false));
        }
        if count >= u64::from(shard.config.sync_messages_max) {
            return Ok((last, count, true));
        }
        from = match after {
            Some(_) => SyncFrom::AfterSeqAll(last_seq),
            None => SyncFrom::AfterSeq(last_seq),
        };
    }
}

/// Answers `history` for a conversation the user belongs to.
pub async fn history(
    shard: Rc<Shard>,
    conn: Rc<Conn>,
    conversation: String,
    before: Option<u64>,
    limit: u16,
) {
    let member = match ids::group_of_conversation(&conversation) {
        Some(group) => match super::groups::members(&shard, group, false).await {
            Ok(members) => super::groups::is_member(&members, &conn.user_id),
            Err(error) => return super::router::storage_error(&shard, &conn, "history", error),
        },
        None => ids::is_direct_member(&conversation, &conn.user_id),
    };
    if !member {
        let message = "not a conversation of this user";
        send_error(&shard, &conn, None, ErrorCode::Forbidden, message, None);
        return;
    }
    let response = shard
        .store
        .request(
            |req| Request::History {
                req,
                conversation: conversation.clone(),
                before,
                limit,
            },
            timeout(&shard),
        )
        .await;
    let records = match response {
        Ok(Response::Messages { records, .. }) => records,
        Ok(_) | Err(_) => {
            let message = "history: storage is unavailable; retry";
            send_error(
                &shard,
                &conn,
                None,
                ErrorCode::Unavailable,
                message,
                Some(1_000),
            );
            return;
        }
    };
    // Newest first, cut to half a send queue: the client pages with `before`.
    let budget = shard.config.send_queue_bytes_max / 2;
    let mut bytes = 0;
    let messages: Vec<MessageRecord<'_>> = records
        .iter()
        .take_while(|record| {
            bytes += record.len() + 160;
            bytes <= budget
        })
        .filter_map(|record| decode_message(record).ok())
        .collect();
    let json = frames::encode_history(&HistoryFrame {
        kind: "history",
        conversation: &conversation,
        messages: messages
            .iter()
            .map(|message| MessageFrame {
                // A per-device message shows this device's ciphertext only.
                body: message
                    .body_for(&conn.user_id, &conn.device_id)
                    .unwrap_or(""),
                ..message_frame(message)
            })
            .collect(),
    });
    conn.enqueue(Bytes::from(ws::text_frame(&json)));
}
