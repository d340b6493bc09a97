//! Presence without a firehose: who is online is written debounced, and a
//! client asks for the users it wants (`presence`), nothing is pushed.
//!
//! Owns the shard's `PresenceLog`: users homed here who came online are
//! written within a second (once, however often they reconnect); every
//! `presence_interval_ms` all online users are refreshed and those who left
//! are written offline with the time they left. Storage answers queries
//! only about users the asker shares a conversation with. Never writes on
//! every connect or disconnect, and never reports a stranger's presence.

use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use chat_protocol::codes::ErrorCode;
use chat_protocol::records::{PresenceEntry, PresenceRecord, PRESENCE_USERS_MAX};
use chat_protocol::social_frames::{self, PresenceJson};
use chat_protocol::store_wire::{Request, Response};
use chat_protocol::{ids, ws};

use super::connection::Conn;
use super::router::{send_error, storage_error};
use super::store_client::StoreError;
use super::Shard;
use crate::metrics::bump;

/// How often users who came online are written.
const ONLINE_TICK: Duration = Duration::from_secs(1);
/// A user stays "online" this many intervals after its node last said so
/// (a node that died stops refreshing).
const STALE_AFTER_INTERVALS: f64 = 2.5;

/// What this shard has written about its users, and what it has yet to.
#[derive(Default)]
pub struct PresenceLog {
    /// Users whose latest written state is online.
    written_online: HashSet<Rc<str>>,
    /// Came online and not yet written.
    fresh: Vec<Rc<str>>,
    /// Left (last device gone) at unix ms, not yet written.
    gone: HashMap<Rc<str>, u64>,
}

impl PresenceLog {
    /// The user's first device here connected.
    pub fn came_online(&mut self, user: &Rc<str>) {
        self.gone.remove(user);
        if !self.written_online.contains(user) {
            self.fresh.push(user.clone());
        }
    }

    /// The user's last device here went away.
    pub fn went_offline(&mut self, user: &Rc<str>, now_unix_ms: u64) {
        self.gone.insert(user.clone(), now_unix_ms);
    }
}

/// Writes presence for the shard's life: fresh users every second, a full
/// refresh and departures every `presence_interval_ms`.
pub async fn write_loop(shard: Rc<Shard>) {
    let interval = Duration::from_millis(shard.config.presence_interval_ms);
    let tick = ONLINE_TICK.min(interval);
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

fn write(shard: &Shard, full: bool) {
    let now = crate::clock::unix_ms();
    let mut entries: Vec<(Rc<str>, bool, u64)> = Vec::new();
    {
        let users = shard.users.borrow();
        let mut log = shard.presence.borrow_mut();
        let fresh = std::mem::take(&mut log.fresh);
        if full {
            let gone = std::mem::take(&mut log.gone);
            for (user, left_ms) in gone {
                if !users.is_online(&user) {
                    log.written_online.remove(&user);
                    entries.push((user, false, left_ms));
                }
            }
            users.for_each_user(|user| entries.push((user.clone(), true, now)));
            for (user, ..) in entries.iter().filter(|e| e.1) {
                log.written_online.insert(user.clone());
            }
        } else {
            for user in fresh {
                if users.is_online(&user) && log.written_online.insert(user.clone()) {
                    entries.push((user, true, now));
                }
            }
        }
    }
    for chunk in entries.chunks(PRESENCE_USERS_MAX) {
        let record = PresenceRecord {
            entries: chunk
                .iter()
                .map(|(user, online, last_seen_ms)| PresenceEntry {
                    user,
                    online: *online,
                    last_seen_ms: *last_seen_ms,
                })
                .collect(),
        };
        match shard.durability.append(&record.encode()) {
            Ok(_) => bump(&shard.metrics().presence_written, chunk.len() as u64),
            // Written again at the next full refresh.
            Err(_) => bump(&shard.metrics().ring_full, 1),
        }
    }
}

/// `presence`: online or last seen for each of `users`, all of whom the
/// asker must share a conversation with (otherwise `forbidden`, naming them,
/// and nothing about anyone).
pub async fn query(shard: Rc<Shard>, conn: Rc<Conn>, users: Vec<String>) {
    let timeout = Duration::from_millis(shard.config.storage_timeout_ms);
    let response = shard
        .store
        .request(
            |req| Request::Presence {
                req,
                asker: conn.user_id.to_string(),
                users: users.clone(),
            },
            timeout,
        )
        .await;
    let answers = match response {
        Ok(Response::Presence { users, .. }) => users,
        Ok(_) => return storage_error(&shard, &conn, "presence", StoreError::Unavailable),
        Err(error) => return storage_error(&shard, &conn, "presence", error),
    };
    let strangers: Vec<&str> = answers
        .iter()
        .filter(|a| !a.shared)
        .map(|a| a.user.as_str())
        .collect();
    if !strangers.is_empty() {
        let message = format!("you share no conversation with: {}", strangers.join(", "));
        send_error(&shard, &conn, None, ErrorCode::Forbidden, &message, None);
        return;
    }
    let now = crate::clock::unix_ms();
    let fresh_ms = (shard.config.presence_interval_ms as f64 * STALE_AFTER_INTERVALS) as u64;
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
    let frame = social_frames::encode_presence(&json);
    conn.enqueue(Bytes::from(ws::text_frame(&frame)));
}
