//! How the embedded store's partitions are created, and bringing the
//! options of partitions created by earlier builds up to date.
//!
//! Owns `partition_options` and `upgrade_partition_options`. fjall keeps
//! each partition's options in its folder (`partitions/<name>/config`) and
//! uses those, not the ones passed when the store is opened, so a store
//! made before `manual_journal_persist` was set on its partitions would
//! keep a `write` system call per key forever. Before the keyspace opens,
//! each such file is rewritten with the flag set, through fjall's own
//! encoding of the options (`lsm-tree`'s `Decode` and `Encode`, the
//! version fjall uses: another does not compile). Never touches a file it
//! cannot read back byte for byte: that one is left as it is, with a
//! warning, and its partition works as before.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use fjall::PartitionCreateOptions;
use lsm_tree::coding::{Decode, Encode};

/// How every partition is created. `manual_journal_persist` here, not only
/// on the keyspace (where it covers write batches alone): otherwise each
/// single insert flushes fjall's journal buffer to the kernel, a `write`
/// system call per key, about a quarter of the writer's CPU at 5,000
/// msgs/s (BENCHMARKS.md). Writes reach the journal file when a commit
/// persists them (`Embedded::persist`, with the fsync that makes them
/// durable) and not before; nothing is acknowledged earlier, so a crash
/// loses nothing that was.
pub fn partition_options() -> PartitionCreateOptions {
    PartitionCreateOptions::default().manual_journal_persist(true)
}

/// Sets `manual_journal_persist` in the stored options of every partition
/// of the store at `path` that lacks it. Returns how many files changed.
pub fn upgrade_partition_options(path: &Path) -> Result<usize> {
    let Ok(folders) = std::fs::read_dir(path.join("partitions")) else {
        return Ok(0);
    };
    let mut upgraded = 0;
    for folder in folders {
        let folder = folder?.path();
        let file = folder.join("config");
        let Ok(stored) = std::fs::read(&file) else {
            continue;
        };
        let Some(wanted) = with_manual_persist(&stored) else {
            tracing::warn!(
                file = %file.display(),
                "a partition's options are not in the layout this build knows; left as they are"
            );
            continue;
        };
        if wanted == stored {
            continue;
        }
        // A new file in place of the old, durable before the store opens.
        let next = folder.join("config.upgrading");
        let mut out =
            std::fs::File::create(&next).with_context(|| format!("writing {}", next.display()))?;
        out.write_all(&wanted)?;
        out.sync_all()?;
        std::fs::rename(&next, &file).with_context(|| format!("replacing {}", file.display()))?;
        std::fs::File::open(&folder)?.sync_all()?;
        upgraded += 1;
    }
    Ok(upgraded)
}

/// `stored` with the flag set, or `None` when it does not read back to the
/// same bytes (a layout this build does not know).
fn with_manual_persist(stored: &[u8]) -> Option<Vec<u8>> {
    let options = PartitionCreateOptions::decode_from(&mut &stored[..]).ok()?;
    let mut again = Vec::new();
    options.encode_into(&mut again).ok()?;
    if again != stored {
        return None;
    }
    let mut wanted = Vec::new();
    options
        .manual_journal_persist(true)
        .encode_into(&mut wanted)
        .ok()?;
    Some(wanted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(options: PartitionCreateOptions) -> Vec<u8> {
        let mut bytes = Vec::new();
        options.encode_into(&mut bytes).unwrap();
        bytes
    }

    #[test]
    fn partitions_of_an_earlier_store_get_the_flag_and_keep_their_data() {
        let dir = tempfile::tempdir().unwrap();
        {
            // As an earlier build made them: the default options.
            let keyspace = fjall::Config::new(dir.path()).open().unwrap();
            let partition = keyspace
                .open_partition("messages", PartitionCreateOptions::default())
                .unwrap();
            partition.insert("k", "v").unwrap();
            keyspace.persist(fjall::PersistMode::SyncAll).unwrap();
        }
        let config = dir.path().join("partitions/messages/config");
        let before = std::fs::read(&config).unwrap();
        assert_eq!(before, encoded(PartitionCreateOptions::default()));
        assert_eq!(upgrade_partition_options(dir.path()).unwrap(), 1);
        assert_eq!(
            std::fs::read(&config).unwrap(),
            encoded(partition_options())
        );
        // Once only; and a file in a layout it does not know is left alone.
        assert_eq!(upgrade_partition_options(dir.path()).unwrap(), 0);
        std::fs::create_dir(dir.path().join("partitions/odd")).unwrap();
        std::fs::write(dir.path().join("partitions/odd/config"), b"not options").unwrap();
        assert_eq!(upgrade_partition_options(dir.path()).unwrap(), 0);
        assert_eq!(
            std::fs::read(dir.path().join("partitions/odd/config")).unwrap(),
            b"not options"
        );
        std::fs::remove_dir_all(dir.path().join("partitions/odd")).unwrap();
        // fjall opens the upgraded store, with its data.
        let keyspace = fjall::Config::new(dir.path()).open().unwrap();
        let partition = keyspace
            .open_partition("messages", partition_options())
            .unwrap();
        assert_eq!(&*partition.get("k").unwrap().unwrap(), b"v");
    }

    #[test]
    fn a_store_without_partitions_needs_nothing() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(upgrade_partition_options(dir.path()).unwrap(), 0);
        assert_eq!(
            upgrade_partition_options(&dir.path().join("absent")).unwrap(),
            0
        );
    }
}
