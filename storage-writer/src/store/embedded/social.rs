//! The embedded store's group and presence tables.
//!
//! Owns their key layout: `members` (`group\0member`), its reverse
//! `member_of` (`member\0group`), both written together so either side can
//! be listed by prefix, and `presence` (`user\0` + big-endian node id →
//! online byte, last seen as big-endian unix ms). Never reads past
//! `MEMBERSHIP_READ_MAX` keys (`PRESENCE_NODES_MAX` for presence).

use anyhow::{Context, Result};
use chat_protocol::records::PresenceEntry;

use chat_protocol::store_wire::MemberRole;

use super::{be_u64, key, text, Embedded};
use crate::store::{Presence, MEMBERSHIP_READ_MAX, PRESENCE_NODES_MAX};

/// A member's value: admin (1 byte), joined id (big-endian u64). Empty for
/// a member written before roles: not an admin, joined 0.
fn role_value(admin: bool, joined_id: u64) -> [u8; 9] {
    let mut value = [0u8; 9];
    value[0] = u8::from(admin);
    value[1..].copy_from_slice(&joined_id.to_be_bytes());
    value
}

fn decode_role(value: &[u8]) -> Result<(bool, u64)> {
    match value.len() {
        0 => Ok((false, 0)),
        9 => Ok((value[0] != 0, u64::from_be_bytes(value[1..].try_into()?))),
        _ => anyhow::bail!("bad group member value in store"),
    }
}

impl Embedded {
    pub(super) fn add_members_to(&self, group: &str, members: &[&str]) -> Result<()> {
        for member in members {
            self.members.insert(key(&[group, member], None), [])?;
            self.member_of.insert(key(&[member, group], None), [])?;
        }
        Ok(())
    }

    pub(super) fn set_member_roles(
        &self,
        group: &str,
        members: &[&str],
        joined_id: Option<u64>,
        admin: Option<bool>,
    ) -> Result<()> {
        for member in members {
            let row = key(&[group, member], None);
            let Some(value) = self.members.get(&row)? else {
                continue;
            };
            let (was_admin, was_joined) = decode_role(&value)?;
            let value = role_value(admin.unwrap_or(was_admin), joined_id.unwrap_or(was_joined));
            self.members.insert(row, value)?;
        }
        Ok(())
    }

    pub(super) fn member_roles_of(&self, group: &str) -> Result<Vec<MemberRole>> {
        let start = key(&[group], None);
        let mut out = Vec::new();
        for item in self.members.prefix(&start).take(MEMBERSHIP_READ_MAX) {
            let (k, value) = item?;
            let rest = &k[start.len()..];
            let (admin, joined_id) = decode_role(&value)?;
            out.push(MemberRole {
                user: text(rest.strip_suffix(&[0]).unwrap_or(rest))?,
                admin,
                joined_id,
            });
        }
        Ok(out)
    }

    pub(super) fn remove_members_from(&self, group: &str, members: &[&str]) -> Result<()> {
        for member in members {
            self.members.remove(key(&[group, member], None))?;
            self.member_of.remove(key(&[member, group], None))?;
        }
        Ok(())
    }

    /// The second key part of every key under `prefix\0`, in key order.
    fn listed(partition: &fjall::PartitionHandle, prefix: &str) -> Result<Vec<String>> {
        let start = key(&[prefix], None);
        let mut out = Vec::new();
        for item in partition.prefix(&start).take(MEMBERSHIP_READ_MAX) {
            let (k, _) = item?;
            let rest = &k[start.len()..];
            out.push(text(rest.strip_suffix(&[0]).unwrap_or(rest))?);
        }
        Ok(out)
    }

    pub(super) fn groups_of_user(&self, user: &str) -> Result<Vec<String>> {
        Self::listed(&self.member_of, user)
    }

    pub(super) fn put_presence_entries(
        &self,
        node: u16,
        entries: &[PresenceEntry<'_>],
    ) -> Result<()> {
        for entry in entries {
            let mut row = key(&[entry.user], None);
            row.extend_from_slice(&node.to_be_bytes());
            let mut value = [0u8; 9];
            value[0] = u8::from(entry.online);
            value[1..].copy_from_slice(&entry.last_seen_ms.to_be_bytes());
            self.presence.insert(row, value)?;
        }
        Ok(())
    }

    /// Offline rows last seen before `seen_before_ms`, up to `limit`. Scans
    /// from the start each call: rows removed by the call before are gone,
    /// so a pass reads each kept row once per batch it removes.
    pub(super) fn expire_presence_before(
        &self,
        seen_before_ms: u64,
        limit: usize,
    ) -> Result<usize> {
        let mut old = Vec::new();
        for item in self.presence.iter() {
            let (row, value) = item?;
            let online = *value.first().context("bad presence row")? != 0;
            if !online && be_u64(&value[1..])? < seen_before_ms {
                old.push(row);
                if old.len() == limit {
                    break;
                }
            }
        }
        for row in &old {
            self.presence.remove(row.as_ref())?;
        }
        Ok(old.len())
    }

    pub(super) fn presence_of(&self, user: &str) -> Result<Vec<Presence>> {
        let mut rows = Vec::new();
        for item in self
            .presence
            .prefix(key(&[user], None))
            .take(PRESENCE_NODES_MAX)
        {
            let (_, value) = item?;
            anyhow::ensure!(value.len() == 9, "bad presence value in store");
            rows.push(Presence {
                online: value[0] != 0,
                last_seen_ms: u64::from_be_bytes(value[1..].try_into()?),
            });
        }
        Ok(rows)
    }
}
