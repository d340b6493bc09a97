//! The embedded store's account deletion: every row of one user, table by
//! table.
//!
//! Owns the order of the removals (index rows before the rows they index
//! are found from, so a crash part-way leaves rows a second run still finds
//! and removes) and nothing else: the key layouts are `embedded`'s and
//! `social`'s. Never removes the revocation of all the user's devices (the
//! caller stored it first; it keeps old tokens refused) or the record of
//! the deletion, and never touches messages (they belong to their
//! conversations).

use anyhow::{Context, Result};
use fjall::PartitionHandle;

use super::{be_u64, by_time_key, key, text, Embedded};
use crate::store::{AccountRemoved, ACCOUNT_DELETED_SCOPE};

impl Embedded {
    pub(super) fn delete_account_of(&self, user: &str, at_ms: u64) -> Result<AccountRemoved> {
        let _serial = self.keys_lock.lock().expect("keys lock");
        let prefix = key(&[user], None);
        let mut rows = 0u64;
        // Idempotency keys (`user\0device\0client\0` → id, conversation):
        // the time index first, found from the key's value.
        for item in self.sends.prefix(&prefix) {
            let (send_key, value) = item?;
            self.sends_by_time
                .remove(by_time_key(be_u64(&value)?, &send_key))?;
            self.sends.remove(send_key)?;
            rows += 1;
        }
        rows += remove_prefix(&self.sends_recent, &prefix)?;
        // The inbox (`user\0` + seq → id, origin, conversation) and its
        // index by message id, in every time bucket (a closed one too: the
        // cleanup's walk over it holds this lock, so it finds nothing left).
        for bucket in self.buckets.all() {
            rows += remove_prefix(&bucket.inbox, &prefix)?;
            rows += remove_prefix(&bucket.inbox_ids, &prefix)?;
        }
        rows += self.forget_devices_of(&prefix)?;
        if self.inbox_heads.get(user)?.is_some() {
            self.inbox_heads.remove(user)?;
            rows += 1;
        }
        for partition in [
            &self.cursors,
            &self.device_keys,
            &self.prekeys,
            &self.push_targets,
            &self.presence,
        ] {
            rows += remove_prefix(partition, &prefix)?;
        }
        // Memberships, both directions (`member_of` is `user\0group\0`).
        let mut groups = Vec::new();
        for item in self.member_of.prefix(&prefix) {
            let (row, _) = item?;
            let group = row
                .get(prefix.len()..row.len() - 1)
                .context("bad member_of key in store")?;
            let group = text(group)?;
            self.members.remove(key(&[&group, user], None))?;
            self.member_of.remove(row)?;
            rows += 2;
            groups.push(group);
        }
        // Revocations of single devices; the one of every device stays, and
        // the deletion is recorded (the later of two).
        let every_device = key(&[user, ""], None);
        let deleted = key(&[user, ACCOUNT_DELETED_SCOPE], None);
        let mut deleted_at = at_ms;
        for item in self.revocations.prefix(&prefix) {
            let (row, value) = item?;
            if *row == *deleted {
                deleted_at = deleted_at.max(be_u64(&value)?);
            } else if *row != *every_device {
                self.revocations.remove(row)?;
                rows += 1;
            }
        }
        self.revocations.insert(deleted, deleted_at.to_be_bytes())?;
        self.persist()?;
        groups.sort();
        Ok(AccountRemoved { rows, groups })
    }

    /// Every key of every partition that names `user` as one of its
    /// `\0`-separated parts (after the 8-byte id of a `*_by_time` key),
    /// counted per partition: what a deleted account must not leave.
    #[cfg(test)]
    pub(crate) fn rows_naming(&self, user: &str) -> Result<Vec<(String, usize)>> {
        let mut found = Vec::new();
        for name in self.keyspace.list_partitions() {
            let partition = self
                .keyspace
                .open_partition(&name, super::partition_options())?;
            let skip = if name.ends_with("_by_time") { 8 } else { 0 };
            let mut count = 0;
            for item in partition.iter() {
                let (k, _) = item?;
                let names = k
                    .get(skip..)
                    .unwrap_or_default()
                    .split(|byte| *byte == 0)
                    .any(|part| part == user.as_bytes());
                count += usize::from(names);
            }
            if count > 0 {
                found.push((name.to_string(), count));
            }
        }
        found.sort();
        Ok(found)
    }
}

/// Removes every key under `prefix`. Returns how many. A bucket the
/// cleanup drops meanwhile takes its keys with it.
fn remove_prefix(partition: &PartitionHandle, prefix: &[u8]) -> Result<u64> {
    let mut removed = 0;
    for item in partition.prefix(prefix) {
        super::buckets::dropped_meanwhile(partition.remove(item?.0))?;
        removed += 1;
    }
    Ok(removed)
}
