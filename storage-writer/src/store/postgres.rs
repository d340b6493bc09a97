//! The PostgreSQL backend: small clusters, and several nodes sharing one database.
//!
//! Owns applying the schema's migrations (`schema/postgres/`, one
//! transaction per step, under an advisory lock so writers starting together
//! do not race; the applied steps in `schema_migrations`), one transaction per batch, and
//! the per-user inbox counter (`inbox_heads`), whose row lock keeps sequences
//! gap-free when writers on several nodes append to one user's inbox. Never
//! reads or writes outside a statement's parameters (no string-built SQL),
//! except the partition DDL in `partitions`, built from integers alone.

mod partitions;

use anyhow::{Context, Result};
use chat_protocol::store_wire::{MemberRole, RecentSend};
use postgres::{Client, GenericClient, NoTls, Statement};

use std::collections::BTreeMap;

use chat_protocol::records::{AckRecord, MessageRecord, PresenceEntry};
use std::borrow::Cow;

use chat_protocol::keys::{Bundle, STORED_PREKEYS_MAX};

use super::{Backend, BatchWriter, Cursor, DeviceKeys, InboxEntry, Presence, ReadRefused, Tables};

/// Arbitrary, fixed: serialises schema set-up across writers.
const SCHEMA_LOCK: i64 = 0x63_68_61_74;

pub struct PostgresBackend {
    url: String,
    /// The window of one partition, in ms (every writer of a database must
    /// use the same; a different one applies only past the windows made).
    partition_ms: u64,
}

impl PostgresBackend {
    /// With partitions of `POSTGRES_PARTITION_MS_DEFAULT`.
    #[cfg(test)]
    pub fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, super::POSTGRES_PARTITION_MS_DEFAULT)
    }

    pub fn connect_with(url: &str, partition_ms: u64) -> Result<Self> {
        anyhow::ensure!(
            partition_ms >= 1000,
            "--postgres-partition-ms must be at least 1000"
        );
        let mut client = Client::connect(url, NoTls).context("connecting to PostgreSQL")?;
        client.execute("SELECT pg_advisory_lock($1)", &[&SCHEMA_LOCK])?;
        let applied = migrate(&mut client);
        client.execute("SELECT pg_advisory_unlock($1)", &[&SCHEMA_LOCK])?;
        applied?;
        // Before the first commit: its rows then have a partition to go to.
        let mut transaction = client.transaction()?;
        partitions::create_ahead(&mut transaction, super::unix_ms_now(), partition_ms)?;
        transaction.commit()?;
        Ok(Self {
            url: url.to_owned(),
            partition_ms,
        })
    }
}

/// Applies the steps this database lacks, each in its own transaction with
/// its version row (a step is all or nothing). The caller holds the lock.
fn migrate(client: &mut Client) -> Result<()> {
    client.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (\
             version    INTEGER PRIMARY KEY,\
             name       TEXT NOT NULL,\
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    )?;
    let row = client.query_one(
        "SELECT COALESCE(max(version), 0) FROM schema_migrations",
        &[],
    )?;
    let applied = u32::try_from(row.get::<_, i32>(0)).unwrap_or(0);
    for step in super::migrations::pending(super::migrations::POSTGRES, applied)? {
        let mut transaction = client.transaction()?;
        transaction
            .batch_execute(step.statements)
            .with_context(|| format!("applying migration {} ({})", step.version, step.name))?;
        transaction.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[&(step.version as i32), &step.name],
        )?;
        transaction.commit()?;
        tracing::info!(
            version = step.version,
            name = step.name,
            "PostgreSQL schema migrated"
        );
    }
    Ok(())
}

impl Backend for PostgresBackend {
    fn name(&self) -> &'static str {
        "postgres"
    }
    fn writer(&self) -> Result<Box<dyn BatchWriter>> {
        Ok(Box::new(PostgresWriter {
            url: self.url.clone(),
            client: None,
            statements: Statements::default(),
            partition_ms: self.partition_ms,
        }))
    }
    fn reader(&self) -> Result<Box<dyn Tables + Send>> {
        Ok(Box::new(Pg {
            client: Client::connect(&self.url, NoTls)?,
            statements: Statements::default(),
            for_update: false,
            partition_ms: self.partition_ms,
        }))
    }
}

/// Reconnects lazily, so a database restart costs retried batches, not the process.
struct PostgresWriter {
    url: String,
    client: Option<Client>,
    /// Prepared on this connection; dropped with it.
    statements: Statements,
    partition_ms: u64,
}

/// Statements prepared once per connection (a statement prepared inside a
/// transaction stays prepared for the session).
#[derive(Default)]
struct Statements(std::collections::HashMap<&'static str, Statement>);

impl BatchWriter for PostgresWriter {
    fn write_batch(&mut self, work: &mut dyn FnMut(&mut dyn Tables) -> Result<()>) -> Result<()> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.statements = Statements::default();
            self.client = Some(Client::connect(&self.url, NoTls).context("reconnecting")?);
        }
        let client = self.client.as_mut().expect("connected above");
        let transaction = client.transaction()?;
        let mut tables = Pg {
            client: transaction,
            statements: std::mem::take(&mut self.statements),
            for_update: true,
            partition_ms: self.partition_ms,
        };
        let result = work(&mut tables);
        self.statements = std::mem::take(&mut tables.statements);
        result?;
        tables.client.commit()?;
        Ok(())
    }
}

/// The tables over a client or a transaction.
struct Pg<C> {
    client: C,
    statements: Statements,
    /// Lock rows read for update (inside a batch's transaction).
    for_update: bool,
    /// The window of one partition, in ms.
    partition_ms: u64,
}

/// Stores a revocation (or the record of a deletion); a later one of the
/// same scope wins.
const PUT_REVOCATION: &str =
    "INSERT INTO revocations (user_id, device_id, at_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (user_id, device_id) DO UPDATE SET \
             at_ms = GREATEST(revocations.at_ms, EXCLUDED.at_ms)";

/// Takes the transaction-scoped advisory lock of each group in `$1`, in
/// sorted order (so two writers never wait on each other in a cycle).
const LOCK_GROUPS: &str = "SELECT pg_advisory_xact_lock(hashtextextended(g, 7)) \
             FROM (SELECT g FROM UNNEST($1::text[]) AS t(g) ORDER BY g) AS sorted";

fn id(value: u64) -> i64 {
    value as i64
}

impl<C: GenericClient> Pg<C> {
    /// `sql`, prepared on first use.
    fn prepared(&mut self, sql: &'static str) -> Result<Statement> {
        if let Some(statement) = self.statements.0.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql)?;
        self.statements.0.insert(sql, statement.clone());
        Ok(statement)
    }
}

impl<C: GenericClient + Send> Tables for Pg<C> {
    fn message(&mut self, conversation: &str, message_id: u64) -> Result<Option<Vec<u8>>> {
        let statement = self
            .prepared("SELECT record FROM messages WHERE conversation = $1 AND message_id = $2")?;
        let row = self
            .client
            .query_opt(&statement, &[&conversation, &id(message_id)])?;
        Ok(row.map(|row| row.get(0)))
    }

    fn messages(&mut self, keys: &[(&str, u64)]) -> Result<Vec<Option<Vec<u8>>>> {
        if keys.len() <= 1 {
            return keys.iter().map(|(c, m)| self.message(c, *m)).collect();
        }
        let statement = self.prepared(
            "SELECT m.conversation, m.message_id, m.record FROM messages m \
             JOIN UNNEST($1::text[], $2::bigint[]) AS k(conversation, message_id) \
             ON m.conversation = k.conversation AND m.message_id = k.message_id",
        )?;
        let conversations: Vec<&str> = keys.iter().map(|(c, _)| *c).collect();
        let ids: Vec<i64> = keys.iter().map(|(_, m)| id(*m)).collect();
        let mut found: std::collections::HashMap<(String, i64), Vec<u8>> = self
            .client
            .query(&statement, &[&conversations, &ids])?
            .into_iter()
            .map(|row| ((row.get(0), row.get(1)), row.get(2)))
            .collect();
        Ok(keys
            .iter()
            .map(|(c, m)| found.remove(&((*c).to_owned(), id(*m))))
            .collect())
    }

    fn put_message(&mut self, conversation: &str, message_id: u64, record: &[u8]) -> Result<()> {
        let statement = self.prepared(
            "INSERT INTO messages (conversation, message_id, record) VALUES ($1, $2, $3) \
             ON CONFLICT DO NOTHING",
        )?;
        self.client
            .execute(&statement, &[&conversation, &id(message_id), &record])?;
        Ok(())
    }

    fn replace_message(
        &mut self,
        conversation: &str,
        message_id: u64,
        record: &[u8],
    ) -> Result<()> {
        let statement = self.prepared(
            "UPDATE messages SET record = $3 WHERE conversation = $1 AND message_id = $2",
        )?;
        self.client
            .execute(&statement, &[&conversation, &id(message_id), &record])?;
        Ok(())
    }

    fn history(
        &mut self,
        conversation: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Vec<u8>>> {
        let statement = self.prepared(
            "SELECT record FROM messages WHERE conversation = $1 AND message_id < $2 \
             ORDER BY message_id DESC LIMIT $3",
        )?;
        let before = id(before.unwrap_or(i64::MAX as u64));
        let rows = self
            .client
            .query(&statement, &[&conversation, &before, &(limit as i64)])?;
        Ok(rows.into_iter().map(|row| row.get(0)).collect())
    }

    fn put_send_if_absent(
        &mut self,
        user: &str,
        device: &str,
        client_msg_id: &str,
        message_id: u64,
        conversation: &str,
    ) -> Result<()> {
        let statement = self.prepared(
            "INSERT INTO sends (user_id, device_id, client_msg_id, message_id, conversation) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        )?;
        self.client.execute(
            &statement,
            &[
                &user,
                &device,
                &client_msg_id,
                &id(message_id),
                &conversation,
            ],
        )?;
        Ok(())
    }

    fn send_of(&mut self, user: &str, device: &str, client_msg_id: &str) -> Result<Option<u64>> {
        let statement = self.prepared(
            "SELECT message_id FROM sends WHERE user_id = $1 AND device_id = $2 AND client_msg_id = $3",
        )?;
        let row = self
            .client
            .query_opt(&statement, &[&user, &device, &client_msg_id])?;
        Ok(row.map(|row| row.get::<_, i64>(0) as u64))
    }

    fn recent_sends(
        &mut self,
        user: &str,
        device: &str,
        since_message_id: u64,
        limit: usize,
    ) -> Result<Vec<RecentSend>> {
        let statement = self.prepared(
            "SELECT client_msg_id, message_id, conversation FROM sends \
             WHERE user_id = $1 AND device_id = $2 AND message_id >= $3 \
             ORDER BY message_id DESC LIMIT $4",
        )?;
        let rows = self.client.query(
            &statement,
            &[&user, &device, &id(since_message_id), &(limit as i64)],
        )?;
        Ok(rows
            .into_iter()
            .map(|row| RecentSend {
                client_msg_id: row.get(0),
                message_id: row.get::<_, i64>(1) as u64,
                conversation: row.get(2),
            })
            .collect())
    }

    fn append_inbox(
        &mut self,
        user: &str,
        message_id: u64,
        conversation: &str,
        origin_device: &str,
    ) -> Result<u64> {
        // One statement: advance the user's counter (its row lock serialises
        // writers on several nodes until this transaction ends) and insert.
        let statement = self.prepared(
            "WITH head AS ( \
                 INSERT INTO inbox_heads (user_id, seq) VALUES ($1, 1) \
                 ON CONFLICT (user_id) DO UPDATE SET seq = inbox_heads.seq + 1 \
                 RETURNING seq) \
             INSERT INTO inbox (user_id, seq, message_id, conversation, origin_device) \
             SELECT $1, seq, $2, $3, $4 FROM head RETURNING seq",
        )?;
        let row = self.client.query_one(
            &statement,
            &[&user, &id(message_id), &conversation, &origin_device],
        )?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    fn inbox_entry_of(&mut self, user: &str, message_id: u64) -> Result<Option<(u64, String)>> {
        let statement = self.prepared(
            "SELECT seq, conversation FROM inbox WHERE user_id = $1 AND message_id = $2",
        )?;
        let row = self
            .client
            .query_opt(&statement, &[&user, &id(message_id)])?;
        Ok(row.map(|row| (row.get::<_, i64>(0) as u64, row.get(1))))
    }

    fn inbox_after(&mut self, user: &str, after: u64, limit: usize) -> Result<Vec<InboxEntry>> {
        let statement = self.prepared(
            "SELECT seq, message_id, conversation, origin_device FROM inbox \
             WHERE user_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )?;
        let rows = self
            .client
            .query(&statement, &[&user, &id(after), &(limit as i64)])?;
        Ok(rows
            .into_iter()
            .map(|row| InboxEntry {
                seq: row.get::<_, i64>(0) as u64,
                message_id: row.get::<_, i64>(1) as u64,
                conversation: row.get(2),
                origin_device: row.get(3),
            })
            .collect())
    }

    fn inbox_head(&mut self, user: &str) -> Result<u64> {
        let statement = self.prepared("SELECT seq FROM inbox_heads WHERE user_id = $1")?;
        let row = self.client.query_opt(&statement, &[&user])?;
        Ok(row.map_or(0, |row| row.get::<_, i64>(0) as u64))
    }

    fn expire_messages(&mut self, before_id: u64, limit: usize) -> Result<super::Expired> {
        partitions::expire(&mut self.client, before_id, limit)
    }

    fn partitions_ahead(&mut self, now_ms: u64) -> Result<usize> {
        partitions::create_ahead(&mut self.client, now_ms, self.partition_ms)
    }

    fn cursor(&mut self, user: &str, device: &str) -> Result<Cursor> {
        let statement = if self.for_update {
            self.prepared(
                "SELECT state FROM cursors WHERE user_id = $1 AND device_id = $2 FOR UPDATE",
            )?
        } else {
            self.prepared("SELECT state FROM cursors WHERE user_id = $1 AND device_id = $2")?
        };
        match self.client.query_opt(&statement, &[&user, &device])? {
            Some(row) => Ok(Cursor::decode(row.get::<_, &[u8]>(0))?),
            None => Ok(Cursor::default()),
        }
    }

    fn put_cursor(&mut self, user: &str, device: &str, cursor: &Cursor) -> Result<()> {
        let statement = self.prepared(
            "INSERT INTO cursors (user_id, device_id, state) VALUES ($1, $2, $3) \
             ON CONFLICT (user_id, device_id) DO UPDATE SET state = EXCLUDED.state",
        )?;
        self.client
            .execute(&statement, &[&user, &device, &cursor.encode()])?;
        Ok(())
    }

    fn revoke(&mut self, user: &str, device: Option<&str>, at_ms: u64) -> Result<u32> {
        let store = self.prepared(PUT_REVOCATION)?;
        // '' matches every device of the user.
        let keys = self.prepared(
            "DELETE FROM device_keys WHERE user_id = $1 AND ($2 = '' OR device_id = $2)",
        )?;
        let prekeys = self
            .prepared("DELETE FROM prekeys WHERE user_id = $1 AND ($2 = '' OR device_id = $2)")?;
        let push = self.prepared(
            "DELETE FROM push_targets WHERE user_id = $1 AND ($2 = '' OR device_id = $2)",
        )?;
        let scope = device.unwrap_or("");
        let at_ms = i64::try_from(at_ms)?;
        let mut transaction = self.client.transaction()?;
        transaction.execute(&store, &[&user, &scope, &at_ms])?;
        let removed = transaction.execute(&keys, &[&user, &scope])?;
        transaction.execute(&prekeys, &[&user, &scope])?;
        transaction.execute(&push, &[&user, &scope])?;
        transaction.commit()?;
        Ok(u32::try_from(removed).unwrap_or(u32::MAX))
    }

    fn delete_account(&mut self, user: &str, at_ms: u64) -> Result<super::AccountRemoved> {
        // Every table with a user_id column, the ones a user's rows are in
        // (`rows_naming`, in the tests, finds any table this list misses).
        const TABLES: [&str; 9] = [
            "DELETE FROM sends WHERE user_id = $1",
            "DELETE FROM inbox WHERE user_id = $1",
            "DELETE FROM inbox_heads WHERE user_id = $1",
            "DELETE FROM cursors WHERE user_id = $1",
            "DELETE FROM device_keys WHERE user_id = $1",
            "DELETE FROM prekeys WHERE user_id = $1",
            "DELETE FROM push_targets WHERE user_id = $1",
            "DELETE FROM presence WHERE user_id = $1",
            "DELETE FROM devices_seen WHERE user_id = $1",
        ];
        // The revocation of every device ('') stays: old tokens stay
        // refused; so does the record of a deletion ($2), rewritten below.
        let revocations = self
            .prepared("DELETE FROM revocations WHERE user_id = $1 AND device_id NOT IN ('', $2)")?;
        let mut statements = Vec::with_capacity(TABLES.len());
        for sql in TABLES {
            statements.push(self.prepared(sql)?);
        }
        let groups_of = self
            .prepared("SELECT group_id FROM group_members WHERE user_id = $1 ORDER BY group_id")?;
        let leave = self.prepared("DELETE FROM group_members WHERE user_id = $1")?;
        let lock = self.prepared(LOCK_GROUPS)?;
        let mark = self.prepared(PUT_REVOCATION)?;
        let at_ms = i64::try_from(at_ms)?;
        let mut transaction = self.client.transaction()?;
        let mut rows = 0;
        let scope = super::ACCOUNT_DELETED_SCOPE;
        for statement in &statements {
            rows += transaction.execute(statement, &[&user])?;
        }
        rows += transaction.execute(&revocations, &[&user, &scope])?;
        // Leaving the groups takes their locks, as a membership change in a
        // batch does, so no writer checks a group's bound meanwhile.
        let groups: Vec<String> = transaction
            .query(&groups_of, &[&user])?
            .iter()
            .map(|row| row.get(0))
            .collect();
        transaction.query(&lock, &[&groups])?;
        rows += transaction.execute(&leave, &[&user])?;
        transaction.execute(&mark, &[&user, &scope, &at_ms])?;
        transaction.commit()?;
        Ok(super::AccountRemoved { rows, groups })
    }

    fn put_device_seen(&mut self, user: &str, device: &str, at_ms: u64) -> Result<()> {
        let statement = self.prepared(
            "INSERT INTO devices_seen (user_id, device_id, last_seen_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (user_id, device_id) DO UPDATE SET \
             last_seen_ms = GREATEST(devices_seen.last_seen_ms, EXCLUDED.last_seen_ms)",
        )?;
        // Not worth a WAL flush of its own (one per connection): the next
        // commit's flush carries it.
        let asynchronous = self.prepared("SET LOCAL synchronous_commit TO OFF")?;
        let mut transaction = self.client.transaction()?;
        transaction.execute(&asynchronous, &[])?;
        transaction.execute(&statement, &[&user, &device, &id(at_ms)])?;
        transaction.commit()?;
        Ok(())
    }

    fn account_deleted_at(&mut self, user: &str) -> Result<Option<u64>> {
        let statement =
            self.prepared("SELECT at_ms FROM revocations WHERE user_id = $1 AND device_id = $2")?;
        let scope = super::ACCOUNT_DELETED_SCOPE;
        let row = self.client.query_opt(&statement, &[&user, &scope])?;
        Ok(row.map(|row| row.get::<_, i64>(0).max(0) as u64))
    }

    fn revoked_at(&mut self, user: &str, device: &str) -> Result<Option<u64>> {
        let statement = self.prepared(
            "SELECT max(at_ms) FROM revocations WHERE user_id = $1 AND device_id IN ($2, '')",
        )?;
        let row = self.client.query_one(&statement, &[&user, &device])?;
        let at: Option<i64> = row.get(0);
        Ok(at.map(|at| at.max(0) as u64))
    }

    fn put_push_target(&mut self, user: &str, device: &str, target: Option<&[u8]>) -> Result<()> {
        match target {
            Some(target) => {
                let statement = self.prepared(
                    "INSERT INTO push_targets (user_id, device_id, target, updated_ms) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (user_id, device_id) DO UPDATE \
                     SET target = EXCLUDED.target, updated_ms = EXCLUDED.updated_ms",
                )?;
                let now = super::unix_ms_now() as i64;
                self.client
                    .execute(&statement, &[&user, &device, &target, &now])?;
            }
            None => {
                let statement = self
                    .prepared("DELETE FROM push_targets WHERE user_id = $1 AND device_id = $2")?;
                self.client.execute(&statement, &[&user, &device])?;
            }
        }
        Ok(())
    }

    fn push_targets(&mut self, user: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let statement = self.prepared(
            "SELECT device_id, target FROM push_targets WHERE user_id = $1 ORDER BY device_id",
        )?;
        let rows = self.client.query(&statement, &[&user])?;
        Ok(rows
            .iter()
            .take(super::PUSH_TARGETS_PER_USER_MAX)
            .map(|row| (row.get(0), row.get(1)))
            .collect())
    }

    fn devices_of(&mut self, user: &str) -> Result<Vec<String>> {
        let statement = self.prepared(
            "SELECT device_id FROM device_keys WHERE user_id = $1 ORDER BY device_id LIMIT 1024",
        )?;
        let rows = self.client.query(&statement, &[&user])?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    fn add_members(&mut self, group: &str, members: &[&str]) -> Result<()> {
        let statement = self.prepared(
            "INSERT INTO group_members (group_id, user_id) \
             SELECT $1, * FROM UNNEST($2::text[]) ON CONFLICT DO NOTHING",
        )?;
        self.client.execute(&statement, &[&group, &members])?;
        Ok(())
    }

    fn remove_members(&mut self, group: &str, members: &[&str]) -> Result<()> {
        let statement = self.prepared(
            "DELETE FROM group_members WHERE group_id = $1 AND user_id = ANY($2::text[])",
        )?;
        self.client.execute(&statement, &[&group, &members])?;
        Ok(())
    }

    fn set_roles(
        &mut self,
        group: &str,
        members: &[&str],
        joined_id: Option<u64>,
        admin: Option<bool>,
    ) -> Result<()> {
        let statement = self.prepared(
            "UPDATE group_members SET joined_id = COALESCE($3, joined_id), admin = COALESCE($4, admin) \
             WHERE group_id = $1 AND user_id = ANY($2::text[])",
        )?;
        let joined = joined_id.map(|id| id as i64);
        self.client
            .execute(&statement, &[&group, &members, &joined, &admin])?;
        Ok(())
    }

    fn member_roles(&mut self, group: &str) -> Result<Vec<MemberRole>> {
        let statement = self.prepared(
            "SELECT user_id, admin, joined_id FROM group_members WHERE group_id = $1 ORDER BY user_id LIMIT $2",
        )?;
        let limit = super::MEMBERSHIP_READ_MAX as i64;
        let rows = self.client.query(&statement, &[&group, &limit])?;
        Ok(rows
            .iter()
            .map(|row| MemberRole {
                user: row.get(0),
                admin: row.get(1),
                joined_id: row.get::<_, i64>(2).max(0) as u64,
            })
            .collect())
    }

    fn expire_sends(&mut self, before_id: u64, limit: usize) -> Result<usize> {
        let statement = self.prepared(
            "DELETE FROM sends WHERE ctid = ANY(ARRAY( \
                SELECT ctid FROM sends WHERE message_id < $1 LIMIT $2))",
        )?;
        let removed = self
            .client
            .execute(&statement, &[&id(before_id), &(limit as i64)])?;
        Ok(removed as usize)
    }

    fn expire_presence(&mut self, seen_before_ms: u64, limit: usize) -> Result<usize> {
        let statement = self.prepared(
            "DELETE FROM presence WHERE ctid = ANY(ARRAY( \
                SELECT ctid FROM presence WHERE NOT online AND last_seen_ms < $1 LIMIT $2))",
        )?;
        let removed = self
            .client
            .execute(&statement, &[&id(seen_before_ms), &(limit as i64)])?;
        Ok(removed as usize)
    }

    fn expire_devices(&mut self, seen_before_ms: u64, limit: usize) -> Result<usize> {
        // One statement: the devices' time rows go first (locked, so a
        // device seen meanwhile waits and then starts a fresh row), and
        // their per-device rows with them.
        let statement = self.prepared(
            "WITH gone AS ( \
                DELETE FROM devices_seen WHERE (user_id, device_id) IN ( \
                    SELECT user_id, device_id FROM devices_seen WHERE last_seen_ms < $1 \
                    ORDER BY last_seen_ms LIMIT $2) \
                RETURNING user_id, device_id), \
             c AS (DELETE FROM cursors x USING gone g \
                WHERE x.user_id = g.user_id AND x.device_id = g.device_id), \
             k AS (DELETE FROM device_keys x USING gone g \
                WHERE x.user_id = g.user_id AND x.device_id = g.device_id), \
             p AS (DELETE FROM prekeys x USING gone g \
                WHERE x.user_id = g.user_id AND x.device_id = g.device_id), \
             t AS (DELETE FROM push_targets x USING gone g \
                WHERE x.user_id = g.user_id AND x.device_id = g.device_id) \
             SELECT count(*) FROM gone",
        )?;
        let row = self
            .client
            .query_one(&statement, &[&id(seen_before_ms), &(limit as i64)])?;
        Ok(row.get::<_, i64>(0).max(0) as usize)
    }

    /// Transaction-scoped advisory locks, one per group, in sorted order
    /// (writers that lock the same groups never wait on each other in a
    /// cycle); released when the batch commits or rolls back.
    fn lock_groups(&mut self, groups: &[&str]) -> Result<()> {
        let statement = self.prepared(LOCK_GROUPS)?;
        self.client.query(&statement, &[&groups])?;
        Ok(())
    }

    fn admins_only(&mut self, group: &str) -> Result<bool> {
        let statement =
            self.prepared("SELECT admins_only FROM group_settings WHERE group_id = $1")?;
        let row = self.client.query_opt(&statement, &[&group])?;
        Ok(row.is_some_and(|row| row.get(0)))
    }

    fn set_admins_only(&mut self, group: &str, admins_only: bool) -> Result<()> {
        let statement = self.prepared(
            "INSERT INTO group_settings (group_id, admins_only) VALUES ($1, $2) \
             ON CONFLICT (group_id) DO UPDATE SET admins_only = EXCLUDED.admins_only",
        )?;
        self.client.execute(&statement, &[&group, &admins_only])?;
        Ok(())
    }

    fn groups_of(&mut self, user: &str) -> Result<Vec<String>> {
        let statement = self.prepared(
            "SELECT group_id FROM group_members WHERE user_id = $1 ORDER BY group_id LIMIT $2",
        )?;
        let limit = super::MEMBERSHIP_READ_MAX as i64;
        let rows = self.client.query(&statement, &[&user, &limit])?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    fn put_presence(&mut self, node: u16, entries: &[PresenceEntry<'_>]) -> Result<()> {
        let statement = self.prepared(
            "INSERT INTO presence (user_id, node_id, online, last_seen_ms) \
             SELECT u, $1, o, s FROM UNNEST($2::text[], $3::bool[], $4::bigint[]) AS t(u, o, s) \
             ON CONFLICT (user_id, node_id) DO UPDATE \
             SET online = EXCLUDED.online, last_seen_ms = EXCLUDED.last_seen_ms",
        )?;
        // One row per user (a record never names a user twice, but be sure:
        // ON CONFLICT refuses a statement that touches a row twice).
        let mut latest: BTreeMap<&str, &PresenceEntry<'_>> = BTreeMap::new();
        for entry in entries {
            latest.insert(entry.user, entry);
        }
        let users: Vec<&str> = latest.keys().copied().collect();
        let online: Vec<bool> = latest.values().map(|e| e.online).collect();
        let seen: Vec<i64> = latest.values().map(|e| id(e.last_seen_ms)).collect();
        let node = i32::from(node);
        self.client
            .execute(&statement, &[&node, &users, &online, &seen])?;
        Ok(())
    }

    fn presence(&mut self, user: &str) -> Result<Vec<Presence>> {
        let statement =
            self.prepared("SELECT online, last_seen_ms FROM presence WHERE user_id = $1 LIMIT $2")?;
        let limit = super::PRESENCE_NODES_MAX as i64;
        let rows = self.client.query(&statement, &[&user, &limit])?;
        Ok(rows
            .iter()
            .map(|row| Presence {
                online: row.get(0),
                last_seen_ms: row.get::<_, i64>(1) as u64,
            })
            .collect())
    }

    fn put_device_keys(&mut self, upload: &DeviceKeys<'_>) -> Result<u32> {
        let lock = self.prepared(
            "INSERT INTO device_keys (user_id, device_id, identity_key, signed_prekey, signed_prekey_signature) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (user_id, device_id) DO UPDATE SET \
             identity_key = EXCLUDED.identity_key, signed_prekey = EXCLUDED.signed_prekey, \
             signed_prekey_signature = EXCLUDED.signed_prekey_signature",
        )?;
        let count =
            self.prepared("SELECT count(*) FROM prekeys WHERE user_id = $1 AND device_id = $2")?;
        let insert = self.prepared(
            "INSERT INTO prekeys (user_id, device_id, prekey) \
             SELECT $1, $2, k FROM UNNEST($3::text[]) WITH ORDINALITY AS t(k, n) ORDER BY n",
        )?;
        let mut transaction = self.client.transaction()?;
        // The upsert locks the device's row: concurrent uploads of one device queue.
        transaction.execute(
            &lock,
            &[
                &upload.user,
                &upload.device,
                &upload.identity_key,
                &upload.signed_prekey,
                &upload.signed_prekey_signature,
            ],
        )?;
        let stored: i64 = transaction
            .query_one(&count, &[&upload.user, &upload.device])?
            .get(0);
        let total = stored as u32 + upload.one_time_prekeys.len() as u32;
        anyhow::ensure!(
            total <= STORED_PREKEYS_MAX,
            ReadRefused("the device would hold more one-time prekeys than allowed")
        );
        transaction.execute(
            &insert,
            &[&upload.user, &upload.device, &upload.one_time_prekeys],
        )?;
        transaction.commit()?;
        Ok(total)
    }

    fn take_bundles(&mut self, user: &str) -> Result<Vec<(Bundle, u32)>> {
        let devices = self.prepared(
            "SELECT device_id, identity_key, signed_prekey, signed_prekey_signature \
             FROM device_keys WHERE user_id = $1 ORDER BY device_id",
        )?;
        let take = self.prepared(
            "DELETE FROM prekeys WHERE (user_id, device_id, key_id) IN ( \
                 SELECT user_id, device_id, key_id FROM prekeys \
                 WHERE user_id = $1 AND device_id = $2 ORDER BY key_id LIMIT 1 \
                 FOR UPDATE SKIP LOCKED) \
             RETURNING prekey",
        )?;
        let count =
            self.prepared("SELECT count(*) FROM prekeys WHERE user_id = $1 AND device_id = $2")?;
        let mut transaction = self.client.transaction()?;
        let mut bundles = Vec::new();
        for row in transaction.query(&devices, &[&user])? {
            let device: String = row.get(0);
            let taken = transaction.query_opt(&take, &[&user, &device])?;
            let left: i64 = transaction.query_one(&count, &[&user, &device])?.get(0);
            bundles.push((
                Bundle {
                    device,
                    identity_key: row.get(1),
                    signed_prekey: row.get(2),
                    signed_prekey_signature: row.get(3),
                    one_time_prekey: taken.map(|row| row.get(0)),
                },
                left as u32,
            ));
        }
        transaction.commit()?;
        Ok(bundles)
    }

    /// Four statements per batch instead of four per acknowledgement.
    fn put_acks(&mut self, acks: &[&AckRecord<'_>]) -> Result<Option<Vec<usize>>> {
        // Each acknowledged message's inbox entry.
        let statement = self.prepared(
            "SELECT r.position, i.seq, i.conversation \
             FROM UNNEST($1::text[], $2::bigint[]) WITH ORDINALITY AS r(user_id, message_id, position) \
             JOIN inbox i ON i.user_id = r.user_id AND i.message_id = r.message_id",
        )?;
        let users: Vec<&str> = acks.iter().map(|a| a.user).collect();
        let message_ids: Vec<i64> = acks.iter().map(|a| id(a.message_id)).collect();
        let mut found: Vec<Option<(u64, String)>> = vec![None; acks.len()];
        for row in self.client.query(&statement, &[&users, &message_ids])? {
            let position = row.get::<_, i64>(0) as usize - 1;
            found[position] = Some((row.get::<_, i64>(1) as u64, row.get(2)));
        }
        let unresolved: Vec<usize> = (0..acks.len()).filter(|p| found[*p].is_none()).collect();

        // The devices' cursors, locked in a fixed order (no deadlock between nodes).
        let mut devices: BTreeMap<(&str, &str), (Cursor, u64)> = BTreeMap::new();
        for (ack, entry) in acks.iter().zip(&found) {
            if let Some((seq, _)) = entry {
                let slot = devices.entry((ack.user, ack.device)).or_default();
                slot.1 = slot.1.max(*seq);
            }
        }
        if devices.is_empty() {
            return Ok(Some(unresolved));
        }
        let statement = self.prepared(
            "SELECT c.user_id, c.device_id, c.state FROM cursors c \
             JOIN UNNEST($1::text[], $2::text[]) AS r(user_id, device_id) USING (user_id, device_id) \
             ORDER BY c.user_id, c.device_id FOR UPDATE OF c",
        )?;
        let keys: Vec<(&str, &str)> = devices.keys().copied().collect();
        let key_users: Vec<&str> = keys.iter().map(|k| k.0).collect();
        let key_devices: Vec<&str> = keys.iter().map(|k| k.1).collect();
        for row in self.client.query(&statement, &[&key_users, &key_devices])? {
            let user: &str = row.get(0);
            let device: &str = row.get(1);
            if let Ok(k) = keys.binary_search(&(user, device)) {
                let slot = devices.get_mut(&keys[k]).expect("every key has a slot");
                slot.0 = Cursor::decode(row.get::<_, &[u8]>(2))?;
            }
        }

        // The inbox entries each device's acknowledgements may pass over.
        let statement = self.prepared(
            "SELECT r.k, e.seq, e.message_id, e.conversation, e.origin_device \
             FROM UNNEST($1::text[], $2::bigint[], $3::bigint[]) WITH ORDINALITY AS r(user_id, after, upto, k) \
             JOIN LATERAL (SELECT seq, message_id, conversation, origin_device FROM inbox \
                 WHERE user_id = r.user_id AND seq > r.after AND seq < r.upto \
                 ORDER BY seq LIMIT $4) e ON true \
             ORDER BY r.k, e.seq",
        )?;
        let afters: Vec<i64> = devices.values().map(|(c, _)| id(c.through)).collect();
        let uptos: Vec<i64> = devices.values().map(|(_, max)| id(*max)).collect();
        let mut entries: Vec<Vec<InboxEntry>> = vec![Vec::new(); keys.len()];
        let limit = super::ACK_SCAN_MAX as i64;
        for row in self
            .client
            .query(&statement, &[&key_users, &afters, &uptos, &limit])?
        {
            let k = row.get::<_, i64>(0) as usize - 1;
            entries[k].push(InboxEntry {
                seq: row.get::<_, i64>(1) as u64,
                message_id: row.get::<_, i64>(2) as u64,
                conversation: row.get(3),
                origin_device: row.get(4),
            });
        }

        // Advance each cursor in ring order, then write them back at once.
        for (ack, entry) in acks.iter().zip(&found) {
            let Some((seq, conversation)) = entry else {
                continue;
            };
            let k = keys
                .binary_search(&(ack.user, ack.device))
                .expect("every resolved ack has a cursor slot");
            let cursor = &mut devices.get_mut(&keys[k]).expect("slot").0;
            super::advance(cursor, ack.device, *seq, conversation, &entries[k], true);
        }
        let states: Vec<Vec<u8>> = devices.values().map(|(c, _)| c.encode()).collect();
        let statement = self.prepared(
            "INSERT INTO cursors (user_id, device_id, state) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::bytea[]) \
             ON CONFLICT (user_id, device_id) DO UPDATE SET state = EXCLUDED.state",
        )?;
        self.client
            .execute(&statement, &[&key_users, &key_devices, &states])?;
        Ok(Some(unresolved))
    }

    /// Four statements per batch instead of four per message.
    fn put_new_messages(
        &mut self,
        messages: &[(Cow<'_, [u8]>, &MessageRecord<'_>)],
    ) -> Result<bool> {
        // Idempotency keys (first send wins).
        let statement = self.prepared(
            "INSERT INTO sends (user_id, device_id, client_msg_id, message_id, conversation) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[]) \
             ON CONFLICT DO NOTHING",
        )?;
        fn column<'m>(
            messages: &[(Cow<'_, [u8]>, &MessageRecord<'m>)],
            field: fn(&MessageRecord<'m>) -> &'m str,
        ) -> Vec<&'m str> {
            messages.iter().map(|(_, m)| field(m)).collect()
        }
        let ids: Vec<i64> = messages.iter().map(|(_, m)| id(m.message_id)).collect();
        let sends: Vec<_> = messages
            .iter()
            .filter(|(_, m)| super::is_client_send(m))
            .map(|(raw, m)| (raw.clone(), *m))
            .collect();
        let send_ids: Vec<i64> = sends.iter().map(|(_, m)| id(m.message_id)).collect();
        self.client.execute(
            &statement,
            &[
                &column(&sends, |m| m.from),
                &column(&sends, |m| m.from_device),
                &column(&sends, |m| m.client_msg_id),
                &send_ids,
                &column(&sends, |m| m.conversation),
            ],
        )?;

        // Inbox entries in ring order.
        let mut entries: Vec<(&str, i64, &str, &str)> = Vec::with_capacity(messages.len() * 2);
        for (_, message) in messages {
            let message_id = id(message.message_id);
            for (user, origin) in super::inbox_targets(message) {
                entries.push((user, message_id, message.conversation, origin));
            }
        }
        // Reserve each user's sequences with one upsert; users in sorted
        // order, so writers on several nodes lock rows in the same order.
        let mut counts: BTreeMap<&str, i64> = Default::default();
        for (user, ..) in &entries {
            *counts.entry(user).or_default() += 1;
        }
        let statement = self.prepared(
            "INSERT INTO inbox_heads AS h (user_id, seq) \
             SELECT * FROM UNNEST($1::text[], $2::bigint[]) \
             ON CONFLICT (user_id) DO UPDATE SET seq = h.seq + EXCLUDED.seq \
             RETURNING user_id, seq",
        )?;
        let users: Vec<&str> = counts.keys().copied().collect();
        let amounts: Vec<i64> = counts.values().copied().collect();
        let mut next: std::collections::HashMap<String, i64> = Default::default();
        for row in self.client.query(&statement, &[&users, &amounts])? {
            let user: String = row.get(0);
            let head: i64 = row.get(1);
            let first = head - counts[user.as_str()] + 1;
            next.insert(user, first);
        }
        let mut seqs = Vec::with_capacity(entries.len());
        for (user, ..) in &entries {
            let seq = next
                .get_mut(*user)
                .context("a user without a reserved sequence")?;
            seqs.push(*seq);
            *seq += 1;
        }
        let statement = self.prepared(
            "INSERT INTO inbox (user_id, seq, message_id, conversation, origin_device) \
             SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::text[])",
        )?;
        let users: Vec<&str> = entries.iter().map(|e| e.0).collect();
        let message_ids: Vec<i64> = entries.iter().map(|e| e.1).collect();
        let conversations: Vec<&str> = entries.iter().map(|e| e.2).collect();
        let origins: Vec<&str> = entries.iter().map(|e| e.3).collect();
        self.client.execute(
            &statement,
            &[&users, &seqs, &message_ids, &conversations, &origins],
        )?;

        // The message rows last.
        let statement = self.prepared(
            "INSERT INTO messages (conversation, message_id, record) \
             SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::bytea[]) ON CONFLICT DO NOTHING",
        )?;
        let records: Vec<&[u8]> = messages.iter().map(|(raw, _)| raw.as_ref()).collect();
        self.client.execute(
            &statement,
            &[&column(messages, |m| m.conversation), &ids, &records],
        )?;
        Ok(true)
    }
}
