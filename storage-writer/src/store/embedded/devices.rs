//! The embedded store's record of when each device was last seen, and the
//! expiry of devices not seen for the device retention.
//!
//! Owns two partitions: `devices_seen` (`user\0device\0` → last seen, unix
//! ms, big-endian) and its time index `devices_by_seen` (that time, then the
//! same key → nothing), so the oldest are found without a scan. The index
//! may hold a stale entry (two readers noting one device at once); expiry
//! believes the row, not the index. Never removes a device's rows while its
//! row says it was seen after the cut.

use anyhow::Result;

use super::{be_u64, key, Embedded};

/// A `devices_by_seen` key: the time, then the device's key.
fn by_seen_key(at_ms: u64, device_key: &[u8]) -> Vec<u8> {
    let mut index = at_ms.to_be_bytes().to_vec();
    index.extend_from_slice(device_key);
    index
}

impl Embedded {
    pub(super) fn put_device_seen_at(&self, user: &str, device: &str, at_ms: u64) -> Result<()> {
        let row = key(&[user, device], None);
        if let Some(old) = self.devices_seen.get(&row)? {
            let old = be_u64(&old)?;
            if old >= at_ms {
                return Ok(());
            }
            self.devices_by_seen.remove(by_seen_key(old, &row))?;
        }
        self.devices_by_seen.insert(by_seen_key(at_ms, &row), [])?;
        self.devices_seen.insert(row, at_ms.to_be_bytes())?;
        Ok(())
    }

    /// Counts `user\0device\0` as seen at `at_ms` unless it has a time.
    pub(super) fn seen_if_unknown(&self, device_key: &[u8], at_ms: u64) -> Result<()> {
        if self.devices_seen.get(device_key)?.is_none() {
            self.devices_by_seen
                .insert(by_seen_key(at_ms, device_key), [])?;
            self.devices_seen.insert(device_key, at_ms.to_be_bytes())?;
        }
        Ok(())
    }

    pub(super) fn expire_devices_before(&self, seen_before_ms: u64, limit: usize) -> Result<usize> {
        let old: Vec<_> = self
            .devices_by_seen
            .range(..seen_before_ms.to_be_bytes().to_vec())
            .take(limit)
            .collect::<Result<_, _>>()?;
        let mut removed = 0;
        for (index, _) in &old {
            let (at, row) = index.split_at(8);
            let current = self.devices_seen.get(row)?;
            if current.as_deref() == Some(at) {
                // The device's rows all start with `user\0device\0`.
                self.cursors.remove(row)?;
                self.device_keys.remove(row)?;
                self.push_targets.remove(row)?;
                for item in self.prekeys.prefix(row) {
                    self.prekeys.remove(item?.0)?;
                }
                self.devices_seen.remove(row)?;
                removed += 1;
            }
            self.devices_by_seen.remove(index.as_ref())?;
        }
        Ok(removed)
    }

    /// Removes `user`'s devices' times (account deletion). Returns how many.
    pub(super) fn forget_devices_of(&self, prefix: &[u8]) -> Result<u64> {
        let mut removed = 0;
        for item in self.devices_seen.prefix(prefix) {
            let (row, at) = item?;
            self.devices_by_seen
                .remove(by_seen_key(be_u64(&at)?, &row))?;
            self.devices_seen.remove(row)?;
            removed += 1;
        }
        Ok(removed)
    }
}
