//! Versioned schema migrations for every backend: a database records which
//! numbered steps it has had, and a writer applies the ones it lacks, in
//! order, once, before it serves.
//!
//! Owns the step lists (the files in `schema/postgres/` and `schema/scylla/`,
//! the embedded store's steps as code), the version rules and the refusal
//! to run on a database newer than this build. Each backend applies a step
//! its own way (PostgreSQL: one transaction per step under an advisory lock;
//! ScyllaDB: idempotent statements, then the version row; the embedded
//! store: a version key in its `meta` partition). A step is never edited
//! once released: a change is a new step. Never touches rows a step does
//! not name.

use anyhow::{bail, Result};

/// One numbered schema change.
#[derive(Debug)]
pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub statements: &'static str,
}

/// PostgreSQL's steps (`schema/postgres/NNNN_name.sql`).
pub const POSTGRES: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial",
        statements: include_str!("../../schema/postgres/0001_initial.sql"),
    },
    Migration {
        version: 2,
        name: "push_targets",
        statements: include_str!("../../schema/postgres/0002_push_targets.sql"),
    },
    Migration {
        version: 3,
        name: "group_roles",
        statements: include_str!("../../schema/postgres/0003_group_roles.sql"),
    },
    Migration {
        version: 4,
        name: "group_settings",
        statements: include_str!("../../schema/postgres/0004_group_settings.sql"),
    },
    Migration {
        version: 5,
        name: "sends_expiry",
        statements: include_str!("../../schema/postgres/0005_sends_expiry.sql"),
    },
    Migration {
        version: 6,
        name: "presence_expiry",
        statements: include_str!("../../schema/postgres/0006_presence_expiry.sql"),
    },
    Migration {
        version: 7,
        name: "partitioned_messages",
        statements: include_str!("../../schema/postgres/0007_partitioned_messages.sql"),
    },
    Migration {
        version: 8,
        name: "devices_seen",
        statements: include_str!("../../schema/postgres/0008_devices_seen.sql"),
    },
];

#[cfg_attr(not(feature = "scylla"), allow(dead_code))]
/// ScyllaDB's steps (`schema/scylla/NNNN_name.cql`), keyspace named `chat`
/// (replaced by `--scylla-keyspace`).
pub const SCYLLA: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial",
        statements: include_str!("../../schema/scylla/0001_initial.cql"),
    },
    Migration {
        version: 2,
        name: "push_targets",
        statements: include_str!("../../schema/scylla/0002_push_targets.cql"),
    },
    Migration {
        version: 3,
        name: "group_roles",
        statements: include_str!("../../schema/scylla/0003_group_roles.cql"),
    },
    Migration {
        version: 4,
        name: "group_settings",
        statements: include_str!("../../schema/scylla/0004_group_settings.cql"),
    },
    Migration {
        version: 5,
        name: "sends_expiry",
        statements: include_str!("../../schema/scylla/0005_sends_expiry.cql"),
    },
    Migration {
        version: 6,
        name: "presence_expiry",
        statements: include_str!("../../schema/scylla/0006_presence_expiry.cql"),
    },
    Migration {
        version: 7,
        name: "message_retention",
        statements: include_str!("../../schema/scylla/0007_message_retention.cql"),
    },
    Migration {
        version: 8,
        name: "devices_seen",
        statements: include_str!("../../schema/scylla/0008_devices_seen.cql"),
    },
    Migration {
        version: 9,
        name: "devices_by_seen",
        statements: include_str!("../../schema/scylla/0009_devices_by_seen.cql"),
    },
];

/// The embedded store's version: its partitions are opened (created when
/// missing) by `Embedded::open`, which also runs the steps that fill or
/// remove data.
/// 1: the first layout; 2: `push_targets`; 3: group roles in `members`'
/// values (an empty value is a member from before: no admin, joined 0);
/// 4: `group_settings`; 5: `sends_by_time` (filled from `sends` when the
/// store is opened); 6: presence expiry (no layout change: the cleanup
/// thread reads `presence` as it is); 7: `inbox_by_time` (filled from
/// `inbox` when the store is opened) and `inbox_heads`, for retention; 8:
/// `devices_seen` and `devices_by_seen` (every device known from its
/// cursor, keys or push target counts as seen when the store is opened);
/// 9: `messages`, `inbox` and `inbox_ids` in time buckets that retention
/// drops whole (`embedded::buckets`; the rows so far stay where they are as
/// the legacy bucket) and `inbox_by_time` gone.
pub const EMBEDDED_VERSION: u32 = 9;

/// The steps after `applied`, in order. Refuses a database that a newer
/// build has migrated past what this build knows.
pub fn pending(steps: &'static [Migration], applied: u32) -> Result<&'static [Migration]> {
    let newest = newest(steps);
    if applied > newest {
        bail!(
            "the database's schema is at version {applied}, newer than this storage-writer knows ({newest}): run a newer build"
        );
    }
    let first = steps.partition_point(|step| step.version <= applied);
    Ok(&steps[first..])
}

pub fn newest(steps: &[Migration]) -> u32 {
    steps.last().map_or(0, |step| step.version)
}

#[cfg_attr(not(feature = "scylla"), allow(dead_code))]
/// `statements` split into single statements, comments dropped (for
/// drivers that run one at a time).
pub fn split(statements: &str) -> impl Iterator<Item = String> + '_ {
    statements
        .split(';')
        .map(|statement| {
            statement
                .lines()
                .filter(|line| !line.trim_start().starts_with("--"))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .filter(|statement| !statement.trim().is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_numbered_one_by_one_and_pending_follows_the_applied_version() {
        for steps in [POSTGRES, SCYLLA] {
            for (index, step) in steps.iter().enumerate() {
                assert_eq!(step.version, index as u32 + 1, "{}", step.name);
                assert!(split(step.statements).count() > 0, "{}", step.name);
            }
            assert_eq!(pending(steps, 0).unwrap().len(), steps.len());
            assert_eq!(pending(steps, 1).unwrap()[0].version, 2);
            assert!(pending(steps, newest(steps)).unwrap().is_empty());
            let error = pending(steps, newest(steps) + 1).unwrap_err().to_string();
            assert!(error.contains("newer than this storage-writer"), "{error}");
        }
    }
}
