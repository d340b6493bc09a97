//! Groups on a shard: cached member lists, membership changes, and fan-out.
//!
//! Owns the shard's `GroupCache` (member lists loaded from storage, trusted
//! for `group_cache_ms` or until a change is announced), the `group_*`
//! frames, and fanning one encoded frame out to many users: directly to
//! members homed here, one `DeliverMany` per other shard, one publish per
//! member subject for other nodes (once durable). A membership change is a
//! message in the group, recorded with every member it concerns as a
//! recipient, so every device sees changes in order with the messages.
//! Never delivers a stored message before its record is in the ring, and
//! never holds a `RefCell` borrow across an await.

use std::collections::{BTreeSet, HashMap};
use std::rc::Rc;

use bytes::Bytes;
use chat_backplane::Outbound;
use chat_protocol::codes::ErrorCode;
use chat_protocol::frames::{self, GroupChangeFrame};
use chat_protocol::records::{Event, GroupAction, MessageRecord};
use chat_protocol::store_wire::{Request, Response};
use chat_protocol::{ids, snowflake, social_frames, ws};

use super::connection::Conn;
use super::dedup::{self, PriorSend};
use super::router::{self, send_error, storage_error, OwnedSend};
use super::store_client::StoreError;
use super::Shard;
use crate::mesh::{ManyDelivery, Sender, ShardMessage};
use crate::metrics::bump;

/// Groups whose member lists a shard keeps; past it the cache starts over.
const GROUP_CACHE_MAX: usize = 16_384;

/// A group's members, sorted.
pub type Members = Rc<[Box<str>]>;

struct Cached {
    members: Members,
    loaded_ms: u64,
}

/// Member lists this shard loaded, by group.
#[derive(Default)]
pub struct GroupCache {
    entries: HashMap<Box<str>, Cached>,
}

impl GroupCache {
    fn get(&self, group: &str, now_ms: u64, ttl_ms: u64) -> Option<Members> {
        let cached = self.entries.get(group)?;
        (now_ms.saturating_sub(cached.loaded_ms) < ttl_ms).then(|| cached.members.clone())
    }

    fn put(&mut self, group: &str, members: Members, now_ms: u64) {
        if self.entries.len() >= GROUP_CACHE_MAX && !self.entries.contains_key(group) {
            self.entries.clear();
        }
        let loaded_ms = now_ms;
        self.entries
            .insert(group.into(), Cached { members, loaded_ms });
    }

    pub fn forget(&mut self, group: &str) {
        self.entries.remove(group);
    }

    pub fn clear(&mut self) {
        self.entries.clear();
    }
}

/// The members of `group` from the cache when it is fresh (and `fresh` is
/// not asked for), else from storage (which first commits every record
/// appended before the request: a change made on this node is seen).
/// An empty list: no such group.
pub async fn members(shard: &Rc<Shard>, group: &str, fresh: bool) -> Result<Members, StoreError> {
    if !fresh {
        if let Some(members) = cached(shard, group) {
            return Ok(members);
        }
    }
    let timeout = std::time::Duration::from_millis(shard.config.storage_timeout_ms);
    let response = shard
        .store
        .request(
            |req| Request::Members {
                req,
                group: group.to_owned(),
            },
            timeout,
        )
        .await?;
    let Response::Members { members, .. } = response else {
        return Err(StoreError::Unavailable);
    };
    let members: Members = members.into_iter().map(String::into_boxed_str).collect();
    shard
        .groups
        .borrow_mut()
        .put(group, members.clone(), shard.now_ms());
    Ok(members)
}

/// The cached members of `group`, if fresh.
pub fn cached(shard: &Shard, group: &str) -> Option<Members> {
    shard
        .groups
        .borrow()
        .get(group, shard.now_ms(), shard.config.group_cache_ms)
}

pub fn is_member(members: &[Box<str>], user: &str) -> bool {
    members
        .binary_search_by(|member| (**member).cmp(user))
        .is_ok()
}

/// Whether every shard (other than this one) that is home to one of
/// `users` has room for one more hand-off.
fn shards_have_room(shard: &Shard, users: &[Box<str>]) -> bool {
    let count = shard.mesh.shard_count();
    let mut checked = vec![false; count];
    checked[shard.id] = true;
    for user in users {
        let home = ids::home_shard(user, count);
        if !checked[home] {
            if !shard.mesh.has_room(Sender::Shard(shard.id), home) {
                return false;
            }
            checked[home] = true;
        }
    }
    true
}

/// Queues `frame` to every device of `users`: here directly (not to the
/// connection in slot `except`), one hand-off per other shard. Returns false
/// when some shard's queue was full (its users get it on their next sync).
pub fn fan_out(
    shard: &Shard,
    users: &[Box<str>],
    message_id: u64,
    frame: &Bytes,
    except: Option<usize>,
) -> bool {
    let count = shard.mesh.shard_count();
    let mut by_shard: Vec<Vec<Box<str>>> = vec![Vec::new(); count];
    {
        let table = shard.users.borrow();
        for user in users {
            let home = ids::home_shard(user, count);
            if home == shard.id {
                table.deliver(user, message_id, frame, except);
            } else {
                by_shard[home].push(user.clone());
            }
        }
    }
    let mut all_handed = true;
    for (home, to_users) in by_shard.into_iter().enumerate() {
        if to_users.is_empty() {
            continue;
        }
        let delivery = ShardMessage::DeliverMany(Box::new(ManyDelivery {
            to_users,
            message_id,
            frame: frame.clone(),
        }));
        all_handed &= shard
            .mesh
            .send(Sender::Shard(shard.id), home, delivery)
            .is_ok();
        bump(&shard.metrics().messages_routed_cross_shard, 1);
    }
    all_handed
}

/// A send to a group: answered at once when the member list is cached and
/// the id needs no storage look-up; otherwise the connection's frames wait
/// while storage is asked (so their order is kept).
pub fn on_send(shard: &Rc<Shard>, conn: &Rc<Conn>, send: OwnedSend) {
    let known = router::known_send(shard, conn, &send.client_msg_id);
    if known || !conn.warm_truncated() {
        if let Some(members) = cached(shard, &send.to) {
            accept_send(shard, conn, send, &members);
            return;
        }
    }
    conn.pause();
    monoio::spawn(load_then_send(shard.clone(), conn.clone(), send, known));
}

async fn load_then_send(shard: Rc<Shard>, conn: Rc<Conn>, send: OwnedSend, known: bool) {
    let conversation = ids::group_conversation_id(&send.to);
    let looked_up = known
        || !conn.warm_truncated()
        || router::look_up_prior(&shard, &conn, &send.client_msg_id, &conversation).await;
    match members(&shard, &send.to, false).await {
        Ok(members) if looked_up => accept_send(&shard, &conn, send, &members),
        Ok(_) | Err(StoreError::Unavailable) => {
            router::not_answered(&shard, &conn, &send.client_msg_id);
        }
        Err(error) => storage_error(&shard, &conn, "send", error),
    }
    conn.resume();
}

/// Stores a group message once, with every member's inbox as a recipient,
/// and fans it out.
fn accept_send(shard: &Shard, conn: &Rc<Conn>, send: OwnedSend, members: &Members) {
    let now_unix_ms = crate::clock::unix_ms();
    if router::replay_if_known(shard, conn, &send.client_msg_id, now_unix_ms) {
        return;
    }
    if !is_member(members, &conn.user_id) {
        let message = "not a member of this group";
        send_error(
            shard,
            conn,
            Some(&send.client_msg_id),
            ErrorCode::Forbidden,
            message,
            None,
        );
        return;
    }
    let message_id = shard.snowflake.borrow_mut().next_id(now_unix_ms);
    let recipients: Vec<&str> = members.iter().map(|m| &**m).collect();
    let conversation = ids::group_conversation_id(&send.to);
    let record = MessageRecord {
        message_id,
        ts: snowflake::decode(message_id).unix_ms,
        conversation: &conversation,
        from: &conn.user_id,
        from_device: &conn.device_id,
        to: &send.to,
        client_msg_id: &send.client_msg_id,
        body: &send.body,
        media: send.media.clone(),
        event: None,
        recipients,
        bodies: Vec::new(),
    };
    if store_and_fan_out(shard, conn, &record, members, None).is_some() {
        bump(&shard.metrics().group_messages, 1);
    }
}

/// Appends `record` (whose recipients are `members`), delivers it to every
/// member's devices here and on other shards, publishes it for other nodes
/// once durable, and answers `sent` once durable. Returns the ring position
/// that makes it durable, or `None` (with the client told why) when a queue
/// or the ring had no room.
fn store_and_fan_out(
    shard: &Shard,
    conn: &Rc<Conn>,
    record: &MessageRecord<'_>,
    members: &[Box<str>],
    notice: Option<Box<Outbound>>,
) -> Option<u64> {
    // Checked before the record is stored: after, hand-offs must not fail.
    if !shards_have_room(shard, members) {
        let message = "a member's shard queue is full; retry this send";
        router::overloaded(shard, conn, record.client_msg_id, message);
        return None;
    }
    let end = match shard.durability.append(&record.encode()) {
        Ok(end) => end,
        Err(_) => {
            bump(&shard.metrics().ring_full, 1);
            let message = "storage is behind; retry this send";
            router::overloaded(shard, conn, record.client_msg_id, message);
            return None;
        }
    };
    let json = frames::encode_message(&super::sync::message_frame(record));
    let frame = Bytes::from(ws::text_frame(&json));
    let handed = fan_out(shard, members, record.message_id, &frame, Some(conn.slot));
    debug_assert!(handed, "room was checked above");
    let publish = shard.backplane.is_some().then(|| {
        Box::new(Outbound::Publish {
            users: members.to_vec(),
            message_id: record.message_id,
            json: Bytes::from(json),
        })
    });
    let key = dedup::key(&conn.user_id, &conn.device_id, record.client_msg_id);
    shard.idempotency.borrow_mut().insert(
        key,
        PriorSend {
            message_id: record.message_id,
            conversation: record.conversation.to_owned(),
            end,
        },
        crate::clock::unix_ms(),
    );
    // A change notice goes out before the change itself: a node that hears
    // of the change from a member has already dropped its cached list.
    if let (Some(notice), true) = (notice, shard.backplane.is_some()) {
        shard
            .durability
            .publish_when_durable(end, notice, |notice| shard.publish(*notice));
    }
    let sent = router::sent_frame(
        record.client_msg_id,
        record.message_id,
        record.conversation,
        record.ts,
    );
    shard.durability.send_when_durable(
        end,
        conn,
        Bytes::from(ws::text_frame(&sent)),
        publish,
        |publish| shard.publish(*publish),
    );
    Some(end)
}

/// A membership change, owned: it waits for storage.
pub struct OwnedChange {
    client_msg_id: String,
    group: Option<String>,
    action: GroupAction,
    members: Vec<String>,
}

impl From<GroupChangeFrame<'_>> for OwnedChange {
    fn from(change: GroupChangeFrame<'_>) -> Self {
        Self {
            client_msg_id: change.client_msg_id.into_owned(),
            group: change.group.map(|g| g.into_owned()),
            action: change.action,
            members: change.members.into_iter().map(|m| m.into_owned()).collect(),
        }
    }
}

/// `group_create`, `group_add`, `group_remove`, `group_leave`: always
/// against the member list in storage (never a cached one), with the
/// connection's frames waiting meanwhile.
pub fn on_change(shard: &Rc<Shard>, conn: &Rc<Conn>, change: OwnedChange) {
    let now_unix_ms = crate::clock::unix_ms();
    if router::replay_if_known(shard, conn, &change.client_msg_id, now_unix_ms) {
        return;
    }
    conn.pause();
    monoio::spawn(change_group(shard.clone(), conn.clone(), change));
}

async fn change_group(shard: Rc<Shard>, conn: Rc<Conn>, change: OwnedChange) {
    let fail = |code: ErrorCode, message: &str| {
        let retry = (code == ErrorCode::Unavailable).then_some(1_000);
        send_error(
            &shard,
            &conn,
            Some(&change.client_msg_id),
            code,
            message,
            retry,
        );
    };
    // A retry of a change older than the warm-up is found in storage.
    if conn.warm_truncated()
        && !router::known_send(&shard, &conn, &change.client_msg_id)
        && !router::look_up_prior(&shard, &conn, &change.client_msg_id, "").await
    {
        fail(ErrorCode::Unavailable, "storage did not answer; retry");
        conn.resume();
        return;
    }
    let current = match &change.group {
        None => Ok(Members::from(Vec::new())),
        Some(group) => members(&shard, group, true).await,
    };
    match current {
        Ok(current) => apply_change(&shard, &conn, &change, &current),
        Err(StoreError::Unavailable) => {
            fail(ErrorCode::Unavailable, "storage did not answer; retry")
        }
        Err(error) => storage_error(&shard, &conn, "group change", error),
    }
    conn.resume();
}

fn apply_change(shard: &Shard, conn: &Rc<Conn>, change: &OwnedChange, current: &Members) {
    let fail = |code: ErrorCode, message: String| {
        send_error(
            shard,
            conn,
            Some(&change.client_msg_id),
            code,
            &message,
            None,
        );
    };
    let now_unix_ms = crate::clock::unix_ms();
    if router::replay_if_known(shard, conn, &change.client_msg_id, now_unix_ms) {
        return;
    }
    let user: &str = &conn.user_id;
    if change.action != GroupAction::Create && !is_member(current, user) {
        return fail(ErrorCode::Forbidden, "not a member of this group".into());
    }
    let listed: BTreeSet<&str> = change.members.iter().map(String::as_str).collect();
    let now: BTreeSet<&str> = current.iter().map(|m| &**m).collect();
    // Who the event names, and who the group has after it.
    let (named, after): (Vec<&str>, BTreeSet<&str>) = match change.action {
        GroupAction::Create => {
            let mut all = listed.clone();
            all.insert(user);
            (all.iter().copied().collect(), all)
        }
        GroupAction::Add => {
            let added: Vec<&str> = listed.difference(&now).copied().collect();
            if added.is_empty() {
                return fail(
                    ErrorCode::InvalidField,
                    "every listed user is already a member".into(),
                );
            }
            (added, now.union(&listed).copied().collect())
        }
        GroupAction::Remove => {
            let removed: Vec<&str> = listed.intersection(&now).copied().collect();
            if removed.is_empty() {
                return fail(ErrorCode::InvalidField, "no listed user is a member".into());
            }
            (removed, now.difference(&listed).copied().collect())
        }
        GroupAction::Leave => (
            vec![user],
            now.iter().copied().filter(|m| *m != user).collect(),
        ),
    };
    let max = shard.config.group_members_max;
    if after.len() > max {
        let message = format!("a group has at most {max} members");
        return fail(ErrorCode::GroupFull, message);
    }
    let message_id = shard.snowflake.borrow_mut().next_id(now_unix_ms);
    let group = match &change.group {
        Some(group) => group.clone(),
        None => ids::new_group_id(message_id),
    };
    // Everyone concerned hears of it: members before and after.
    let told: Vec<Box<str>> = now.union(&after).map(|m| Box::from(*m)).collect();
    let conversation = ids::group_conversation_id(&group);
    let record = MessageRecord {
        message_id,
        ts: snowflake::decode(message_id).unix_ms,
        conversation: &conversation,
        from: user,
        from_device: &conn.device_id,
        to: &group,
        client_msg_id: &change.client_msg_id,
        body: "",
        media: None,
        event: Some(Event::Group {
            action: change.action,
            members: named,
        }),
        recipients: told.iter().map(|m| &**m).collect(),
        bodies: Vec::new(),
    };
    let notice = Box::new(Outbound::GroupChanged {
        group: group.as_str().into(),
    });
    if store_and_fan_out(shard, conn, &record, &told, Some(notice)).is_none() {
        return;
    }
    bump(&shard.metrics().group_changes, 1);
    // This shard knows the new list; the others (and other nodes, once the
    // change is durable) forget theirs and reload from storage.
    let after: Members = after.into_iter().map(Box::from).collect();
    shard.groups.borrow_mut().put(&group, after, shard.now_ms());
    for other in (0..shard.mesh.shard_count()).filter(|s| *s != shard.id) {
        let changed = ShardMessage::GroupChanged(group.as_str().into());
        let _ = shard.mesh.send(Sender::Shard(shard.id), other, changed);
    }
}

/// `group_members`: the list, for members only.
pub async fn list_members(shard: Rc<Shard>, conn: Rc<Conn>, group: String) {
    match members(&shard, &group, false).await {
        Ok(members) if is_member(&members, &conn.user_id) => {
            let names: Vec<&str> = members.iter().map(|m| &**m).collect();
            let json = social_frames::encode_group_members(&group, &names);
            conn.enqueue(Bytes::from(ws::text_frame(&json)));
        }
        Ok(_) => {
            let message = "not a member of this group";
            send_error(&shard, &conn, None, ErrorCode::Forbidden, message, None);
        }
        Err(error) => storage_error(&shard, &conn, "group_members", error),
    }
}

/// `typing` in a group: to every other member's devices, ephemeral (dropped
/// where a queue is full, never stored), members only.
pub fn on_typing(shard: &Rc<Shard>, conn: &Rc<Conn>, group: String) {
    match cached(shard, &group) {
        Some(members) => typing_to_members(shard, conn, &group, &members),
        None => {
            let (shard, conn) = (shard.clone(), conn.clone());
            monoio::spawn(async move {
                match members(&shard, &group, false).await {
                    Ok(members) => typing_to_members(&shard, &conn, &group, &members),
                    Err(error) => storage_error(&shard, &conn, "typing", error),
                }
            });
        }
    }
}

fn typing_to_members(shard: &Shard, conn: &Conn, group: &str, members: &Members) {
    if !is_member(members, &conn.user_id) {
        let message = "not a member of this group";
        send_error(shard, conn, None, ErrorCode::Forbidden, message, None);
        return;
    }
    let conversation = ids::group_conversation_id(group);
    let json = frames::encode_typing(&frames::TypingFrame {
        kind: "typing",
        conversation: &conversation,
        from: &conn.user_id,
        from_device: &conn.device_id,
        expires_ms: shard.config.typing_expires_ms,
    });
    let others: Vec<Box<str>> = members
        .iter()
        .filter(|m| ***m != *conn.user_id)
        .cloned()
        .collect();
    let frame = Bytes::from(ws::text_frame(&json));
    let _ = fan_out(shard, &others, super::connection::EPHEMERAL, &frame, None);
    if shard.backplane.is_some() {
        shard.publish(Outbound::Publish {
            users: others,
            message_id: super::connection::EPHEMERAL,
            json: Bytes::from(json),
        });
    }
    bump(&shard.metrics().typing, 1);
}
