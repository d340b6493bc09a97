//! The default backend: fjall, an embedded LSM store in the data directory.
//!
//! Owns the key layout of each table (ids cannot contain a 0 byte, so `\0`
//! separates key parts and big-endian integers sort numerically) and the
//! per-user inbox counters. `messages`, `inbox` and `inbox_ids` live in
//! time buckets (`buckets`), which retention drops whole. Writes go straight into the partitions and become
//! durable when `persist` fsyncs the journal once per batch (group commit).
//! Never fsyncs per record, and never keeps more than `COUNTERS_MAX` counters
//! in memory (they are re-read from the inbox's last key).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use chat_protocol::store_wire::RecentSend;
use fjall::{Config, Keyspace, PartitionHandle, PersistMode};

use chat_protocol::binary::{Decoder, Encoder};
use chat_protocol::keys::{Bundle, STORED_PREKEYS_MAX};

use super::{Cursor, DeviceKeys, InboxEntry, Presence, ReadRefused, Tables};
use chat_protocol::records::PresenceEntry;
use chat_protocol::store_wire::MemberRole;

mod account;
mod buckets;
mod devices;
mod options;
mod social;

use buckets::{Bucket, Buckets};

use options::partition_options;

/// Inbox counters cached in memory before the cache is cleared.
const COUNTERS_MAX: usize = 1 << 20;

/// How the journal reaches the disk after a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fsync {
    /// fsync data and metadata after every batch (the default: an
    /// acknowledged message survives power loss).
    Batch,
    /// Write to the OS after every batch, fsync never: survives a process
    /// crash, not a power loss. For benchmarks that isolate the disk.
    None,
}

/// Handles to the store, cheap to clone for reader threads.
#[derive(Clone)]
pub struct Embedded {
    keyspace: Keyspace,
    /// `messages`, `inbox` and `inbox_ids`, one set per time window.
    buckets: Arc<Buckets>,
    sends: PartitionHandle,
    sends_recent: PartitionHandle,
    /// message id (big-endian) + the `sends` key → nothing: the idempotency
    /// keys in time order, so the oldest are found without a scan.
    sends_by_time: PartitionHandle,
    /// user → the highest inbox sequence retention removed (big-endian),
    /// so a user whose every entry is gone never gets a sequence again.
    inbox_heads: PartitionHandle,
    cursors: PartitionHandle,
    device_keys: PartitionHandle,
    prekeys: PartitionHandle,
    members: PartitionHandle,
    member_of: PartitionHandle,
    /// group → one byte: only admins post.
    group_settings: PartitionHandle,
    presence: PartitionHandle,
    /// (user, device or "" for all) → revoked at, unix ms (big-endian u64).
    revocations: PartitionHandle,
    /// (user, device) → the device's push target (its stored form).
    push_targets: PartitionHandle,
    /// (user, device) → last seen; and its time index (`devices`).
    devices_seen: PartitionHandle,
    devices_by_seen: PartitionHandle,
    /// Serialises taking one-time prekeys (the store has no transactions;
    /// every reader of this node shares it, so no prekey is taken twice).
    keys_lock: std::sync::Arc<std::sync::Mutex<()>>,
    fsync: Fsync,
}

/// The commit thread's view: the store plus the inbox counters it alone advances.
pub struct EmbeddedWriter {
    store: Embedded,
    counters: HashMap<String, u64>,
    /// The bucket the cleanup is closing: its window start, and the inbox
    /// key its walk over the users' last sequences goes on from.
    closing: Option<(u64, Vec<u8>)>,
}

impl Embedded {
    /// Opens the store; `retention` sizes the time buckets of a store that
    /// has none yet (a sixteenth of it each; `None` keeps everything in one).
    pub fn open(
        path: &Path,
        cache_bytes: u64,
        fsync: Fsync,
        retention: Option<std::time::Duration>,
    ) -> Result<Self> {
        let upgraded = options::upgrade_partition_options(path)
            .with_context(|| format!("upgrading the partitions at {}", path.display()))?;
        if upgraded > 0 {
            tracing::info!(
                partitions = upgraded,
                "embedded store: partitions' journal flushing upgraded"
            );
        }
        let keyspace = Config::new(path)
            .manual_journal_persist(true)
            .cache_size(cache_bytes)
            .open()
            .with_context(|| format!("opening the embedded store at {}", path.display()))?;
        let open = |name: &str| {
            keyspace
                .open_partition(name, partition_options())
                .with_context(|| format!("opening partition {name}"))
        };
        let meta = open("meta")?;
        let buckets = Buckets::open(&keyspace, &meta, retention, super::unix_ms_now())?;
        Self {
            buckets: Arc::new(buckets),
            sends: open("sends")?,
            sends_recent: open("sends_recent")?,
            sends_by_time: open("sends_by_time")?,
            inbox_heads: open("inbox_heads")?,
            cursors: open("cursors")?,
            device_keys: open("device_keys")?,
            prekeys: open("prekeys")?,
            members: open("members")?,
            member_of: open("member_of")?,
            group_settings: open("group_settings")?,
            presence: open("presence")?,
            revocations: open("revocations")?,
            push_targets: open("push_targets")?,
            devices_seen: open("devices_seen")?,
            devices_by_seen: open("devices_by_seen")?,
            keys_lock: Default::default(),
            keyspace,
            fsync,
        }
        .migrated(meta)
    }

    /// Records the layout's version in `meta` (refusing a store written by
    /// a newer build). The partitions above are created when missing, and
    /// the steps that move data run here.
    fn migrated(self, meta: PartitionHandle) -> Result<Self> {
        const VERSION_KEY: &[u8] = b"schema_version";
        let applied = match meta.get(VERSION_KEY)? {
            Some(value) => u32::from_be_bytes(
                value
                    .as_ref()
                    .try_into()
                    .map_err(|_| anyhow::anyhow!("the store's schema_version is not 4 bytes"))?,
            ),
            // A store from before versions, or a new one: the first layout.
            None => 1,
        };
        if applied > super::migrations::EMBEDDED_VERSION {
            anyhow::bail!(
                "the embedded store's schema is at version {applied}, newer than this storage-writer knows ({}): run a newer build",
                super::migrations::EMBEDDED_VERSION
            );
        }
        if applied < 5 {
            // Version 5: every idempotency key in time order.
            for item in self.sends.iter() {
                let (send_key, value) = item?;
                self.sends_by_time
                    .insert(by_time_key(be_u64(&value)?, &send_key), [])?;
            }
        }
        if applied < 8 {
            // Version 8: every device known from its cursor, keys or push
            // target counts as seen now (its retention runs from here).
            let now = super::unix_ms_now();
            for partition in [&self.cursors, &self.device_keys, &self.push_targets] {
                for item in partition.iter() {
                    let (row, _) = item?;
                    if let Some(device_key) = device_key_of(&row) {
                        self.seen_if_unknown(device_key, now)?;
                    }
                }
            }
        }
        if applied < 9 {
            // Version 9: the inbox's time index (version 7) gives way to
            // the time buckets, which retention drops whole; the store's
            // rows so far are its legacy bucket (`Buckets::open`).
            if self
                .keyspace
                .list_partitions()
                .iter()
                .any(|name| &**name == "inbox_by_time")
            {
                let index = self
                    .keyspace
                    .open_partition("inbox_by_time", partition_options())?;
                self.keyspace.delete_partition(index)?;
            }
        }
        if applied < super::migrations::EMBEDDED_VERSION {
            meta.insert(
                VERSION_KEY,
                super::migrations::EMBEDDED_VERSION.to_be_bytes(),
            )?;
            self.persist()?;
            tracing::info!(
                from = applied,
                to = super::migrations::EMBEDDED_VERSION,
                "embedded store migrated"
            );
        }
        Ok(self)
    }

    /// The names of the store's partitions, sorted.
    #[cfg(test)]
    pub(crate) fn partition_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .keyspace
            .list_partitions()
            .iter()
            .map(|name| name.to_string())
            .collect();
        names.sort();
        names
    }

    /// Writes every bucket's memtables to segments on disk.
    #[cfg(test)]
    pub(crate) fn flush_buckets(&self) -> Result<()> {
        for bucket in self.buckets.all() {
            for partition in [&bucket.messages, &bucket.inbox, &bucket.inbox_ids] {
                partition.rotate_memtable_and_wait()?;
            }
        }
        Ok(())
    }

    pub fn writer(&self) -> EmbeddedWriter {
        EmbeddedWriter {
            store: self.clone(),
            counters: HashMap::new(),
            closing: None,
        }
    }

    /// Makes every write so far durable (one journal fsync).
    pub fn persist(&self) -> Result<()> {
        let mode = match self.fsync {
            Fsync::Batch => PersistMode::SyncAll,
            Fsync::None => PersistMode::Buffer,
        };
        self.keyspace
            .persist(mode)
            .context("persisting the journal")
    }
}

/// `parts` joined with `\0`, then `tail` (a big-endian integer, or nothing).
fn key(parts: &[&str], tail: Option<u64>) -> Vec<u8> {
    let mut key = Vec::with_capacity(64);
    for part in parts {
        key.extend_from_slice(part.as_bytes());
        key.push(0);
    }
    if let Some(tail) = tail {
        key.extend_from_slice(&tail.to_be_bytes());
    }
    key
}

/// The `user\0device\0` at the front of a per-device key.
fn device_key_of(row: &[u8]) -> Option<&[u8]> {
    let mut nuls = row.iter().enumerate().filter(|(_, byte)| **byte == 0);
    let (end, _) = nuls.nth(1)?;
    Some(&row[..=end])
}

/// A `sends_by_time` or `inbox_by_time` key: the message id, then the
/// key of the row it indexes.
fn by_time_key(message_id: u64, send_key: &[u8]) -> Vec<u8> {
    let mut key = message_id.to_be_bytes().to_vec();
    key.extend_from_slice(send_key);
    key
}

impl Embedded {
    /// The highest sequence retention removed from `user`'s inbox (0: none).
    fn removed_head(&self, user: &str) -> Result<u64> {
        match self.inbox_heads.get(user)? {
            Some(value) => be_u64(&value),
            None => Ok(0),
        }
    }

    /// Raises `user`'s removed head to `seq` (never lowers it). Takes the
    /// keys lock, which account deletion holds while it removes the head.
    fn raise_head(&self, user: &str, seq: u64) -> Result<()> {
        let _serial = self.keys_lock.lock().expect("keys lock");
        self.raise_head_held(user, seq)
    }

    /// `raise_head` for a caller that holds the keys lock.
    fn raise_head_held(&self, user: &str, seq: u64) -> Result<()> {
        if seq > self.removed_head(user)? {
            self.inbox_heads.insert(user, seq.to_be_bytes())?;
        }
        Ok(())
    }

    /// Records in `inbox_heads` the last sequence of each user with entries
    /// in `bucket`'s inbox, from the inbox key `from` on, for up to `limit`
    /// users: a user whose every entry goes with the bucket never gets a
    /// sequence again, and sync still tells a device what it missed.
    /// Returns where to go on from, or None once every user is done. Each
    /// user is read and recorded under the keys lock, as account deletion
    /// removes their entries under it: a deleted account's head is never
    /// written back.
    fn record_heads(
        &self,
        bucket: &Bucket,
        mut from: Vec<u8>,
        limit: usize,
    ) -> Result<Option<Vec<u8>>> {
        for _ in 0..limit.max(1) {
            let Some(item) = bucket.inbox.range(from.clone()..).next() else {
                return Ok(None);
            };
            let (first, _) = item?;
            let prefix = first
                .get(..first.len().checked_sub(8).context("bad inbox key")?)
                .filter(|prefix| prefix.last() == Some(&0))
                .context("bad inbox key")?;
            {
                let _serial = self.keys_lock.lock().expect("keys lock");
                if let Some(last) = bucket.inbox.prefix(prefix).next_back() {
                    let user = std::str::from_utf8(&prefix[..prefix.len() - 1])?;
                    self.raise_head_held(user, key_tail(&last?.0)?)?;
                }
            }
            // `user\x01` sorts after every `user\0…` key and before the next user's.
            from = prefix.to_vec();
            *from.last_mut().expect("a user key ends with NUL") = 1;
        }
        Ok(Some(from))
    }

    /// Removes up to `limit` idempotency keys of sends made before
    /// `before_id`, with their `sends_recent` entries. Returns how many.
    fn expire_sends_before(&self, before_id: u64, limit: usize) -> Result<usize> {
        let old: Vec<_> = self
            .sends_by_time
            .range(..before_id.to_be_bytes().to_vec())
            .take(limit)
            .collect::<Result<_, _>>()?;
        for (index_key, _) in &old {
            let (id, send_key) = index_key.split_at(8);
            // `user\0device\0client\0`: the device's part ends at the second NUL.
            let device_end = send_key
                .iter()
                .enumerate()
                .filter(|(_, byte)| **byte == 0)
                .nth(1)
                .map(|(at, _)| at + 1)
                .context("bad sends key in store")?;
            let mut recent_key = send_key[..device_end].to_vec();
            recent_key.extend_from_slice(id);
            self.sends.remove(send_key)?;
            self.sends_recent.remove(recent_key)?;
            self.sends_by_time.remove(index_key.as_ref())?;
        }
        Ok(old.len())
    }
}

fn be_u64(bytes: &[u8]) -> Result<u64> {
    Ok(u64::from_be_bytes(
        bytes
            .get(..8)
            .context("short integer in store")?
            .try_into()?,
    ))
}

/// The 8 big-endian bytes at the end of a key.
fn key_tail(key: &[u8]) -> Result<u64> {
    be_u64(&key[key.len().checked_sub(8).context("short key in store")?..])
}

fn text(bytes: &[u8]) -> Result<String> {
    Ok(std::str::from_utf8(bytes)?.to_owned())
}

impl Tables for Embedded {
    fn add_members(&mut self, group: &str, members: &[&str]) -> Result<()> {
        self.add_members_to(group, members)
    }
    fn remove_members(&mut self, group: &str, members: &[&str]) -> Result<()> {
        self.remove_members_from(group, members)
    }
    fn set_roles(
        &mut self,
        group: &str,
        members: &[&str],
        joined_id: Option<u64>,
        admin: Option<bool>,
    ) -> Result<()> {
        self.set_member_roles(group, members, joined_id, admin)
    }
    fn member_roles(&mut self, group: &str) -> Result<Vec<MemberRole>> {
        self.member_roles_of(group)
    }
    fn admins_only(&mut self, group: &str) -> Result<bool> {
        Ok(self
            .group_settings
            .get(group)?
            .is_some_and(|value| value.first() == Some(&1)))
    }
    fn set_admins_only(&mut self, group: &str, admins_only: bool) -> Result<()> {
        self.group_settings.insert(group, [u8::from(admins_only)])?;
        Ok(())
    }
    fn groups_of(&mut self, user: &str) -> Result<Vec<String>> {
        self.groups_of_user(user)
    }
    fn put_presence(&mut self, node: u16, entries: &[PresenceEntry<'_>]) -> Result<()> {
        self.put_presence_entries(node, entries)
    }
    fn presence(&mut self, user: &str) -> Result<Vec<Presence>> {
        self.presence_of(user)
    }
    fn message(&mut self, conversation: &str, message_id: u64) -> Result<Option<Vec<u8>>> {
        let Some(bucket) = self.buckets.find(message_id) else {
            return Ok(None);
        };
        Ok(bucket
            .messages
            .get(key(&[conversation], Some(message_id)))?
            .map(|v| v.to_vec()))
    }

    /// A message whose window is past the retention and dropped is not
    /// stored (it would be removed at once).
    fn put_message(&mut self, conversation: &str, message_id: u64, record: &[u8]) -> Result<()> {
        if let Some(bucket) = self.buckets.for_id(message_id)? {
            bucket.write(|b| {
                Ok(b.messages
                    .insert(key(&[conversation], Some(message_id)), record)?)
            })?;
        }
        Ok(())
    }

    fn replace_message(
        &mut self,
        conversation: &str,
        message_id: u64,
        record: &[u8],
    ) -> Result<()> {
        let Some(bucket) = self.buckets.find(message_id) else {
            return Ok(());
        };
        let at = key(&[conversation], Some(message_id));
        bucket.write(|b| {
            if b.messages.get(&at)?.is_some() {
                b.messages.insert(at.clone(), record)?;
            }
            Ok(())
        })?;
        Ok(())
    }

    /// Newest window first, until `limit` records.
    fn history(
        &mut self,
        conversation: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Vec<u8>>> {
        let before = before.unwrap_or(u64::MAX);
        let start = key(&[conversation], Some(0));
        let end = key(&[conversation], Some(before));
        let mut records = Vec::with_capacity(limit.min(128));
        for bucket in self.buckets.all().iter().rev() {
            if records.len() >= limit {
                break;
            }
            if bucket.first_id() >= before {
                continue;
            }
            let range = bucket.messages.range(start.clone()..end.clone());
            for item in range.rev().take(limit - records.len()) {
                records.push(item?.1.to_vec());
            }
        }
        Ok(records)
    }

    fn put_send_if_absent(
        &mut self,
        user: &str,
        device: &str,
        client_msg_id: &str,
        message_id: u64,
        conversation: &str,
    ) -> Result<()> {
        let send_key = key(&[user, device, client_msg_id], None);
        if self.sends.get(&send_key)?.is_some() {
            return Ok(());
        }
        let mut value = message_id.to_be_bytes().to_vec();
        value.extend_from_slice(conversation.as_bytes());
        self.sends_by_time
            .insert(by_time_key(message_id, &send_key), [])?;
        self.sends.insert(send_key, value)?;
        let mut recent = client_msg_id.as_bytes().to_vec();
        recent.push(0);
        recent.extend_from_slice(conversation.as_bytes());
        self.sends_recent
            .insert(key(&[user, device], Some(message_id)), recent)?;
        Ok(())
    }

    fn send_of(&mut self, user: &str, device: &str, client_msg_id: &str) -> Result<Option<u64>> {
        match self.sends.get(key(&[user, device, client_msg_id], None))? {
            Some(value) => Ok(Some(be_u64(&value)?)),
            None => Ok(None),
        }
    }

    fn recent_sends(
        &mut self,
        user: &str,
        device: &str,
        since_message_id: u64,
        limit: usize,
    ) -> Result<Vec<RecentSend>> {
        let start = key(&[user, device], Some(since_message_id));
        let end = key(&[user, device], Some(u64::MAX));
        let mut sends = Vec::new();
        for item in self.sends_recent.range(start..=end).rev().take(limit) {
            let (k, v) = item?;
            let (client_msg_id, conversation) =
                v.split_at(v.iter().position(|b| *b == 0).context("bad send entry")?);
            sends.push(RecentSend {
                client_msg_id: text(client_msg_id)?,
                message_id: key_tail(&k)?,
                conversation: text(&conversation[1..])?,
            });
        }
        Ok(sends)
    }

    fn append_inbox(
        &mut self,
        _user: &str,
        _message_id: u64,
        _conversation: &str,
        _origin_device: &str,
    ) -> Result<u64> {
        anyhow::bail!("readers never append; the commit thread uses EmbeddedWriter")
    }

    fn inbox_entry_of(&mut self, user: &str, message_id: u64) -> Result<Option<(u64, String)>> {
        let Some(bucket) = self.buckets.find(message_id) else {
            return Ok(None);
        };
        let Some(value) = bucket.inbox_ids.get(key(&[user], Some(message_id)))? else {
            return Ok(None);
        };
        Ok(Some((be_u64(&value)?, text(&value[8..])?)))
    }

    fn inbox_head(&mut self, user: &str) -> Result<u64> {
        let mut last = self.removed_head(user)?;
        for bucket in self.buckets.all() {
            if let Some(item) = bucket.inbox.prefix(key(&[user], None)).next_back() {
                last = last.max(key_tail(&item?.0)?);
            }
        }
        Ok(last)
    }

    /// The `limit` lowest sequences above `after`, from every window: a
    /// sequence follows commit order, a window the message id's time, so
    /// neighbouring windows may interleave. Once `limit` are in hand, a
    /// later window is only asked for sequences below the highest kept.
    fn inbox_after(&mut self, user: &str, after: u64, limit: usize) -> Result<Vec<InboxEntry>> {
        let start = key(&[user], Some(after.saturating_add(1)));
        let mut entries: Vec<InboxEntry> = Vec::with_capacity(limit.min(256));
        for bucket in self.buckets.all() {
            let below = match entries.get(limit.wrapping_sub(1)) {
                Some(highest_kept) => highest_kept.seq,
                None => u64::MAX,
            };
            let end = key(&[user], Some(below));
            let before = entries.len();
            for item in bucket.inbox.range(start.clone()..=end).take(limit) {
                let (k, v) = item?;
                let origin_len = usize::from(*v.get(8).context("bad inbox entry")?);
                let origin = v.get(9..9 + origin_len).context("bad inbox entry")?;
                entries.push(InboxEntry {
                    seq: key_tail(&k)?,
                    message_id: be_u64(&v)?,
                    origin_device: text(origin)?,
                    conversation: text(&v[9 + origin_len..])?,
                });
            }
            if entries.len() > before && before > 0 {
                entries.sort_by_key(|entry| entry.seq);
                entries.truncate(limit);
            }
        }
        entries.truncate(limit);
        Ok(entries)
    }

    fn cursor(&mut self, user: &str, device: &str) -> Result<Cursor> {
        match self.cursors.get(key(&[user, device], None))? {
            Some(value) => Ok(Cursor::decode(&value)?),
            None => Ok(Cursor::default()),
        }
    }

    fn put_cursor(&mut self, user: &str, device: &str, cursor: &Cursor) -> Result<()> {
        self.cursors
            .insert(key(&[user, device], None), cursor.encode())?;
        Ok(())
    }

    fn put_device_keys(&mut self, upload: &DeviceKeys<'_>) -> Result<u32> {
        let _serial = self.keys_lock.lock().expect("keys lock");
        let prefix = key(&[upload.user, upload.device], None);
        let stored = self.prekeys.prefix(&prefix).count() as u32;
        anyhow::ensure!(
            stored + upload.one_time_prekeys.len() as u32 <= STORED_PREKEYS_MAX,
            ReadRefused("the device would hold more one-time prekeys than allowed")
        );
        let first = match self.prekeys.prefix(&prefix).next_back() {
            Some(item) => key_tail(&item?.0)? + 1,
            None => 1,
        };
        let mut value = Encoder::default();
        value
            .str(upload.identity_key)
            .str(upload.signed_prekey)
            .str(upload.signed_prekey_signature);
        self.device_keys.insert(prefix.clone(), value.bytes)?;
        for (id, prekey) in (first..).zip(upload.one_time_prekeys) {
            self.prekeys.insert(
                key(&[upload.user, upload.device], Some(id)),
                prekey.as_bytes(),
            )?;
        }
        self.persist()?;
        Ok(stored + upload.one_time_prekeys.len() as u32)
    }

    fn revoke(&mut self, user: &str, device: Option<&str>, at_ms: u64) -> Result<u32> {
        let _serial = self.keys_lock.lock().expect("keys lock");
        let scope = device.unwrap_or("");
        let at_key = key(&[user, scope], None);
        let earlier = match self.revocations.get(&at_key)? {
            Some(value) => be_u64(&value)?,
            None => 0,
        };
        self.revocations
            .insert(at_key, at_ms.max(earlier).to_be_bytes())?;
        // The revoked devices' keys: one device, or every device of the user.
        let prefix = match device {
            Some(device) => key(&[user, device], None),
            None => key(&[user], None),
        };
        let mut removed = 0;
        for item in self.device_keys.prefix(&prefix) {
            self.device_keys.remove(item?.0)?;
            removed += 1;
        }
        for item in self.prekeys.prefix(&prefix) {
            self.prekeys.remove(item?.0)?;
        }
        for item in self.push_targets.prefix(&prefix) {
            self.push_targets.remove(item?.0)?;
        }
        self.persist()?;
        Ok(removed)
    }

    fn put_push_target(&mut self, user: &str, device: &str, target: Option<&[u8]>) -> Result<()> {
        let at = key(&[user, device], None);
        match target {
            Some(target) => self.push_targets.insert(at, target)?,
            None => self.push_targets.remove(at)?,
        }
        self.persist()
    }

    fn push_targets(&mut self, user: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let mut targets = Vec::new();
        let prefix = key(&[user], None);
        for item in self
            .push_targets
            .prefix(&prefix)
            .take(super::PUSH_TARGETS_PER_USER_MAX)
        {
            let (k, v) = item?;
            targets.push((text(&k[prefix.len()..k.len() - 1])?, v.to_vec()));
        }
        Ok(targets)
    }

    fn revoked_at(&mut self, user: &str, device: &str) -> Result<Option<u64>> {
        let mut latest = None;
        for scope in [device, ""] {
            if let Some(value) = self.revocations.get(key(&[user, scope], None))? {
                latest = latest.max(Some(be_u64(&value)?));
            }
        }
        Ok(latest)
    }

    fn delete_account(&mut self, user: &str, at_ms: u64) -> Result<super::AccountRemoved> {
        self.delete_account_of(user, at_ms)
    }

    fn account_deleted_at(&mut self, user: &str) -> Result<Option<u64>> {
        let at = key(&[user, super::ACCOUNT_DELETED_SCOPE], None);
        self.revocations.get(at)?.map(|v| be_u64(&v)).transpose()
    }

    fn put_device_seen(&mut self, user: &str, device: &str, at_ms: u64) -> Result<()> {
        self.put_device_seen_at(user, device, at_ms)
    }

    fn devices_of(&mut self, user: &str) -> Result<Vec<String>> {
        let mut devices = Vec::new();
        for item in self.device_keys.prefix(key(&[user], None)).take(1024) {
            let (k, _) = item?;
            devices.push(text(&k[user.len() + 1..k.len() - 1])?);
        }
        Ok(devices)
    }

    fn take_bundles(&mut self, user: &str) -> Result<Vec<(Bundle, u32)>> {
        let _serial = self.keys_lock.lock().expect("keys lock");
        let mut bundles = Vec::new();
        for item in self.device_keys.prefix(key(&[user], None)) {
            let (k, v) = item?;
            let device = text(&k[user.len() + 1..k.len() - 1])?;
            let mut decoder = Decoder::new(&v);
            let mut bundle = Bundle {
                device: device.clone(),
                identity_key: decoder.str()?.to_owned(),
                signed_prekey: decoder.str()?.to_owned(),
                signed_prekey_signature: decoder.str()?.to_owned(),
                one_time_prekey: None,
            };
            let prefix = key(&[user, &device], None);
            if let Some(item) = self.prekeys.prefix(&prefix).next() {
                let (prekey_key, prekey) = item?;
                bundle.one_time_prekey = Some(text(&prekey)?);
                self.prekeys.remove(prekey_key)?;
            }
            let left = self.prekeys.prefix(&prefix).count() as u32;
            bundles.push((bundle, left));
        }
        self.persist()?;
        Ok(bundles)
    }
}

impl EmbeddedWriter {
    pub fn persist(&self) -> Result<()> {
        self.store.persist()
    }

    /// The user's last inbox entry in any bucket: (sequence, message id),
    /// or zeros.
    fn last_entry(&self, user: &str) -> Result<(u64, u64)> {
        let mut last = (0, 0);
        for bucket in self.store.buckets.all() {
            if let Some(item) = bucket.inbox.prefix(key(&[user], None)).next_back() {
                let (k, v) = item?;
                last = last.max((key_tail(&k)?, be_u64(&v)?));
            }
        }
        Ok(last)
    }

    /// Drops the oldest bucket whose whole window is before `before_id`,
    /// in steps: it is closed to writers, the last sequence of each user
    /// with entries in it is recorded (`record_heads`, up to `limit` users
    /// a call), that is made durable, and only then are its partitions
    /// deleted, one call later than the last walk. A crash in between
    /// leaves a bucket that the next pass closes and walks again: every
    /// step is idempotent.
    fn expire_messages_before(&mut self, before_id: u64, limit: usize) -> Result<super::Expired> {
        let floor_ms = chat_protocol::snowflake::decode(before_id).unix_ms;
        let Some(bucket) = self.store.buckets.oldest_ending_by(floor_ms) else {
            self.closing = None;
            return Ok(super::Expired::default());
        };
        self.store.buckets.close(&bucket);
        let from = match self.closing.take() {
            Some((start, from)) if start == bucket.start_ms => from,
            _ => Vec::new(),
        };
        if let Some(next) = self.store.record_heads(&bucket, from, limit)? {
            self.closing = Some((bucket.start_ms, next));
            return Ok(super::Expired {
                rows: 0,
                bytes: 0,
                more: true,
            });
        }
        self.store.persist()?;
        let rows = (bucket.messages.approximate_len() + bucket.inbox.approximate_len()) as u64;
        let bytes = self.store.buckets.drop_closed(&bucket)?;
        Ok(super::Expired {
            rows,
            bytes,
            more: true,
        })
    }
}

/// `inbox_ids`' value: the sequence, then the conversation.
fn inbox_id_value(seq: u64, conversation: &str) -> Vec<u8> {
    let mut value = seq.to_be_bytes().to_vec();
    value.extend_from_slice(conversation.as_bytes());
    value
}

/// Every table read and write goes to the store; only `append_inbox` differs.
impl Tables for EmbeddedWriter {
    fn message(&mut self, conversation: &str, message_id: u64) -> Result<Option<Vec<u8>>> {
        self.store.message(conversation, message_id)
    }
    fn put_message(&mut self, conversation: &str, message_id: u64, record: &[u8]) -> Result<()> {
        self.store.put_message(conversation, message_id, record)
    }
    fn replace_message(
        &mut self,
        conversation: &str,
        message_id: u64,
        record: &[u8],
    ) -> Result<()> {
        self.store.replace_message(conversation, message_id, record)
    }
    fn history(&mut self, c: &str, before: Option<u64>, limit: usize) -> Result<Vec<Vec<u8>>> {
        self.store.history(c, before, limit)
    }
    fn put_send_if_absent(
        &mut self,
        user: &str,
        device: &str,
        client_msg_id: &str,
        message_id: u64,
        conversation: &str,
    ) -> Result<()> {
        self.store
            .put_send_if_absent(user, device, client_msg_id, message_id, conversation)
    }
    fn send_of(&mut self, user: &str, device: &str, client_msg_id: &str) -> Result<Option<u64>> {
        self.store.send_of(user, device, client_msg_id)
    }
    fn expire_sends(&mut self, before_id: u64, limit: usize) -> Result<usize> {
        self.store.expire_sends_before(before_id, limit)
    }
    fn expire_presence(&mut self, seen_before_ms: u64, limit: usize) -> Result<usize> {
        self.store.expire_presence_before(seen_before_ms, limit)
    }
    fn expire_devices(&mut self, seen_before_ms: u64, limit: usize) -> Result<usize> {
        self.store.expire_devices_before(seen_before_ms, limit)
    }
    fn recent_sends(
        &mut self,
        user: &str,
        device: &str,
        since: u64,
        limit: usize,
    ) -> Result<Vec<RecentSend>> {
        self.store.recent_sends(user, device, since, limit)
    }
    fn append_inbox(
        &mut self,
        user: &str,
        message_id: u64,
        conversation: &str,
        origin_device: &str,
    ) -> Result<u64> {
        // None: the message's window is past the retention and dropped.
        let bucket = self.store.buckets.for_id(message_id)?;
        let ids_key = key(&[user], Some(message_id));
        let last = match self.counters.get(user) {
            Some(seq) => *seq,
            None => {
                if self.counters.len() >= COUNTERS_MAX {
                    self.counters.clear();
                }
                let (last_seq, last_message_id) = self.last_entry(user)?;
                let seq = last_seq.max(self.store.removed_head(user)?);
                self.counters.insert(user.to_owned(), seq);
                if last_seq > 0 && last_seq == seq && last_message_id == message_id {
                    // A crash came between this entry and its index: finish it.
                    if let Some(bucket) = &bucket {
                        bucket.write(|b| {
                            Ok(b.inbox_ids
                                .insert(ids_key.clone(), inbox_id_value(seq, conversation))?)
                        })?;
                    }
                    return Ok(seq);
                }
                seq
            }
        };
        let seq = last + 1;
        let origin_len = u8::try_from(origin_device.len()).context("device id too long")?;
        let mut value = Vec::with_capacity(9 + origin_device.len() + conversation.len());
        value.extend_from_slice(&message_id.to_be_bytes());
        value.push(origin_len);
        value.extend_from_slice(origin_device.as_bytes());
        value.extend_from_slice(conversation.as_bytes());
        // The entry, then its index. The journal keeps write order, so a
        // crash leaves at most the user's last entry without an index, which
        // the next append for that message repairs (above).
        let written = match &bucket {
            Some(bucket) => bucket.write(|b| {
                b.inbox.insert(key(&[user], Some(seq)), value)?;
                b.inbox_ids
                    .insert(ids_key, inbox_id_value(seq, conversation))?;
                Ok(())
            })?,
            None => false,
        };
        if !written {
            // Past the retention, its window gone or going: the sequence is
            // taken and counted as removed, so it is never given again.
            self.store.raise_head(user, seq)?;
        }
        self.counters.insert(user.to_owned(), seq);
        Ok(seq)
    }
    fn inbox_entry_of(&mut self, user: &str, message_id: u64) -> Result<Option<(u64, String)>> {
        self.store.inbox_entry_of(user, message_id)
    }
    fn inbox_after(&mut self, user: &str, after: u64, limit: usize) -> Result<Vec<InboxEntry>> {
        self.store.inbox_after(user, after, limit)
    }
    fn inbox_head(&mut self, user: &str) -> Result<u64> {
        self.store.inbox_head(user)
    }
    fn expire_messages(&mut self, before_id: u64, limit: usize) -> Result<super::Expired> {
        self.expire_messages_before(before_id, limit)
    }
    fn partitions_ahead(&mut self, now_ms: u64) -> Result<usize> {
        self.store.buckets.make_ahead(now_ms)
    }
    fn cursor(&mut self, user: &str, device: &str) -> Result<Cursor> {
        self.store.cursor(user, device)
    }
    fn put_cursor(&mut self, user: &str, device: &str, cursor: &Cursor) -> Result<()> {
        self.store.put_cursor(user, device, cursor)
    }
    fn add_members(&mut self, group: &str, members: &[&str]) -> Result<()> {
        self.store.add_members_to(group, members)
    }
    fn remove_members(&mut self, group: &str, members: &[&str]) -> Result<()> {
        self.store.remove_members_from(group, members)
    }
    fn set_roles(
        &mut self,
        group: &str,
        members: &[&str],
        joined_id: Option<u64>,
        admin: Option<bool>,
    ) -> Result<()> {
        self.store
            .set_member_roles(group, members, joined_id, admin)
    }
    fn member_roles(&mut self, group: &str) -> Result<Vec<MemberRole>> {
        self.store.member_roles_of(group)
    }
    fn admins_only(&mut self, group: &str) -> Result<bool> {
        self.store.admins_only(group)
    }
    fn set_admins_only(&mut self, group: &str, admins_only: bool) -> Result<()> {
        self.store.set_admins_only(group, admins_only)
    }
    fn groups_of(&mut self, user: &str) -> Result<Vec<String>> {
        self.store.groups_of_user(user)
    }
    fn put_presence(&mut self, node: u16, entries: &[PresenceEntry<'_>]) -> Result<()> {
        self.store.put_presence_entries(node, entries)
    }
    fn presence(&mut self, user: &str) -> Result<Vec<Presence>> {
        self.store.presence_of(user)
    }
    fn put_push_target(&mut self, user: &str, device: &str, target: Option<&[u8]>) -> Result<()> {
        self.store.put_push_target(user, device, target)
    }
    fn push_targets(&mut self, user: &str) -> Result<Vec<(String, Vec<u8>)>> {
        self.store.push_targets(user)
    }
}
