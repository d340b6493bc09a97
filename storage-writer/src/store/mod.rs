//! What is stored and how it is read back, once, over any backend's tables.
//!
//! Owns the storage semantics: a message is kept in its conversation,
//! indexed in the inbox of its recipient and of its sender's user (so the
//! sender's other devices sync it), or of each recipient it lists (a group
//! message, receipts), and remembered under its idempotency key; a group
//! membership change also updates the member tables; presence records
//! overwrite each user's latest state;
//! an acknowledgement advances the device's cursor through every entry of that
//! conversation up to the message (cumulative per conversation), and through
//! the device's own sends, which it never receives. Backends
//! (`embedded`, `postgres`, `scylla`) only implement `Tables`, the primitive
//! reads and writes, so these rules exist in one place.
//!
//! Must never: apply a record twice (the writer re-reads uncommitted records
//! after a restart, so for those every step checks first and the message row
//! is written last, as the marker that the rest is done), or leave a gap in a
//! user's inbox sequence (cursors fold contiguous runs).
//!
//! Also the seam between the writer's threads and a store: `Backend` opens a
//! `BatchWriter` for the commit thread (one batch, one transaction or one
//! fsync) and `Tables` readers for the read-path threads.

pub mod cursor;
pub mod embedded;
pub mod migrations;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "scylla")]
pub mod scylla;

use anyhow::Result;
use chat_protocol::keys::Bundle;
use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap, HashSet};

use chat_protocol::ids;
use chat_protocol::records::{AckRecord, Event, GroupAction, MessageRecord, PresenceEntry, Record};
use chat_protocol::snowflake;
use chat_protocol::store_wire::{MemberRole, PresenceAnswer, RecentSend, SyncEntry, SyncFrom};

pub use self::cursor::Cursor;

/// PostgreSQL: the window of one partition of `messages` and `inbox` (a day).
pub const POSTGRES_PARTITION_MS_DEFAULT: u64 = 24 * 60 * 60 * 1000;

/// Most push targets read for one user (a user has at most 16 devices
/// connected; targets of devices not seen for long stay until pruned).
pub const PUSH_TARGETS_PER_USER_MAX: usize = 64;

/// Now, for the time a row was written (not for ordering: that is ids).
pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

#[cfg(test)]
mod tests;

/// The commit thread's handle: runs one batch's work so that it all becomes
/// durable together, or fails as a whole (the caller retries it).
pub trait BatchWriter: Send {
    fn write_batch(&mut self, work: &mut dyn FnMut(&mut dyn Tables) -> Result<()>) -> Result<()>;

    /// Whether, after `error`, this process can never commit again and
    /// must start over (a store that refuses every write once one failed to
    /// reach its disk). Retrying is for everything else.
    fn must_restart(&self, _error: &anyhow::Error) -> bool {
        false
    }
}

/// A store the writer can open handles on, from any thread.
pub trait Backend: Send + Sync {
    fn name(&self) -> &'static str;
    fn writer(&self) -> Result<Box<dyn BatchWriter>>;
    fn reader(&self) -> Result<Box<dyn Tables + Send>>;
}

/// Inbox entries one acknowledgement scans to find earlier ones of its conversation.
pub const ACK_SCAN_MAX: usize = 4096;
/// Inbox entries read from a backend at once while building a sync page.
const SCAN_CHUNK: usize = 256;
/// Most members read for one group, and groups read for one user: bounds
/// every membership read (a group's size is bounded far below it).
pub const MEMBERSHIP_READ_MAX: usize = 8192;

/// Nodes whose presence rows are read for one user.
pub const PRESENCE_NODES_MAX: usize = 64;

/// What one `expire_messages` call removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Expired {
    /// Message rows and inbox entries removed (for a dropped partition, the
    /// database's estimate).
    pub rows: u64,
    /// Bytes given back to the file system at once (a dropped partition;
    /// an LSM store reclaims later, in compaction, and says 0).
    pub bytes: u64,
    /// Whether more old rows may be left (call again).
    pub more: bool,
}

/// The revocation scope (in place of a device id, which can never be
/// this: `*` is not in the id grammar) that records an account's deletion.
pub const ACCOUNT_DELETED_SCOPE: &str = "*deleted*";

/// What one `delete_account` removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AccountRemoved {
    /// Rows removed, over every table.
    pub rows: u64,
    /// The groups the user was a member of (their cached member lists are
    /// stale now), sorted.
    pub groups: Vec<String>,
}

/// The first message id retention still keeps at `now_ms`: everything made
/// before `now_ms - retention` is gone for history and sync, whether or not
/// the cleanup has removed its rows yet (so a page never half-shows a
/// range being deleted). `None` keeps everything.
pub fn retention_floor(now_ms: u64, retention: Option<std::time::Duration>) -> u64 {
    match retention {
        Some(retention) => {
            snowflake::first_id_at(now_ms.saturating_sub(retention.as_millis() as u64))
        }
        None => 0,
    }
}

/// A node's latest presence entry for a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Presence {
    pub online: bool,
    pub last_seen_ms: u64,
}

/// A device's public keys, as uploaded.
pub struct DeviceKeys<'a> {
    pub user: &'a str,
    pub device: &'a str,
    pub identity_key: &'a str,
    pub signed_prekey: &'a str,
    pub signed_prekey_signature: &'a str,
    pub one_time_prekeys: &'a [String],
}

/// One entry of a user's inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxEntry {
    pub seq: u64,
    pub message_id: u64,
    pub conversation: String,
    /// The device that sent it, when the user sent it (that device does not sync it).
    pub origin_device: String,
}

/// The primitive reads and writes a backend provides. Writes within one
/// `apply` call are visible to its later reads.
pub trait Tables {
    fn message(&mut self, conversation: &str, message_id: u64) -> Result<Option<Vec<u8>>>;
    fn put_message(&mut self, conversation: &str, message_id: u64, record: &[u8]) -> Result<()>;
    /// Overwrites a stored message's record (its tombstone, after a delete
    /// for everyone); nothing when it is not stored.
    fn replace_message(&mut self, conversation: &str, message_id: u64, record: &[u8])
        -> Result<()>;
    /// Several messages at once, each `None` when absent. A backend where a
    /// round trip per row is the cost (PostgreSQL) reads them in one.
    fn messages(&mut self, keys: &[(&str, u64)]) -> Result<Vec<Option<Vec<u8>>>> {
        keys.iter()
            .map(|(conversation, message_id)| self.message(conversation, *message_id))
            .collect()
    }
    /// Newest first, ids below `before` (all when `None`).
    fn history(
        &mut self,
        conversation: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Vec<u8>>>;

    /// Remembers a send under its idempotency key unless one is there already.
    fn put_send_if_absent(
        &mut self,
        user: &str,
        device: &str,
        client_msg_id: &str,
        message_id: u64,
        conversation: &str,
    ) -> Result<()>;
    /// The message id first stored under this idempotency key.
    fn send_of(&mut self, user: &str, device: &str, client_msg_id: &str) -> Result<Option<u64>>;
    /// The device's sends with ids at or above `since_message_id`, newest first.
    fn recent_sends(
        &mut self,
        user: &str,
        device: &str,
        since_message_id: u64,
        limit: usize,
    ) -> Result<Vec<RecentSend>>;

    /// Appends to `user`'s inbox at the next sequence (gap-free per user).
    fn append_inbox(
        &mut self,
        user: &str,
        message_id: u64,
        conversation: &str,
        origin_device: &str,
    ) -> Result<u64>;
    /// The inbox entry of `message_id` in `user`'s inbox: (sequence, conversation).
    fn inbox_entry_of(&mut self, user: &str, message_id: u64) -> Result<Option<(u64, String)>>;
    /// Entries with sequence above `after`, ascending, at most `limit`.
    fn inbox_after(&mut self, user: &str, after: u64, limit: usize) -> Result<Vec<InboxEntry>>;
    /// The highest sequence ever given in `user`'s inbox (0: none), also
    /// after retention removed every entry: sequences are never reused.
    fn inbox_head(&mut self, user: &str) -> Result<u64>;
    /// Whether a sequence missing below a present one can only have been
    /// removed (true where a sequence is reserved and its entry written in
    /// one commit). ScyllaDB claims a sequence before it writes the entry,
    /// so a reader can see the gap while the entry is on its way: cursors
    /// never fold over gaps there.
    fn gaps_are_removals(&self) -> bool {
        true
    }

    fn cursor(&mut self, user: &str, device: &str) -> Result<Cursor>;
    fn put_cursor(&mut self, user: &str, device: &str, cursor: &Cursor) -> Result<()>;

    /// Stores a device's public keys: its identity key and signed prekey are
    /// replaced, its one-time prekeys added (refused past
    /// `STORED_PREKEYS_MAX`). Durable before it returns. Returns how many
    /// one-time prekeys the device now has.
    fn put_device_keys(&mut self, _upload: &DeviceKeys<'_>) -> Result<u32> {
        anyhow::bail!("this handle does not serve the key directory")
    }

    /// One bundle per device of `user` that uploaded keys, each taking one
    /// one-time prekey **atomically** (never handed out twice, also under
    /// concurrent fetches from several nodes), with the count left.
    fn take_bundles(&mut self, _user: &str) -> Result<Vec<(Bundle, u32)>> {
        anyhow::bail!("this handle does not serve the key directory")
    }

    /// The devices of `user` that uploaded keys, sorted.
    fn devices_of(&mut self, _user: &str) -> Result<Vec<String>> {
        anyhow::bail!("this handle does not serve the key directory")
    }

    /// Revokes `user`'s `device` (all of the user's devices for `None`) as
    /// of `at_ms` (a later revocation of the same scope replaces an earlier
    /// one), and removes the revoked devices' keys and one-time prekeys from
    /// the key directory. Durable before it returns. Returns how many
    /// devices left the directory.
    fn revoke(&mut self, _user: &str, _device: Option<&str>, _at_ms: u64) -> Result<u32> {
        anyhow::bail!("this handle does not serve revocations")
    }

    /// The latest revocation that covers `user`'s `device` (its own, or all
    /// the user's devices), in unix ms.
    fn revoked_at(&mut self, _user: &str, _device: &str) -> Result<Option<u64>> {
        anyhow::bail!("this handle does not serve revocations")
    }

    /// Removes every row of `user` (their devices' keys, prekeys, push
    /// targets, cursors, idempotency keys, inbox and its head, presence,
    /// group memberships and per-device revocations) except the revocation
    /// of all their devices, which the caller stored first and which keeps
    /// tokens issued before the deletion refused, then records that the
    /// account was deleted at `at_ms` (a revocation row of scope
    /// `ACCOUNT_DELETED_SCOPE`; a later deletion moves it). Messages they
    /// sent stay in their conversations (`docs/design/storage-lifecycle.md`).
    /// Durable before it returns; running it again removes nothing more.
    fn delete_account(&mut self, _user: &str, _at_ms: u64) -> Result<AccountRemoved> {
        anyhow::bail!("this handle does not delete accounts")
    }

    /// Notes that `user`'s `device` was seen (it connected or left) at
    /// `at_ms`; an earlier time never moves it back. Not made durable here:
    /// the next commit's fsync carries it.
    fn put_device_seen(&mut self, _user: &str, _device: &str, _at_ms: u64) -> Result<()> {
        anyhow::bail!("this handle does not serve the key directory")
    }

    /// Removes up to `limit` devices last seen before `seen_before_ms`,
    /// oldest first, each with its cursor, keys, one-time prekeys and push
    /// target. Returns how many devices. A store that cannot find them by
    /// time (ScyllaDB) removes none.
    fn expire_devices(&mut self, _seen_before_ms: u64, _limit: usize) -> Result<usize> {
        Ok(0)
    }

    /// When `user`'s account was last deleted, in unix ms (`None`: never).
    fn account_deleted_at(&mut self, _user: &str) -> Result<Option<u64>> {
        anyhow::bail!("this handle does not serve revocations")
    }
    /// Sets the device's push target (its stored form, `push::PushTarget`),
    /// replacing any; `None` removes it. Durable when it returns.
    fn put_push_target(&mut self, user: &str, device: &str, target: Option<&[u8]>) -> Result<()>;

    /// Every device of `user` that has a push target, with it.
    fn push_targets(&mut self, user: &str) -> Result<Vec<(String, Vec<u8>)>>;

    /// Makes `members` members of `group` (those already in stay).
    fn add_members(&mut self, group: &str, members: &[&str]) -> Result<()>;
    /// Sets the roles of `members` of `group` (members only; others are
    /// left alone): when they joined, and whether they are admins. `None`
    /// leaves a field as it is.
    fn set_roles(
        &mut self,
        group: &str,
        members: &[&str],
        joined_id: Option<u64>,
        admin: Option<bool>,
    ) -> Result<()>;
    /// The members of `group` with their roles, sorted by user, at most
    /// `MEMBERSHIP_READ_MAX`.
    fn member_roles(&mut self, group: &str) -> Result<Vec<MemberRole>>;
    /// Removes up to `limit` idempotency keys (`sends`, and what indexes
    /// them) of sends made before `before_id`; returns how many. A store
    /// whose rows expire by themselves (ScyllaDB: a TTL) removes none.
    fn expire_sends(&mut self, _before_id: u64, _limit: usize) -> Result<usize> {
        Ok(0)
    }
    /// Removes up to `limit` presence rows that say offline and were last
    /// seen before `seen_before_ms`; returns how many. A row that says
    /// online stays (its node refreshes or replaces it). ScyllaDB's offline
    /// rows expire by their TTL: it removes none.
    fn expire_presence(&mut self, _seen_before_ms: u64, _limit: usize) -> Result<usize> {
        Ok(0)
    }
    /// Removes messages made before `before_id` with their inbox entries,
    /// at most about `limit` rows at once (a whole partition, where the
    /// store drops them that way). A store whose rows expire by themselves
    /// (ScyllaDB: a TTL) removes none.
    fn expire_messages(&mut self, _before_id: u64, _limit: usize) -> Result<Expired> {
        Ok(Expired::default())
    }
    /// Makes sure rows made from `now_ms` on, for a while, have a partition
    /// to go to (a store without partitions has nothing to do). Returns how
    /// many were made.
    fn partitions_ahead(&mut self, _now_ms: u64) -> Result<usize> {
        Ok(0)
    }
    /// Serialises membership changes of `groups` with every other writer's
    /// until this batch commits (PostgreSQL: transaction-scoped advisory
    /// locks, taken in sorted order). A store with one writer needs none.
    fn lock_groups(&mut self, _groups: &[&str]) -> Result<()> {
        Ok(())
    }
    /// Whether only the admins of `group` post (false for a group never set).
    fn admins_only(&mut self, group: &str) -> Result<bool>;
    /// Sets whether only the admins of `group` post.
    fn set_admins_only(&mut self, group: &str, admins_only: bool) -> Result<()>;
    /// Removes `members` from `group` (absent ones are ignored).
    fn remove_members(&mut self, group: &str, members: &[&str]) -> Result<()>;
    /// The groups `user` is a member of, at most `MEMBERSHIP_READ_MAX`.
    fn groups_of(&mut self, user: &str) -> Result<Vec<String>>;
    /// Overwrites what `node` says of each user's presence with its entry.
    fn put_presence(&mut self, node: u16, entries: &[PresenceEntry<'_>]) -> Result<()>;
    /// What each node last said of `user` (at most `PRESENCE_NODES_MAX`).
    fn presence(&mut self, user: &str) -> Result<Vec<Presence>>;

    /// Applies acknowledgements all at once (after `put_new_messages`), as
    /// `apply_ack` would one by one. Returns the positions in `acks` whose
    /// message is not in the user's inbox, or `None` when not supported.
    fn put_acks(&mut self, _acks: &[&AckRecord<'_>]) -> Result<Option<Vec<usize>>> {
        Ok(None)
    }

    /// Stores messages no writer has applied before, all at once: idempotency
    /// keys, inbox entries (`inbox_targets`), message rows (each message's
    /// `stored` bytes, paired with it). Membership changes are already
    /// applied by the caller. A backend
    /// where a round trip per row is the cost (PostgreSQL) implements this
    /// with a few set-based statements; the default says "not supported" and
    /// the rows go one by one.
    fn put_new_messages(
        &mut self,
        _messages: &[(Cow<'_, [u8]>, &MessageRecord<'_>)],
    ) -> Result<bool> {
        Ok(false)
    }
}

/// One decoded record and whether a previous writer may already have applied
/// it (it lies between the ring's durable watermark and its head when this
/// writer attached). Only those pay for the existence checks.
pub struct Applied<'a> {
    pub raw: &'a [u8],
    pub record: Record<'a>,
    pub maybe_applied: bool,
}

/// What applying a batch left to its caller.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Acknowledgements whose message is not (yet) in the user's inbox: the
    /// caller retries them once the other rings have been read further.
    pub unresolved: Vec<usize>,
    /// Membership changes not applied (nor stored) because the group would
    /// pass `group_members_max`: the caller tells the shard.
    pub refused: Vec<usize>,
    /// Deletes for everyone not applied (nor stored), with why: the target
    /// is not a message of that conversation sent by the same user.
    pub deletes_refused: Vec<(usize, &'static str)>,
}

/// Applies decoded records in ring order, except membership changes that
/// would take a group past `group_members_max` members (two changes made
/// on two nodes at once were each checked against the same list there).
pub fn apply(
    tables: &mut dyn Tables,
    records: &[Applied<'_>],
    group_members_max: usize,
) -> Result<Outcome> {
    let refused = over_the_bound(tables, records, group_members_max)?;
    let deletes_refused = check_deletes(tables, records)?;
    let mut skip = refused.clone();
    skip.extend(deletes_refused.iter().map(|(index, _)| *index));
    let unresolved = apply_kept(tables, records, &skip)?;
    tombstone_targets(tables, records, &skip)?;
    Ok(Outcome {
        unresolved,
        refused,
        deletes_refused,
    })
}

/// The deletes for everyone of `records` that may not be applied, with
/// why: the target must be a message (or its tombstone: a replayed delete)
/// of the delete's conversation, sent by the same user; it may be stored
/// already or come earlier in this batch.
fn check_deletes(
    tables: &mut dyn Tables,
    records: &[Applied<'_>],
) -> Result<Vec<(usize, &'static str)>> {
    let mut refused = Vec::new();
    for (index, applied) in records.iter().enumerate() {
        let Record::Message(delete) = &applied.record else {
            continue;
        };
        let Some(target) = delete.deletes() else {
            continue;
        };
        let stored = tables.message(delete.conversation, target)?;
        let decoded = stored
            .as_deref()
            .map(chat_protocol::records::decode_message)
            .transpose()?;
        // Not stored yet: it may come earlier in this batch.
        let found = decoded.or_else(|| {
            records[..index]
                .iter()
                .find_map(|applied| match &applied.record {
                    Record::Message(m)
                        if m.message_id == target && m.conversation == delete.conversation =>
                    {
                        Some(m.clone())
                    }
                    _ => None,
                })
        });
        let why = match found {
            None => Some("no such message in this conversation"),
            Some(found) if found.from != delete.from => {
                Some("only its sender can delete a message for everyone")
            }
            // A tombstone already: this delete is a replay, or a repeat.
            Some(found) if found.event.is_none() || found.is_tombstone() => None,
            Some(_) => Some("only a message can be deleted"),
        };
        if let Some(why) = why {
            refused.push((index, why));
        }
    }
    Ok(refused)
}

/// Replaces the target of each applied delete for everyone with its
/// tombstone (after the batch's rows are in: the target may be one of them).
/// Every step is idempotent, so a replayed batch runs it again.
fn tombstone_targets(
    tables: &mut dyn Tables,
    records: &[Applied<'_>],
    skip: &[usize],
) -> Result<()> {
    for (index, applied) in records.iter().enumerate() {
        let Record::Message(delete) = &applied.record else {
            continue;
        };
        let Some(target) = delete.deletes() else {
            continue;
        };
        if skip.contains(&index) {
            continue;
        }
        let Some(raw) = tables.message(delete.conversation, target)? else {
            continue;
        };
        let stored = chat_protocol::records::decode_message(&raw)?;
        tables.replace_message(delete.conversation, target, &stored.tombstone())?;
    }
    Ok(())
}

/// The membership changes of `records` that would take their group past
/// `bound` members, replaying the batch's changes in order over what is
/// stored (under the groups' locks). Only joins can pass it.
fn over_the_bound(
    tables: &mut dyn Tables,
    records: &[Applied<'_>],
    bound: usize,
) -> Result<Vec<usize>> {
    let changes: Vec<(usize, &str, GroupAction, &[&str])> = records
        .iter()
        .enumerate()
        .filter_map(|(index, applied)| match &applied.record {
            Record::Message(MessageRecord {
                event: Some(Event::Group { action, members }),
                to,
                ..
            }) => Some((index, *to, *action, members.as_slice())),
            _ => None,
        })
        .collect();
    if !changes.iter().any(|(_, _, action, _)| action.joins()) {
        return Ok(Vec::new());
    }
    let mut groups: Vec<&str> = changes.iter().map(|(_, group, ..)| *group).collect();
    groups.sort_unstable();
    groups.dedup();
    tables.lock_groups(&groups)?;
    let mut members: HashMap<&str, BTreeSet<String>> = HashMap::new();
    let mut refused = Vec::new();
    for (index, group, action, listed) in changes {
        let current = match members.entry(group) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::hash_map::Entry::Vacant(entry) => entry.insert(
                tables
                    .member_roles(group)?
                    .into_iter()
                    .map(|role| role.user)
                    .collect(),
            ),
        };
        let from = match &records[index].record {
            Record::Message(message) => message.from,
            _ => unreachable!("changes are messages"),
        };
        match action {
            GroupAction::Create | GroupAction::Add => {
                let mut after = current.clone();
                after.extend(listed.iter().map(|member| member.to_string()));
                if action == GroupAction::Create {
                    after.insert(from.to_owned());
                }
                if after.len() > bound {
                    refused.push(index);
                } else {
                    *current = after;
                }
            }
            GroupAction::Remove => {
                for member in listed {
                    current.remove(*member);
                }
            }
            GroupAction::Leave => {
                current.remove(from);
                for member in listed {
                    current.remove(*member);
                }
            }
            GroupAction::Promote | GroupAction::Restrict | GroupAction::Open => {}
        }
    }
    Ok(refused)
}

/// `apply` without the records at the indices in `skip`.
fn apply_kept(
    tables: &mut dyn Tables,
    records: &[Applied<'_>],
    skip: &[usize],
) -> Result<Vec<usize>> {
    if skip.is_empty() && records.iter().all(|applied| !applied.maybe_applied) {
        if let Some(unresolved) = apply_set_based(tables, records)? {
            return Ok(unresolved);
        }
    }
    let mut unresolved = Vec::new();
    for (index, applied) in records.iter().enumerate() {
        if skip.contains(&index) {
            continue;
        }
        match &applied.record {
            Record::Message(message) => {
                let replay = applied.maybe_applied;
                if replay {
                    if tables
                        .message(message.conversation, message.message_id)?
                        .is_some()
                    {
                        continue; // fully applied before a restart
                    }
                    // Never made durable before its node died, and the client
                    // has since retried it elsewhere and got another id:
                    // storing this one too would show the message twice.
                    let first =
                        tables.send_of(message.from, message.from_device, message.client_msg_id)?;
                    if first.is_some_and(|first| first != message.message_id) {
                        continue;
                    }
                }
                if is_client_send(message) {
                    tables.put_send_if_absent(
                        message.from,
                        message.from_device,
                        message.client_msg_id,
                        message.message_id,
                        message.conversation,
                    )?;
                }
                apply_membership(tables, message)?;
                for (user, origin_device) in inbox_targets(message) {
                    inbox_once(
                        tables,
                        replay,
                        user,
                        message.message_id,
                        message.conversation,
                        origin_device,
                    )?;
                }
                let stored = stored_record(applied.raw, message);
                tables.put_message(message.conversation, message.message_id, &stored)?;
            }
            Record::Ack(ack) => {
                if !apply_ack(tables, ack.user, ack.device, ack.message_id)? {
                    unresolved.push(index);
                }
            }
            Record::Presence(presence) => tables.put_presence(presence.node, &presence.entries)?,
        }
    }
    Ok(unresolved)
}

/// Whether a client sent `message` under an idempotency key (receipts are
/// made by the server and have none).
pub fn is_client_send(message: &MessageRecord<'_>) -> bool {
    !matches!(message.event, Some(Event::Receipts { .. }))
}

/// Whose inbox gets `message`, and for each the device that sent it when
/// that user sent it (the sending device never syncs the entry: it has the
/// message, and its cursor passes it when it next acknowledges). A 1:1
/// message goes to its recipient and its sender's user; a message with
/// recipients (a group's, receipts) to exactly those.
pub fn inbox_targets<'m>(message: &MessageRecord<'m>) -> Vec<(&'m str, &'m str)> {
    let origin = |user: &'m str| {
        if user == message.from {
            message.from_device
        } else {
            ""
        }
    };
    if !message.recipients.is_empty() {
        return message.recipients.iter().map(|u| (*u, origin(u))).collect();
    }
    let mut targets = Vec::with_capacity(2);
    if message.to != message.from {
        targets.push((message.to, ""));
    }
    targets.push((message.from, message.from_device));
    targets
}

/// The bytes kept in the conversation: the ring record itself, or, for a
/// message with recipients, the record without them.
pub fn stored_record<'r>(raw: &'r [u8], message: &MessageRecord<'_>) -> Cow<'r, [u8]> {
    if message.recipients.is_empty() {
        Cow::Borrowed(raw)
    } else {
        Cow::Owned(message.stored())
    }
}

/// A group membership change updates the member tables (idempotent, so a
/// replayed record is harmless).
pub fn apply_membership(tables: &mut dyn Tables, message: &MessageRecord<'_>) -> Result<()> {
    let Some(Event::Group { action, members }) = &message.event else {
        return Ok(());
    };
    let Some(group) = ids::group_of_conversation(message.conversation) else {
        anyhow::bail!("a membership change outside a group conversation");
    };
    let joined = Some(message.message_id);
    match action {
        GroupAction::Create => {
            tables.add_members(group, members)?;
            tables.set_roles(group, members, joined, Some(false))?;
            tables.set_roles(group, &[message.from], None, Some(true))
        }
        GroupAction::Add => {
            tables.add_members(group, members)?;
            tables.set_roles(group, members, joined, Some(false))
        }
        GroupAction::Promote => tables.set_roles(group, members, None, Some(true)),
        GroupAction::Restrict => tables.set_admins_only(group, true),
        GroupAction::Open => tables.set_admins_only(group, false),
        GroupAction::Remove | GroupAction::Leave => tables.remove_members(group, members),
    }
}

/// A page of `conversation`'s history, newest first, below `before` and
/// (for a group member) not before `since`: a member reads from where they
/// joined. Nothing below `floor` (the retention floor) is shown.
pub fn history(
    tables: &mut dyn Tables,
    conversation: &str,
    before: Option<u64>,
    since: Option<u64>,
    floor: u64,
    limit: usize,
) -> Result<Vec<Vec<u8>>> {
    let since = since.max(Some(floor).filter(|floor| *floor > 0));
    let mut records = tables.history(conversation, before, limit)?;
    if let Some(since) = since {
        records.retain(|raw| {
            chat_protocol::records::decode_message(raw)
                .is_ok_and(|message| message.message_id >= since)
        });
    }
    Ok(records)
}

/// The batch through the backend's set-based statements, when it has them:
/// messages first, then acknowledgements (an acknowledgement only follows
/// the delivery of its message, so no order that matters is lost). `None`
/// when the backend goes row by row.
fn apply_set_based(tables: &mut dyn Tables, records: &[Applied<'_>]) -> Result<Option<Vec<usize>>> {
    let mut messages = Vec::new();
    let mut acks = Vec::new();
    let mut presence = Vec::new();
    for (index, applied) in records.iter().enumerate() {
        match &applied.record {
            Record::Message(message) => {
                messages.push((stored_record(applied.raw, message), message))
            }
            Record::Ack(ack) => acks.push((index, ack)),
            Record::Presence(record) => presence.push(record),
        }
    }
    if !messages.is_empty() {
        if !tables.put_new_messages(&messages)? {
            return Ok(None);
        }
        for (_, message) in &messages {
            apply_membership(tables, message)?;
        }
    }
    for record in presence {
        tables.put_presence(record.node, &record.entries)?;
    }
    if acks.is_empty() {
        return Ok(Some(Vec::new()));
    }
    let ack_records: Vec<&AckRecord<'_>> = acks.iter().map(|(_, ack)| *ack).collect();
    let unresolved = match tables.put_acks(&ack_records)? {
        Some(unresolved) => unresolved,
        None => {
            let mut unresolved = Vec::new();
            for (position, ack) in ack_records.iter().enumerate() {
                if !apply_ack(tables, ack.user, ack.device, ack.message_id)? {
                    unresolved.push(position);
                }
            }
            unresolved
        }
    };
    Ok(Some(
        unresolved
            .into_iter()
            .map(|position| acks[position].0)
            .collect(),
    ))
}

/// Adds the inbox entry unless a replayed record already added it.
fn inbox_once(
    tables: &mut dyn Tables,
    replay: bool,
    user: &str,
    message_id: u64,
    conversation: &str,
    origin_device: &str,
) -> Result<u64> {
    if replay {
        if let Some((seq, _)) = tables.inbox_entry_of(user, message_id)? {
            return Ok(seq);
        }
    }
    tables.append_inbox(user, message_id, conversation, origin_device)
}

/// Acknowledges `message_id` and every earlier entry of its conversation for
/// this device. False when the message is not in the user's inbox.
pub fn apply_ack(
    tables: &mut dyn Tables,
    user: &str,
    device: &str,
    message_id: u64,
) -> Result<bool> {
    let Some((seq, conversation)) = tables.inbox_entry_of(user, message_id)? else {
        return Ok(false);
    };
    let mut cursor = tables.cursor(user, device)?;
    if cursor.is_acked(seq) {
        return Ok(true);
    }
    let mut entries = Vec::new();
    let mut after = cursor.through;
    while entries.len() < ACK_SCAN_MAX && after + 1 < seq {
        let chunk = tables.inbox_after(user, after, SCAN_CHUNK)?;
        let Some(last) = chunk.last() else {
            break;
        };
        after = last.seq;
        entries.extend(chunk);
    }
    let fold_gaps = tables.gaps_are_removals();
    advance(&mut cursor, device, seq, &conversation, &entries, fold_gaps);
    tables.put_cursor(user, device, &cursor)?;
    Ok(true)
}

/// The acknowledgement of the entry `seq` (of `conversation`) by `device`:
/// marks it, and every entry of `entries` below it that belongs to the same
/// conversation or was sent by this device (which never receives, so never
/// acknowledges, its own sends). `entries` are the user's inbox entries
/// after the cursor, ascending (as many as the caller read).
///
/// With `fold_gaps` (`Tables::gaps_are_removals`), sequences missing below
/// the first entry after the cursor were removed by retention (inboxes are
/// gap-free, and an entry never appears below one already there): they
/// count as acknowledged, or the cursor could never fold past them.
pub fn advance(
    cursor: &mut Cursor,
    device: &str,
    seq: u64,
    conversation: &str,
    entries: &[InboxEntry],
    fold_gaps: bool,
) {
    if cursor.is_acked(seq) {
        return;
    }
    let first_present = match entries.iter().find(|entry| entry.seq > cursor.through) {
        _ if !fold_gaps => None,
        Some(entry) => Some(entry.seq.min(seq)),
        // Every entry read is behind the cursor: past them nothing was read
        // when the read stopped at its bound, so nothing is known missing.
        None if entries.len() >= ACK_SCAN_MAX => None,
        None => Some(seq),
    };
    if let Some(first) = first_present {
        cursor.skip_through(first - 1);
    }
    for entry in entries.iter().take_while(|entry| entry.seq < seq) {
        if entry.conversation == conversation || entry.origin_device == device {
            cursor.ack(entry.seq);
        }
    }
    cursor.ack(seq);
}

/// One page of a device's sync.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SyncPage {
    pub entries: Vec<SyncEntry>,
    pub last_seq: u64,
    pub more: bool,
    /// Entries this page passed over that the device had not acknowledged
    /// and retention removed (or is removing): messages the device missed
    /// for good. At most that many: an own send removed from the inbox can
    /// no longer be told apart and counts too.
    pub expired: u64,
}

/// Why a read was refused (told to the client, not an outage).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ReadRefused(pub &'static str);

/// Where a `MadeSince(message_id)` sync starts: the inbox sequence after
/// which the first entry has an id of at least `message_id`. Found with
/// single-entry reads: doubling from the device's last acknowledged
/// sequence until past it, then a binary search (about 40 reads for a
/// million entries). Ids grow with sequences up to the clock difference
/// between nodes; the caller's margin covers that.
fn first_made_since(
    tables: &mut dyn Tables,
    user: &str,
    cursor: &Cursor,
    message_id: u64,
) -> Result<u64> {
    let before = |tables: &mut dyn Tables, seq: u64| -> Result<bool> {
        // Whether the first entry after `seq` is older than `message_id`.
        let next = tables.inbox_after(user, seq, 1)?;
        Ok(next
            .first()
            .is_some_and(|entry| entry.message_id < message_id))
    };
    let acked = cursor
        .above
        .last()
        .copied()
        .unwrap_or(0)
        .max(cursor.through);
    let (mut low, mut high) = (0u64, acked.max(1));
    while before(tables, high)? {
        low = high + 1;
        high = high.saturating_mul(2);
    }
    while low < high {
        let middle = low + (high - low) / 2;
        if before(tables, middle)? {
            low = middle + 1;
        } else {
            high = middle;
        }
    }
    Ok(low)
}

/// Sequences in `after+1..until` the cursor (if any) has not acknowledged.
fn missing_between(cursor: Option<&Cursor>, after: u64, until: u64) -> u64 {
    if until <= after + 1 {
        return 0;
    }
    let acked = cursor.map_or(0, |cursor| {
        let below_through = cursor.through.min(until - 1).saturating_sub(after);
        let above = cursor
            .above
            .iter()
            .filter(|seq| **seq > after.max(cursor.through) && **seq < until)
            .count() as u64;
        below_through + above
    });
    until - after - 1 - acked
}

/// The first message id of `user`'s current account: a name signed in
/// again after its account was deleted reads (in history) and syncs
/// nothing made before the deletion. 0 for an account never deleted.
pub fn account_from(tables: &mut dyn Tables, user: &str) -> Result<u64> {
    Ok(tables
        .account_deleted_at(user)?
        .map_or(0, snowflake::first_id_at))
}

/// What the device has not acknowledged (or everything after a message, or
/// made since a time), in inbox order, skipping what the device itself sent.
/// Entries of messages made before `floor` (the retention floor), and
/// sequences whose entries retention removed, are counted in `expired`.
/// For a name signed in again after its account was deleted, entries of
/// messages made before the deletion (one another node stored for the old
/// account after its rows went) are skipped, and not counted.
pub fn sync_page(
    tables: &mut dyn Tables,
    user: &str,
    device: &str,
    from: SyncFrom,
    floor: u64,
    limit: usize,
    bytes_max: usize,
) -> Result<SyncPage> {
    let (mut after, cursor) = match from {
        SyncFrom::Cursor => {
            let cursor = tables.cursor(user, device)?;
            (cursor.through, Some(cursor))
        }
        SyncFrom::AfterSeq(seq) => (seq, Some(tables.cursor(user, device)?)),
        SyncFrom::AfterSeqAll(seq) => (seq, None),
        SyncFrom::AfterMessage(message_id) => match tables.inbox_entry_of(user, message_id)? {
            Some((seq, _)) => (seq, None),
            None => return Err(ReadRefused("`after` is not a message in this user's inbox").into()),
        },
        SyncFrom::MadeSince(message_id) => {
            let cursor = tables.cursor(user, device)?;
            (first_made_since(tables, user, &cursor, message_id)?, None)
        }
    };
    let account_from = account_from(tables, user)?;
    let mut page = SyncPage {
        last_seq: after,
        ..SyncPage::default()
    };
    let mut bytes = 0usize;
    let scan_max = limit.saturating_mul(4).max(SCAN_CHUNK);
    let mut scanned = 0;
    loop {
        let entries = tables.inbox_after(user, after, SCAN_CHUNK)?;
        let exhausted = entries.len() < SCAN_CHUNK;
        // The entries this page may take (count bounds), read in one call.
        let mut wanted = Vec::new();
        let mut stop_at = entries.len();
        for (index, entry) in entries.iter().enumerate() {
            if page.entries.len() + wanted.len() >= limit || scanned >= scan_max {
                stop_at = index;
                break;
            }
            scanned += 1;
            let own = entry.origin_device == device;
            if !own
                && entry.message_id >= floor.max(account_from)
                && !cursor.as_ref().is_some_and(|c| c.is_acked(entry.seq))
            {
                wanted.push(index);
            }
        }
        let keys: Vec<(&str, u64)> = wanted
            .iter()
            .map(|&i| (entries[i].conversation.as_str(), entries[i].message_id))
            .collect();
        let mut records = wanted
            .iter()
            .copied()
            .zip(tables.messages(&keys)?)
            .peekable();
        for (index, entry) in entries.iter().enumerate().take(stop_at) {
            if bytes >= bytes_max {
                page.more = true;
                return Ok(page);
            }
            page.expired += missing_between(cursor.as_ref(), after, entry.seq);
            if entry.message_id < floor
                && entry.message_id >= account_from
                && entry.origin_device != device
                && !cursor.as_ref().is_some_and(|c| c.is_acked(entry.seq))
            {
                page.expired += 1;
            }
            after = entry.seq;
            page.last_seq = entry.seq;
            let Some((_, record)) = records.next_if(|(wanted, _)| *wanted == index) else {
                continue;
            };
            // Missing only while its batch is half applied; the device was
            // online for it then (see ARCHITECTURE.md), so skipping is safe.
            if let Some(record) = record {
                bytes += record.len();
                page.entries.push(SyncEntry {
                    seq: entry.seq,
                    record,
                });
            }
        }
        if stop_at < entries.len() {
            page.more = true;
            return Ok(page);
        }
        if exhausted {
            // Past the last entry there may be sequences whose entries were
            // all removed. The head is read first: any entry at or below it
            // is committed by the time the inbox is read again.
            let head = tables.inbox_head(user)?;
            if tables.inbox_after(user, after, 1)?.is_empty() {
                page.expired += missing_between(cursor.as_ref(), after, head + 1);
                page.last_seq = page.last_seq.max(head);
            }
            return Ok(page);
        }
    }
}

/// What `asker` may learn of each of `users`' presence: only users it
/// shares a conversation with (itself, a direct conversation with a message
/// in it, or a group); for the others `shared` is false and nothing else is said.
pub fn presence(
    tables: &mut dyn Tables,
    asker: &str,
    users: &[String],
) -> Result<Vec<PresenceAnswer>> {
    let mut asker_groups: Option<HashSet<String>> = None;
    let mut answers = Vec::with_capacity(users.len());
    for user in users {
        let mut shared = user == asker
            || !tables
                .history(&ids::direct_conversation_id(asker, user), None, 1)?
                .is_empty();
        if !shared {
            if asker_groups.is_none() {
                asker_groups = Some(tables.groups_of(asker)?.into_iter().collect());
            }
            let mine = asker_groups.as_ref().expect("just read");
            shared = !mine.is_empty() && tables.groups_of(user)?.iter().any(|g| mine.contains(g));
        }
        let rows = if shared {
            tables.presence(user)?
        } else {
            Vec::new()
        };
        // Online if any node says so (the freshest such row: the gateway
        // discards one too old, from a node that stopped writing); last seen
        // is the latest any node saw.
        let freshest_online = rows
            .iter()
            .filter(|r| r.online)
            .map(|r| r.last_seen_ms)
            .max();
        answers.push(PresenceAnswer {
            user: user.clone(),
            shared,
            online: freshest_online.is_some(),
            updated_ms: freshest_online.unwrap_or(0),
            last_seen_ms: rows.iter().map(|r| r.last_seen_ms).max(),
        });
    }
    Ok(answers)
}

/// The device's sends within the idempotency window, for a gateway to
/// recognise retries after it restarted.
pub fn recent_sends(
    tables: &mut dyn Tables,
    user: &str,
    device: &str,
    since_unix_ms: u64,
    limit: usize,
) -> Result<Vec<RecentSend>> {
    tables.recent_sends(user, device, snowflake::first_id_at(since_unix_ms), limit)
}
