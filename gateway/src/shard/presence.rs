//! Presence without a firehose: who is online is written debounced, and a
//! client asks for the users it wants (`presence`), nothing is pushed.
//!
//! Owns the shard's `PresenceLog`: users homed here who came online are
//! written within a second (once, however often they reconnect within the
//! interval; a flag in their user-table entry says so); every
//! `presence_interval_ms` all online users are refreshed and those who left
//! are written offline with the time they left. Storage answers queries
//! only about users the asker shares a conversation with. Never writes on
//! every connect or disconnect, and never reports a stranger's presence.

use std::collections::HashMap;
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
use super::users::UserTable;
use super::Shard;
use crate::metrics::bump;

/// How often users who came online are written.
const ONLINE_TICK: Duration = Duration::from_secs(1);
/// A user stays "online" this many intervals after its node last said so
/// (a node that died stops refreshing).
const STALE_AFTER_INTERVALS: f64 = 2.5;

/// Users who left and are yet to be written offline. (Whether an online
/// user was written is a flag in its user-table entry: no per-user set here.)
#[derive(Default)]
pub struct PresenceLog {
    /// Users who came online and were not written since the last tick (a
    /// tick with none scans nothing).
    fresh: usize,
    /// Left (last device gone): when, and whether it had been written online.
    gone: HashMap<Rc<str>, (u64, bool)>,
}

impl PresenceLog {
    /// The user's first device here connected. Back within the interval
    /// after leaving: nothing new to write (the debounce).
    pub fn came_online(&mut self, user: &Rc<str>, users: &mut UserTable) {
        let written = match self.gone.remove(user) {
            Some((_, written)) => written,
            None => false,
        };
        users.set_presence_written(user, written);
        if !written {
            self.fresh += 1;
        }
    }

    /// The user's last device here went away.
    pub fn went_offline(&mut self, user: &Rc<str>, now_unix_ms: u64, written: bool) {
        self.gone.insert(user.clone(), (now_unix_ms, written));
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

/// Appends what is due: users not yet written online (every tick), and on
/// a `full` tick every online user and every departure. Records of at most
/// `PRESENCE_USERS_MAX` users, built as it goes (no list of all users).
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
            if record.entries.len() == PRESENCE_USERS_MAX {
                flush(&mut record);
            }
        }
    }
    flush(&mut record);
    // Each user's id is copied into the record's bytes, then released.
    let mut online: Vec<Rc<str>> = Vec::with_capacity(PRESENCE_USERS_MAX);
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
        if online.len() == PRESENCE_USERS_MAX {
            write_online(&mut online);
        }
    });
    write_online(&mut online);
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
