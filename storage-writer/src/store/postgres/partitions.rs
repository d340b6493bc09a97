//! PostgreSQL's time partitions of `messages` and `inbox` (migration 7):
//! creating them ahead, dropping them whole behind the retention, and
//! trimming the DEFAULT partitions, which hold rows from before the
//! migration and any row that came before its partition existed.
//!
//! Owns the partitions' names (`messages_p<start unix ms>`,
//! `inbox_p<start unix ms>`; ranges of message id over windows of
//! `--postgres-partition-ms` from the epoch) and the only SQL the backend
//! builds from strings: DDL names and bounds, made of integers alone. Never
//! drops a partition whose window retention still covers, and never holds a
//! lock that stalls commits for longer than `DDL_LOCK_TIMEOUT`.

use anyhow::Result;
use chat_protocol::snowflake;
use postgres::GenericClient;

use super::super::Expired;

/// Windows created ahead of the current one (rows never wait for one).
const WINDOWS_AHEAD: u64 = 3;
/// How long DDL waits for the parent's lock before it gives up until the
/// next pass (a commit waits behind it meanwhile).
const DDL_LOCK_TIMEOUT: &str = "200ms";
/// The partitioned tables, each with its DEFAULT partition `<table>_default`.
const TABLES: [&str; 2] = ["messages", "inbox"];

/// Creates the partitions of the window holding `now_ms` and the next
/// `WINDOWS_AHEAD`, where missing. A window whose rows already went to
/// DEFAULT cannot get its partition (PostgreSQL refuses): it stays in
/// DEFAULT, which is trimmed row by row. Returns how many were created.
pub fn create_ahead(client: &mut impl GenericClient, now_ms: u64, width_ms: u64) -> Result<usize> {
    let first = now_ms / width_ms * width_ms;
    let existing = partitions(client)?;
    let mut created = 0;
    for window in 0..=WINDOWS_AHEAD {
        let start_ms = first + window * width_ms;
        for table in TABLES {
            let name = format!("{table}_p{start_ms}");
            if existing.iter().any(|p| p.name == name) {
                continue;
            }
            let (from, to) = (
                snowflake::first_id_at(start_ms),
                snowflake::first_id_at(start_ms + width_ms),
            );
            let ddl = format!(
                "SET LOCAL lock_timeout = '{DDL_LOCK_TIMEOUT}'; \
                 CREATE TABLE IF NOT EXISTS {name} PARTITION OF {table} FOR VALUES FROM ({from}) TO ({to})"
            );
            // A savepoint each: one window refused leaves the others.
            let mut step = client.transaction()?;
            match step.batch_execute(&ddl) {
                Ok(()) => {
                    step.commit()?;
                    created += 1;
                }
                Err(error) => {
                    drop(step);
                    tracing::debug!(%name, %error, "partition not created (rows in DEFAULT, or another writer)");
                }
            }
        }
    }
    Ok(created)
}

/// Drops the oldest partition whose whole window is before `before_id`
/// (one per call, its bytes counted), else removes up to `limit` old rows
/// from each DEFAULT partition.
pub fn expire(client: &mut impl GenericClient, before_id: u64, limit: usize) -> Result<Expired> {
    let mut behind: Vec<Partition> = partitions(client)?
        .into_iter()
        .filter(|p| p.to_id <= before_id)
        .collect();
    behind.sort_by_key(|p| p.to_id);
    if let Some(oldest) = behind.first() {
        let row = client.query_one(
            "SELECT pg_total_relation_size(c.oid)::bigint, GREATEST(c.reltuples, 0)::bigint \
             FROM pg_class c WHERE c.relname = $1",
            &[&oldest.name],
        )?;
        let (bytes, rows) = (row.get::<_, i64>(0), row.get::<_, i64>(1));
        client.batch_execute(&format!(
            "SET LOCAL lock_timeout = '{DDL_LOCK_TIMEOUT}'; DROP TABLE IF EXISTS {}",
            oldest.name
        ))?;
        tracing::info!(partition = %oldest.name, bytes, "dropped a partition behind the retention");
        return Ok(Expired {
            rows: rows as u64,
            bytes: bytes as u64,
            more: true,
        });
    }
    let before = before_id as i64;
    let limit = limit as i64;
    let inbox = client.execute(
        "DELETE FROM inbox_default WHERE ctid = ANY(ARRAY( \
             SELECT ctid FROM inbox_default WHERE message_id < $1 LIMIT $2))",
        &[&before, &limit],
    )?;
    let messages = client.execute(
        "DELETE FROM messages_default WHERE ctid = ANY(ARRAY( \
             SELECT ctid FROM messages_default WHERE message_id < $1 LIMIT $2))",
        &[&before, &limit],
    )?;
    Ok(Expired {
        rows: inbox + messages,
        bytes: 0,
        more: inbox as i64 == limit || messages as i64 == limit,
    })
}

/// One range partition of `messages` or `inbox`.
#[derive(Debug)]
struct Partition {
    name: String,
    /// Its upper bound, exclusive.
    to_id: u64,
}

/// The range partitions of both tables (DEFAULT ones are not listed).
fn partitions(client: &mut impl GenericClient) -> Result<Vec<Partition>> {
    let rows = client.query(
        "SELECT c.relname::text, pg_get_expr(c.relpartbound, c.oid) \
         FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent IN ('messages'::regclass, 'inbox'::regclass)",
        &[],
    )?;
    Ok(rows
        .into_iter()
        .filter_map(|row| {
            let name: String = row.get(0);
            let bound: String = row.get(1);
            upper_bound(&bound).map(|to_id| Partition { name, to_id })
        })
        .collect())
}

/// The upper bound of `FOR VALUES FROM (a) TO (b)` (None for DEFAULT).
fn upper_bound(expression: &str) -> Option<u64> {
    let (_, to) = expression.split_once(" TO (")?;
    to.trim_end_matches(')').trim_matches('\'').parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_upper_bound_is_read_from_the_catalogs_text() {
        assert_eq!(
            super::upper_bound("FOR VALUES FROM ('100') TO ('250')"),
            Some(250)
        );
        assert_eq!(
            super::upper_bound("FOR VALUES FROM (100) TO (250)"),
            Some(250)
        );
        assert_eq!(super::upper_bound("DEFAULT"), None);
    }
}
