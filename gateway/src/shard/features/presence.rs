//! Presence without a firehose: who is online is written debounced, and a
//! client asks for the users it wants (`presence`), nothing is pushed.
//!
//! Owns writing the shard's `PresenceLog` out: users homed here who came online are
//! written within a second (once, however often they reconnect within the
//! interval; a flag in their user-table entry says so); every
//! `presence_interval_ms` all online users are refreshed and those who left
//! are written offline with the time they left. Storage answers queries
//! only about users the asker shares a conversation with. Never writes on
//! every connect or disconnect, never reports a stranger's presence, and
//! never imports another feature.

use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use chat_protocol::ids;
use chat_protocol::records::{PresenceEntry, PresenceRecord, PRESENCE_RECORD_USERS_MAX};
use chat_protocol::social_frames::{self, PresenceJson};
use chat_protocol::store_wire::{Request, Response};

use crate::limits::{PRESENCE_ONLINE_TICK_MS, PRESENCE_STALE_AFTER_INTERVALS};
use crate::metrics::bump;
use crate::shard::send::reply;
use crate::shard::state::conn::Conn;
use crate::shard::state::store_client::StoreError;
use crate::shard::state::Shard;

/// Writes presence for the shard's life: fresh users every second, a full
/// refresh and departures every `presence_interval_ms`.
pub async fn write_loop(shard: Rc<Shard>) {
    let interval = Duration::from_millis(shard.config.presence_interval_ms);
    let tick = Duration::from_millis(PRESENCE_ONLINE_TICK_MS).min(interval);
    let mut since_full = Duration::ZERO;
    loop {
        monoio::time::sleep(tick).await;
        since_full += tick;
        let full = since_full >= interval;
        if full {
            since_full = Duration::ZERO;
        }
        write(&shard, full);
    }
}

/// Appends what is due: users not yet written online (every tick), and on
/// a `full` tick every online user and every departure. Records of at most
/// `PRESENCE_RECORD_USERS_MAX` users, built as it goes (no list of all users).
fn write(shard: &Shard, full: bool) {
    let now = crate::clock::unix_ms();
    let mut users = shard.users.borrow_mut();
    let node = shard.config.node_id;
    let mut record = PresenceRecord {
        node,
        entries: Vec::new(),
    };
    let flush = |record: &mut PresenceRecord<'_>| {
        if record.entries.is_empty() {
            return;
        }
        match shard.durability.append(&record.encode()) {
            Ok(_) => bump(
                &shard.metrics().presence_written,
                record.entries.len() as u64,
            ),
            // Written again at the next full refresh.
            Err(_) => bump(&shard.metrics().ring_full, 1),
        }
        record.entries.clear();
    };
    let (gone, fresh) = {
        let mut log = shard.presence.borrow_mut();
        let gone = if full {
            std::mem::take(&mut log.gone)
        } else {
            HashMap::new()
        };
        (gone, std::mem::take(&mut log.fresh))
    };
    if !full && fresh == 0 {
        return; // an idle shard does no work per user
    }
    for (user, (left_ms, _)) in &gone {
        if !users.is_online(user) {
            record.entries.push(PresenceEntry {
                user,
                online: false,
                last_seen_ms: *left_ms,
            });
            if record.entries.len() == PRESENCE_RECORD_USERS_MAX {
                flush(&mut record);
            }
        }
    }
    flush(&mut record);
    // Each user's id is copied into the record's bytes, then released.
    let mut online: Vec<Rc<str>> = Vec::with_capacity(PRESENCE_RECORD_USERS_MAX);
    let write_online = |online: &mut Vec<Rc<str>>| {
        let mut record = PresenceRecord {
            node,
            entries: online
                .iter()
                .map(|user| PresenceEntry {
                    user,
                    online: true,
                    last_seen_ms: now,
                })
                .collect(),
        };
        flush(&mut record);
        online.clear();
    };
    users.write_presence(full, |user| {
        online.push(user.clone());
        if online.len() == PRESENCE_RECORD_USERS_MAX {
            write_online(&mut online);
        }
    });
    write_online(&mut online);
}

/// `presence`: online or last seen for each of `users`, all of whom the
/// asker must share a conversation with (otherwise `forbidden`, naming them,
/// and nothing about anyone).
pub fn on_query(shard: &Rc<Shard>, conn: &Rc<Conn>, users: Vec<std::borrow::Cow<'_, str>>) {
    let message = "too many presence requests by this user";
    let allowance = crate::shard::state::users::Allowance::Presence;
    if reply::take_allowance(shard, conn, allowance, None, message, false) {
        let users = users.into_iter().map(|user| user.into_owned()).collect();
        monoio::spawn(query(shard.clone(), conn.clone(), users));
    }
}

async fn query(shard: Rc<Shard>, conn: Rc<Conn>, users: Vec<String>) {
    let request = |req| Request::Presence {
        req,
        asker: conn.user_id.to_string(),
        users,
    };
    let response = shard.store.request(request, shard.storage_timeout()).await;
    let answers = match response {
        Ok(Response::Presence { users, .. }) => users,
        Ok(_) => return reply::storage_error(&shard, &conn, "presence", StoreError::Unavailable),
        Err(error) => return reply::storage_error(&shard, &conn, "presence", error),
    };
    let strangers: Vec<&str> = answers
        .iter()
        .filter(|a| !a.shared)
        .map(|a| a.user.as_str())
        .collect();
    if !strangers.is_empty() {
        let message = format!("you share no conversation with: {}", strangers.join(", "));
        return reply::forbidden(&shard, &conn, None, &message);
    }
    let now = crate::clock::unix_ms();
    let fresh_ms =
        (shard.config.presence_interval_ms as f64 * PRESENCE_STALE_AFTER_INTERVALS) as u64;
    let shards = shard.mesh.shard_count();
    let json: Vec<PresenceJson<'_>> = answers
        .iter()
        .map(|answer| {
            let here = ids::home_shard(&answer.user, shards) == shard.id
                && shard.users.borrow().is_online(&answer.user);
            let online =
                here || (answer.online && now.saturating_sub(answer.updated_ms) < fresh_ms);
            PresenceJson {
                user: &answer.user,
                online,
                last_seen: if online { None } else { answer.last_seen_ms },
            }
        })
        .collect();
    bump(&shard.metrics().presence_queries, 1);
    reply::send_json(&conn, &social_frames::encode_presence(&json));
}
