//! The ScyllaDB backend (feature `scylla`): the reference design's store at scale.
//!
//! Owns applying the CQL schema's migrations (`schema/scylla/`, the applied
//! steps in `schema_migrations`), prepared statements with the
//! configured consistency, the per-user inbox counter (a lightweight
//! transaction: compare-and-set on `inbox_heads`), and grouping a batch's
//! message rows into one unlogged batch per conversation partition, written
//! last (the marker that a record is fully applied). A failed batch is
//! retried whole by the commit thread with back-off; every write is
//! idempotent. ScyllaDB cannot be installed on our CI machines: this code is
//! built and linted there, and its live test runs only where `SCYLLA_URI` is set.
//! Never blocks a shard: it runs on the writer's threads over a small
//! current-thread runtime per handle.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Context, Result};
use chat_protocol::store_wire::{MemberRole, RecentSend};
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::Consistency;

use chat_protocol::keys::{Bundle, STORED_PREKEYS_MAX};

use super::{Backend, BatchWriter, Cursor, DeviceKeys, InboxEntry, Presence, ReadRefused, Tables};
use chat_protocol::records::PresenceEntry;

/// Compare-and-set attempts for one inbox sequence before the batch fails (and is retried).
const CAS_ATTEMPTS: usize = 16;

/// The parts of one time bucket of `devices_by_seen` (by the user's hash):
/// a bucket of a large fleet is this many partitions of bounded size.
const DEVICE_BUCKET_PARTS: i32 = 64;
/// `cleanup_progress`'s row for the device expiry.
const DEVICE_PROGRESS: &str = "devices_by_seen";
/// A bucket is at most an hour wide, at least a second, and about a
/// sixteenth of the device retention the keyspace first had.
const DEVICE_BUCKET_MS_MAX: u64 = 60 * 60 * 1000;
const DEVICE_BUCKET_MS_MIN: u64 = 1000;
/// Rows read from one bucket part, or users from `devices_seen`, per query.
const DEVICE_PAGE_ROWS: i32 = 512;
/// One expiry call reads at most this many times its limit of bucket rows
/// (most are of devices seen again since, which stay): the rest waits for
/// the next cleanup pass.
const DEVICE_ROWS_READ_PER_LIMIT: usize = 8;

struct Statements {
    message: PreparedStatement,
    put_message: PreparedStatement,
    history: PreparedStatement,
    put_send: PreparedStatement,
    send_of: PreparedStatement,
    put_send_by_time: PreparedStatement,
    recent_sends: PreparedStatement,
    head: PreparedStatement,
    head_create: PreparedStatement,
    head_advance: PreparedStatement,
    put_inbox: PreparedStatement,
    put_inbox_by_message: PreparedStatement,
    inbox_entry_of: PreparedStatement,
    inbox_after: PreparedStatement,
    cursor: PreparedStatement,
    put_cursor: PreparedStatement,
    put_device_keys: PreparedStatement,
    device_keys: PreparedStatement,
    put_prekey: PreparedStatement,
    first_prekey: PreparedStatement,
    last_prekey: PreparedStatement,
    take_prekey: PreparedStatement,
    count_prekeys: PreparedStatement,
    put_member: PreparedStatement,
    put_group_of: PreparedStatement,
    delete_member: PreparedStatement,
    delete_group_of: PreparedStatement,
    member_roles: PreparedStatement,
    admins_only: PreparedStatement,
    set_admins_only: PreparedStatement,
    set_joined: PreparedStatement,
    set_admin: PreparedStatement,
    groups_of: PreparedStatement,
    put_presence: PreparedStatement,
    presence: PreparedStatement,
    put_revocation: PreparedStatement,
    revocations: PreparedStatement,
    delete_device_keys: PreparedStatement,
    delete_prekeys: PreparedStatement,
    put_push_target: PreparedStatement,
    delete_push_target: PreparedStatement,
    delete_push_targets: PreparedStatement,
    push_targets: PreparedStatement,
    cursor_devices: PreparedStatement,
    delete_sends: PreparedStatement,
    delete_sends_by_time: PreparedStatement,
    delete_inbox: PreparedStatement,
    delete_inbox_by_message: PreparedStatement,
    delete_inbox_head: PreparedStatement,
    delete_cursors: PreparedStatement,
    delete_presence: PreparedStatement,
    delete_revocation: PreparedStatement,
    put_device_seen: PreparedStatement,
    delete_devices_seen: PreparedStatement,
    put_device_by_seen: PreparedStatement,
    devices_in_bucket: PreparedStatement,
    delete_device_by_seen: PreparedStatement,
    device_seen_at: PreparedStatement,
    devices_seen_of: PreparedStatement,
    seed_users: PreparedStatement,
    progress: PreparedStatement,
    put_progress: PreparedStatement,
    /// A device's rows, deleted with a write timestamp: a row written after
    /// it (the device came back) stays.
    expire_device_rows: [PreparedStatement; 5],
}

/// How long each kind of row lives (the writer's flags of the same names).
pub struct Lifetimes {
    pub idempotency_window: std::time::Duration,
    pub presence_retention: std::time::Duration,
    pub message_retention: Option<std::time::Duration>,
    pub device_retention: std::time::Duration,
}

pub struct ScyllaBackend {
    session: Arc<Session>,
    statements: Arc<Statements>,
    /// The TTL of an idempotency key: its window, in seconds.
    sends_ttl_s: i32,
    /// The TTL of an offline presence row, in seconds (0: none).
    presence_ttl_s: i32,
    /// The TTL of a message row and an inbox entry: the hot retention, in
    /// seconds (0: none, kept forever).
    messages_ttl_s: i32,
    /// The width of one `devices_by_seen` bucket, from `cleanup_progress`.
    device_bucket_ms: u64,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn consistency(name: &str) -> Result<Consistency> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "one" => Consistency::One,
        "two" => Consistency::Two,
        "three" => Consistency::Three,
        "quorum" => Consistency::Quorum,
        "all" => Consistency::All,
        "local_quorum" => Consistency::LocalQuorum,
        "each_quorum" => Consistency::EachQuorum,
        "local_one" => Consistency::LocalOne,
        other => anyhow::bail!("unknown consistency {other}"),
    })
}

/// Applies the steps this keyspace lacks. CQL has no transactions: every
/// statement is idempotent (`IF NOT EXISTS`), so a step cut short is run
/// again whole; its version row is written after it.
async fn migrate(session: &Session, keyspace: &str, replication_factor: u8) -> Result<()> {
    let adapt = |statement: &str| {
        statement
            .replace("chat.", &format!("{keyspace}."))
            .replace("EXISTS chat", &format!("EXISTS {keyspace}"))
            .replace(
                "'replication_factor': 3",
                &format!("'replication_factor': {replication_factor}"),
            )
    };
    let steps = super::migrations::SCYLLA;
    // The keyspace comes first (step 1 creates it); the version table in it.
    for statement in super::migrations::split(steps[0].statements).take(1) {
        session
            .query_unpaged(adapt(&statement).as_str(), &[])
            .await
            .with_context(|| format!("creating keyspace {keyspace}"))?;
    }
    session
        .query_unpaged(
            format!("CREATE TABLE IF NOT EXISTS {keyspace}.schema_migrations (version int PRIMARY KEY, name text)"),
            &[],
        )
        .await?;
    let rows = session
        .query_unpaged(
            format!("SELECT version FROM {keyspace}.schema_migrations"),
            &[],
        )
        .await?
        .into_rows_result()?;
    let applied = rows
        .rows::<(i32,)>()?
        .filter_map(|row| row.ok())
        .map(|(version,)| version.max(0) as u32)
        .max()
        .unwrap_or(0);
    for step in super::migrations::pending(steps, applied)? {
        for statement in super::migrations::split(step.statements) {
            let statement = adapt(&statement);
            let applied = session.query_unpaged(statement.as_str(), &[]).await;
            if let Err(error) = applied {
                // ALTER TABLE ... ADD has no IF NOT EXISTS: a step run
                // again after being cut short finds its columns there.
                let again = statement.trim_start().starts_with("ALTER TABLE")
                    && error.to_string().to_lowercase().contains("exist");
                if !again {
                    return Err(anyhow::Error::new(error).context(format!(
                        "migration {} ({}): {statement}",
                        step.version, step.name
                    )));
                }
            }
        }
        session
            .query_unpaged(
                format!("INSERT INTO {keyspace}.schema_migrations (version, name) VALUES (?, ?)"),
                (step.version as i32, step.name),
            )
            .await?;
        tracing::info!(
            version = step.version,
            name = step.name,
            "ScyllaDB schema migrated"
        );
    }
    Ok(())
}

impl ScyllaBackend {
    pub fn connect(
        uri: &str,
        keyspace: &str,
        replication_factor: u8,
        consistency_name: &str,
        lifetimes: Lifetimes,
    ) -> Result<Self> {
        let Lifetimes {
            idempotency_window,
            presence_retention,
            message_retention,
            device_retention,
        } = lifetimes;
        let messages_ttl_s = i32::try_from(message_retention.map_or(0, |r| r.as_secs().max(1)))
            .context("--message-retention-ms too long for a TTL")?;
        let presence_ttl_s = i32::try_from(presence_retention.as_secs())
            .context("--presence-retention-ms too long for a TTL")?;
        let sends_ttl_s = i32::try_from(idempotency_window.as_secs().max(1))
            .context("--idempotency-window-ms too long for a TTL")?;
        let level = consistency(consistency_name)?;
        let runtime = runtime()?;
        let (session, statements) = runtime.block_on(async {
            let session = SessionBuilder::new()
                .known_node(uri)
                .build()
                .await
                .with_context(|| format!("connecting to ScyllaDB at {uri}"))?;
            migrate(&session, keyspace, replication_factor).await?;
            let prepare = |cql: String| {
                let session = &session;
                async move {
                    let mut prepared = session
                        .prepare(cql.as_str())
                        .await
                        .with_context(|| format!("preparing {cql}"))?;
                    prepared.set_consistency(level);
                    anyhow::Ok(prepared)
                }
            };
            let k = keyspace;
            let statements = Statements {
                message: prepare(format!("SELECT record FROM {k}.messages WHERE conversation = ? AND message_id = ?")).await?,
                put_message: prepare(format!("INSERT INTO {k}.messages (conversation, message_id, record) VALUES (?, ?, ?) USING TTL ?")).await?,
                history: prepare(format!("SELECT record FROM {k}.messages WHERE conversation = ? AND message_id < ? LIMIT ?")).await?,
                put_send: prepare(format!("INSERT INTO {k}.sends (user_id, device_id, client_msg_id, message_id, conversation) VALUES (?, ?, ?, ?, ?) IF NOT EXISTS USING TTL ?")).await?,
                send_of: prepare(format!("SELECT message_id FROM {k}.sends WHERE user_id = ? AND device_id = ? AND client_msg_id = ?")).await?,
                put_send_by_time: prepare(format!("INSERT INTO {k}.sends_by_time (user_id, device_id, message_id, client_msg_id, conversation) VALUES (?, ?, ?, ?, ?) USING TTL ?")).await?,
                recent_sends: prepare(format!("SELECT client_msg_id, message_id, conversation FROM {k}.sends_by_time WHERE user_id = ? AND device_id = ? AND message_id >= ? LIMIT ?")).await?,
                head: prepare(format!("SELECT seq FROM {k}.inbox_heads WHERE user_id = ?")).await?,
                head_create: prepare(format!("INSERT INTO {k}.inbox_heads (user_id, seq) VALUES (?, 1) IF NOT EXISTS")).await?,
                head_advance: prepare(format!("UPDATE {k}.inbox_heads SET seq = ? WHERE user_id = ? IF seq = ?")).await?,
                put_inbox: prepare(format!("INSERT INTO {k}.inbox (user_id, seq, message_id, conversation, origin_device) VALUES (?, ?, ?, ?, ?) USING TTL ?")).await?,
                put_inbox_by_message: prepare(format!("INSERT INTO {k}.inbox_by_message (user_id, message_id, seq, conversation) VALUES (?, ?, ?, ?) USING TTL ?")).await?,
                inbox_entry_of: prepare(format!("SELECT seq, conversation FROM {k}.inbox_by_message WHERE user_id = ? AND message_id = ?")).await?,
                inbox_after: prepare(format!("SELECT seq, message_id, conversation, origin_device FROM {k}.inbox WHERE user_id = ? AND seq > ? LIMIT ?")).await?,
                cursor: prepare(format!("SELECT state FROM {k}.cursors WHERE user_id = ? AND device_id = ?")).await?,
                put_cursor: prepare(format!("INSERT INTO {k}.cursors (user_id, device_id, state) VALUES (?, ?, ?)")).await?,
                put_device_keys: prepare(format!("INSERT INTO {k}.device_keys (user_id, device_id, identity_key, signed_prekey, signed_prekey_signature) VALUES (?, ?, ?, ?, ?)")).await?,
                device_keys: prepare(format!("SELECT device_id, identity_key, signed_prekey, signed_prekey_signature FROM {k}.device_keys WHERE user_id = ?")).await?,
                put_revocation: prepare(format!("INSERT INTO {k}.revocations (user_id, device_id, at_ms) VALUES (?, ?, ?) USING TIMESTAMP ?")).await?,
                revocations: prepare(format!("SELECT device_id, at_ms FROM {k}.revocations WHERE user_id = ?")).await?,
                delete_device_keys: prepare(format!("DELETE FROM {k}.device_keys WHERE user_id = ? AND device_id = ?")).await?,
                delete_prekeys: prepare(format!("DELETE FROM {k}.prekeys WHERE user_id = ? AND device_id = ?")).await?,
                put_push_target: prepare(format!("INSERT INTO {k}.push_targets (user_id, device_id, target, updated_ms) VALUES (?, ?, ?, ?)")).await?,
                delete_push_target: prepare(format!("DELETE FROM {k}.push_targets WHERE user_id = ? AND device_id = ?")).await?,
                delete_push_targets: prepare(format!("DELETE FROM {k}.push_targets WHERE user_id = ?")).await?,
                push_targets: prepare(format!("SELECT device_id, target FROM {k}.push_targets WHERE user_id = ?")).await?,
                put_prekey: prepare(format!("INSERT INTO {k}.prekeys (user_id, device_id, key_id, prekey) VALUES (?, ?, ?, ?)")).await?,
                first_prekey: prepare(format!("SELECT key_id, prekey FROM {k}.prekeys WHERE user_id = ? AND device_id = ? LIMIT 1")).await?,
                last_prekey: prepare(format!("SELECT key_id FROM {k}.prekeys WHERE user_id = ? AND device_id = ? ORDER BY key_id DESC LIMIT 1")).await?,
                take_prekey: prepare(format!("DELETE FROM {k}.prekeys WHERE user_id = ? AND device_id = ? AND key_id = ? IF EXISTS")).await?,
                count_prekeys: prepare(format!("SELECT count(*) FROM {k}.prekeys WHERE user_id = ? AND device_id = ?")).await?,
                put_member: prepare(format!("INSERT INTO {k}.group_members (group_id, user_id) VALUES (?, ?)")).await?,
                put_group_of: prepare(format!("INSERT INTO {k}.groups_by_member (user_id, group_id) VALUES (?, ?)")).await?,
                delete_member: prepare(format!("DELETE FROM {k}.group_members WHERE group_id = ? AND user_id = ?")).await?,
                delete_group_of: prepare(format!("DELETE FROM {k}.groups_by_member WHERE user_id = ? AND group_id = ?")).await?,
                member_roles: prepare(format!("SELECT user_id, admin, joined_id FROM {k}.group_members WHERE group_id = ? LIMIT ?")).await?,
                admins_only: prepare(format!("SELECT admins_only FROM {k}.group_settings WHERE group_id = ?")).await?,
                set_admins_only: prepare(format!("INSERT INTO {k}.group_settings (group_id, admins_only) VALUES (?, ?)")).await?,
                // IF EXISTS: an UPDATE would otherwise make the row (a member) up.
                set_joined: prepare(format!("UPDATE {k}.group_members SET joined_id = ? WHERE group_id = ? AND user_id = ? IF EXISTS")).await?,
                set_admin: prepare(format!("UPDATE {k}.group_members SET admin = ? WHERE group_id = ? AND user_id = ? IF EXISTS")).await?,
                groups_of: prepare(format!("SELECT group_id FROM {k}.groups_by_member WHERE user_id = ? LIMIT ?")).await?,
                // An offline row expires after the retention; an online one never (TTL 0).
                put_presence: prepare(format!("INSERT INTO {k}.presence (user_id, node_id, online, last_seen_ms) VALUES (?, ?, ?, ?) USING TTL ?")).await?,
                presence: prepare(format!("SELECT online, last_seen_ms FROM {k}.presence WHERE user_id = ? LIMIT ?")).await?,
                // Account deletion: whole partitions where the user is the key.
                cursor_devices: prepare(format!("SELECT device_id FROM {k}.cursors WHERE user_id = ?")).await?,
                delete_sends: prepare(format!("DELETE FROM {k}.sends WHERE user_id = ? AND device_id = ?")).await?,
                delete_sends_by_time: prepare(format!("DELETE FROM {k}.sends_by_time WHERE user_id = ? AND device_id = ?")).await?,
                delete_inbox: prepare(format!("DELETE FROM {k}.inbox WHERE user_id = ?")).await?,
                delete_inbox_by_message: prepare(format!("DELETE FROM {k}.inbox_by_message WHERE user_id = ?")).await?,
                delete_inbox_head: prepare(format!("DELETE FROM {k}.inbox_heads WHERE user_id = ?")).await?,
                delete_cursors: prepare(format!("DELETE FROM {k}.cursors WHERE user_id = ?")).await?,
                delete_presence: prepare(format!("DELETE FROM {k}.presence WHERE user_id = ?")).await?,
                delete_revocation: prepare(format!("DELETE FROM {k}.revocations WHERE user_id = ? AND device_id = ?")).await?,
                // The time as the write timestamp: a later sighting wins.
                put_device_seen: prepare(format!("INSERT INTO {k}.devices_seen (user_id, device_id, last_seen_ms) VALUES (?, ?, ?) USING TIMESTAMP ?")).await?,
                delete_devices_seen: prepare(format!("DELETE FROM {k}.devices_seen WHERE user_id = ?")).await?,
                put_device_by_seen: prepare(format!("INSERT INTO {k}.devices_by_seen (bucket, part, user_id, device_id) VALUES (?, ?, ?, ?)")).await?,
                devices_in_bucket: prepare(format!("SELECT user_id, device_id FROM {k}.devices_by_seen WHERE bucket = ? AND part = ? LIMIT ?")).await?,
                delete_device_by_seen: prepare(format!("DELETE FROM {k}.devices_by_seen WHERE bucket = ? AND part = ? AND user_id = ? AND device_id = ?")).await?,
                device_seen_at: prepare(format!("SELECT last_seen_ms FROM {k}.devices_seen WHERE user_id = ? AND device_id = ?")).await?,
                devices_seen_of: prepare(format!("SELECT device_id, last_seen_ms FROM {k}.devices_seen WHERE user_id = ?")).await?,
                seed_users: prepare(format!("SELECT DISTINCT user_id, token(user_id) FROM {k}.devices_seen WHERE token(user_id) > ? LIMIT ?")).await?,
                progress: prepare(format!("SELECT next_bucket, seed_token FROM {k}.cleanup_progress WHERE name = ?")).await?,
                put_progress: prepare(format!("UPDATE {k}.cleanup_progress SET next_bucket = ?, seed_token = ? WHERE name = ?")).await?,
                expire_device_rows: [
                    prepare(format!("DELETE FROM {k}.cursors USING TIMESTAMP ? WHERE user_id = ? AND device_id = ?")).await?,
                    prepare(format!("DELETE FROM {k}.device_keys USING TIMESTAMP ? WHERE user_id = ? AND device_id = ?")).await?,
                    prepare(format!("DELETE FROM {k}.prekeys USING TIMESTAMP ? WHERE user_id = ? AND device_id = ?")).await?,
                    prepare(format!("DELETE FROM {k}.push_targets USING TIMESTAMP ? WHERE user_id = ? AND device_id = ?")).await?,
                    prepare(format!("DELETE FROM {k}.devices_seen USING TIMESTAMP ? WHERE user_id = ? AND device_id = ?")).await?,
                ],
            };
            anyhow::Ok((session, statements))
        })?;
        let device_bucket_ms =
            runtime.block_on(device_progress(&session, keyspace, device_retention))?;
        Ok(Self {
            session: Arc::new(session),
            statements: Arc::new(statements),
            sends_ttl_s,
            presence_ttl_s,
            messages_ttl_s,
            device_bucket_ms,
        })
    }

    fn tables(&self) -> Result<Scylla> {
        Ok(Scylla {
            session: self.session.clone(),
            statements: self.statements.clone(),
            runtime: runtime()?,
            pending_messages: BTreeMap::new(),
            sends_ttl_s: self.sends_ttl_s,
            presence_ttl_s: self.presence_ttl_s,
            messages_ttl_s: self.messages_ttl_s,
            device_bucket_ms: self.device_bucket_ms,
        })
    }
}

/// The device expiry's progress row, created by the first writer of this
/// version (the bucket width from the retention then, the next bucket now,
/// and the devices seen before it still to be given bucket rows); returns
/// the keyspace's bucket width. Every writer since uses that width, so a
/// later change of the retention moves no bucket.
async fn device_progress(
    session: &Session,
    keyspace: &str,
    device_retention: std::time::Duration,
) -> Result<u64> {
    let wanted = (device_retention.as_millis() as u64 / 16)
        .clamp(DEVICE_BUCKET_MS_MIN, DEVICE_BUCKET_MS_MAX);
    let next = super::unix_ms_now() / wanted;
    session
        .query_unpaged(
            format!("INSERT INTO {keyspace}.cleanup_progress (name, bucket_ms, next_bucket, seed_token) VALUES (?, ?, ?, ?) IF NOT EXISTS"),
            (DEVICE_PROGRESS, wanted as i64, next as i64, i64::MIN),
        )
        .await?;
    let rows = session
        .query_unpaged(
            format!("SELECT bucket_ms FROM {keyspace}.cleanup_progress WHERE name = ?"),
            (DEVICE_PROGRESS,),
        )
        .await?
        .into_rows_result()?;
    let (width,) = rows.first_row::<(i64,)>()?;
    Ok((width.max(1)) as u64)
}

impl Backend for ScyllaBackend {
    fn name(&self) -> &'static str {
        "scylla"
    }
    fn writer(&self) -> Result<Box<dyn BatchWriter>> {
        Ok(Box::new(self.tables()?))
    }
    fn reader(&self) -> Result<Box<dyn Tables + Send>> {
        Ok(Box::new(self.tables()?))
    }
}

struct Scylla {
    session: Arc<Session>,
    statements: Arc<Statements>,
    runtime: tokio::runtime::Runtime,
    /// Message rows of the batch in hand, by conversation partition.
    pending_messages: BTreeMap<String, Vec<(i64, Vec<u8>)>>,
    sends_ttl_s: i32,
    presence_ttl_s: i32,
    messages_ttl_s: i32,
    device_bucket_ms: u64,
}

fn id(value: u64) -> i64 {
    value as i64
}

impl Scylla {
    /// The device expiry's progress: (next bucket, the token of
    /// `devices_seen` its seeding reached, `None` once done).
    fn device_progress(&self) -> Result<(i64, Option<i64>)> {
        let rows: Vec<(i64, Option<i64>)> =
            self.rows(&self.statements.progress, (DEVICE_PROGRESS,))?;
        rows.into_iter()
            .next()
            .context("cleanup_progress has no row for the device expiry")
    }

    /// The sighting's row in its time bucket, or in bucket `floor` when
    /// that is later (the seeding passes the next bucket the expiry reads,
    /// so a device seen long before version 9 is found there). A sighting
    /// is "now", far ahead of the buckets the expiry has read.
    fn put_device_by_seen(&self, user: &str, device: &str, at_ms: u64, floor: i64) -> Result<()> {
        let bucket = i64::try_from(at_ms / self.device_bucket_ms)?.max(floor);
        let part = (chat_protocol::ids::user_hash(user) % DEVICE_BUCKET_PARTS as u64) as i32;
        self.execute(
            &self.statements.put_device_by_seen,
            (bucket, part, user, device),
        )
    }

    /// Devices seen before version 9 have a `devices_seen` row and no bucket
    /// row: walks `devices_seen` by token, in pages of users, and gives each
    /// device its bucket row, until done or `budget` users are read, where
    /// the next call goes on. Returns the budget left and the seeding's
    /// token, as `device_progress` now says.
    fn seed_devices_by_seen(
        &mut self,
        next: i64,
        seed: Option<i64>,
        mut budget: usize,
    ) -> Result<(usize, Option<i64>)> {
        let Some(mut token) = seed else {
            return Ok((budget, None));
        };
        while budget > 0 {
            let users: Vec<(String, i64)> =
                self.rows(&self.statements.seed_users, (token, DEVICE_PAGE_ROWS))?;
            for (user, user_token) in &users {
                let devices: Vec<(String, i64)> =
                    self.rows(&self.statements.devices_seen_of, (user.as_str(),))?;
                for (device, seen) in devices {
                    self.put_device_by_seen(user, &device, seen.max(0) as u64, next)?;
                }
                token = *user_token;
            }
            budget = budget.saturating_sub(users.len().max(1));
            let reached = (users.len() == DEVICE_PAGE_ROWS as usize).then_some(token);
            self.execute(
                &self.statements.put_progress,
                (next, reached, DEVICE_PROGRESS),
            )?;
            if reached.is_none() {
                return Ok((budget, None));
            }
        }
        Ok((budget, Some(token)))
    }

    fn rows<R>(
        &self,
        statement: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
    ) -> Result<Vec<R>>
    where
        R: for<'f, 'm> scylla::deserialize::row::DeserializeRow<'f, 'm>,
    {
        self.runtime.block_on(async {
            let result = self.session.execute_unpaged(statement, values).await?;
            let rows = result.into_rows_result()?;
            let collected = rows.rows::<R>()?.collect::<Result<Vec<R>, _>>()?;
            anyhow::Ok(collected)
        })
    }

    fn execute(
        &self,
        statement: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
    ) -> Result<()> {
        self.runtime
            .block_on(self.session.execute_unpaged(statement, values))?;
        Ok(())
    }

    /// One conditional write; true when it was applied.
    fn applied(
        &self,
        statement: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
    ) -> Result<bool> {
        self.runtime.block_on(async {
            let result = self.session.execute_unpaged(statement, values).await?;
            let rows = result.into_rows_result()?;
            let (applied,) = rows.first_row::<(bool,)>().or_else(|_| {
                // Some servers return the current row next to [applied].
                rows.rows::<(bool, Option<i64>)>()?
                    .next()
                    .context("LWT returned no row")?
                    .map(|(applied, _)| (applied,))
                    .map_err(anyhow::Error::from)
            })?;
            anyhow::Ok(applied)
        })
    }

    /// Writes the batch's message rows: one unlogged batch per conversation.
    fn flush_messages(&mut self) -> Result<()> {
        let pending = std::mem::take(&mut self.pending_messages);
        for (conversation, rows) in pending {
            let mut batch = Batch::new(BatchType::Unlogged);
            let mut values = Vec::with_capacity(rows.len());
            for (message_id, record) in rows {
                batch.append_statement(self.statements.put_message.clone());
                values.push((
                    conversation.clone(),
                    message_id,
                    record,
                    self.messages_ttl_s,
                ));
            }
            self.runtime.block_on(self.session.batch(&batch, values))?;
        }
        Ok(())
    }
}

impl BatchWriter for Scylla {
    fn write_batch(&mut self, work: &mut dyn FnMut(&mut dyn Tables) -> Result<()>) -> Result<()> {
        self.pending_messages.clear();
        work(self)?;
        self.flush_messages()
    }
}

impl Tables for Scylla {
    fn message(&mut self, conversation: &str, message_id: u64) -> Result<Option<Vec<u8>>> {
        if let Some(rows) = self.pending_messages.get(conversation) {
            if let Some((_, record)) = rows.iter().find(|(m, _)| *m == id(message_id)) {
                return Ok(Some(record.clone()));
            }
        }
        let rows: Vec<(Vec<u8>,)> =
            self.rows(&self.statements.message, (conversation, id(message_id)))?;
        Ok(rows.into_iter().next().map(|(record,)| record))
    }

    fn put_message(&mut self, conversation: &str, message_id: u64, record: &[u8]) -> Result<()> {
        self.pending_messages
            .entry(conversation.to_owned())
            .or_default()
            .push((id(message_id), record.to_vec()));
        Ok(())
    }

    fn replace_message(
        &mut self,
        conversation: &str,
        message_id: u64,
        record: &[u8],
    ) -> Result<()> {
        // One row per key in a batch: two writes of one row with one
        // timestamp would be settled by comparing values, not by order.
        let rows = self
            .pending_messages
            .entry(conversation.to_owned())
            .or_default();
        match rows
            .iter_mut()
            .find(|(pending, _)| *pending == id(message_id))
        {
            Some(row) => row.1 = record.to_vec(),
            None => rows.push((id(message_id), record.to_vec())),
        }
        Ok(())
    }

    fn history(
        &mut self,
        conversation: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Vec<u8>>> {
        let before = id(before.unwrap_or(i64::MAX as u64));
        let rows: Vec<(Vec<u8>,)> = self.rows(
            &self.statements.history,
            (conversation, before, limit as i32),
        )?;
        Ok(rows.into_iter().map(|(record,)| record).collect())
    }

    fn put_send_if_absent(
        &mut self,
        user: &str,
        device: &str,
        client_msg_id: &str,
        message_id: u64,
        conversation: &str,
    ) -> Result<()> {
        if self.applied(
            &self.statements.put_send,
            (
                user,
                device,
                client_msg_id,
                id(message_id),
                conversation,
                self.sends_ttl_s,
            ),
        )? {
            let row = (
                user,
                device,
                id(message_id),
                client_msg_id,
                conversation,
                self.sends_ttl_s,
            );
            self.execute(&self.statements.put_send_by_time, row)?;
        }
        Ok(())
    }

    fn send_of(&mut self, user: &str, device: &str, client_msg_id: &str) -> Result<Option<u64>> {
        let rows: Vec<(i64,)> =
            self.rows(&self.statements.send_of, (user, device, client_msg_id))?;
        Ok(rows.into_iter().next().map(|(id,)| id as u64))
    }

    fn recent_sends(
        &mut self,
        user: &str,
        device: &str,
        since_message_id: u64,
        limit: usize,
    ) -> Result<Vec<RecentSend>> {
        let rows: Vec<(String, i64, String)> = self.rows(
            &self.statements.recent_sends,
            (user, device, id(since_message_id), limit as i32),
        )?;
        Ok(rows
            .into_iter()
            .map(|(client_msg_id, message_id, conversation)| RecentSend {
                client_msg_id,
                message_id: message_id as u64,
                conversation,
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
        let mut seq = None;
        for _ in 0..CAS_ATTEMPTS {
            let current: Vec<(i64,)> = self.rows(&self.statements.head, (user,))?;
            let claimed = match current.first() {
                None => self
                    .applied(&self.statements.head_create, (user,))?
                    .then_some(1),
                Some((last,)) => self
                    .applied(&self.statements.head_advance, (last + 1, user, *last))?
                    .then_some(last + 1),
            };
            if claimed.is_some() {
                seq = claimed;
                break;
            }
        }
        let seq = seq.context("inbox sequence contended; the batch will be retried")?;
        self.execute(
            &self.statements.put_inbox,
            (
                user,
                seq,
                id(message_id),
                conversation,
                origin_device,
                self.messages_ttl_s,
            ),
        )?;
        self.execute(
            &self.statements.put_inbox_by_message,
            (user, id(message_id), seq, conversation, self.messages_ttl_s),
        )?;
        Ok(seq as u64)
    }

    fn inbox_entry_of(&mut self, user: &str, message_id: u64) -> Result<Option<(u64, String)>> {
        let rows: Vec<(i64, String)> =
            self.rows(&self.statements.inbox_entry_of, (user, id(message_id)))?;
        Ok(rows
            .into_iter()
            .next()
            .map(|(seq, conversation)| (seq as u64, conversation)))
    }

    fn gaps_are_removals(&self) -> bool {
        false
    }

    fn inbox_head(&mut self, user: &str) -> Result<u64> {
        let rows: Vec<(i64,)> = self.rows(&self.statements.head, (user,))?;
        Ok(rows.first().map_or(0, |(seq,)| *seq as u64))
    }

    fn inbox_after(&mut self, user: &str, after: u64, limit: usize) -> Result<Vec<InboxEntry>> {
        let rows: Vec<(i64, i64, String, String)> = self.rows(
            &self.statements.inbox_after,
            (user, id(after), limit as i32),
        )?;
        Ok(rows
            .into_iter()
            .map(
                |(seq, message_id, conversation, origin_device)| InboxEntry {
                    seq: seq as u64,
                    message_id: message_id as u64,
                    conversation,
                    origin_device,
                },
            )
            .collect())
    }

    fn cursor(&mut self, user: &str, device: &str) -> Result<Cursor> {
        let rows: Vec<(Vec<u8>,)> = self.rows(&self.statements.cursor, (user, device))?;
        match rows.into_iter().next() {
            Some((state,)) => Ok(Cursor::decode(&state)?),
            None => Ok(Cursor::default()),
        }
    }

    fn put_cursor(&mut self, user: &str, device: &str, cursor: &Cursor) -> Result<()> {
        self.execute(&self.statements.put_cursor, (user, device, cursor.encode()))
    }

    fn devices_of(&mut self, user: &str) -> Result<Vec<String>> {
        let rows: Vec<(String, String, String, String)> =
            self.rows(&self.statements.device_keys, (user,))?;
        Ok(rows.into_iter().map(|(device, ..)| device).collect())
    }

    fn revoke(&mut self, user: &str, device: Option<&str>, at_ms: u64) -> Result<u32> {
        let at = i64::try_from(at_ms)?;
        let scope = device.unwrap_or("");
        // Microseconds, as CQL write timestamps are: a later revocation wins.
        let written_at = at.saturating_mul(1_000);
        self.execute(
            &self.statements.put_revocation,
            (user, scope, at, written_at),
        )?;
        let devices = match device {
            Some(device) => vec![device.to_owned()],
            None => self.devices_of(user)?,
        };
        let listed = self.devices_of(user)?;
        let mut removed = 0;
        for device in &devices {
            if listed.contains(device) {
                removed += 1;
            }
            self.execute(&self.statements.delete_device_keys, (user, device.as_str()))?;
            self.execute(&self.statements.delete_prekeys, (user, device.as_str()))?;
        }
        match device {
            Some(device) => self.execute(&self.statements.delete_push_target, (user, device))?,
            None => self.execute(&self.statements.delete_push_targets, (user,))?,
        }
        Ok(removed)
    }

    fn delete_account(&mut self, user: &str, at_ms: u64) -> Result<super::AccountRemoved> {
        // The devices the store knows of: any with a cursor, keys, a push
        // target or a revocation of its own. Idempotency keys are
        // partitioned by device; those of a device known nowhere else
        // expire by their TTL within the idempotency window.
        let mut devices: Vec<String> = self.devices_of(user)?;
        let cursors: Vec<(String,)> = self.rows(&self.statements.cursor_devices, (user,))?;
        let pushed: Vec<(String, Vec<u8>)> = self.rows(&self.statements.push_targets, (user,))?;
        let revoked: Vec<(String, i64)> = self.rows(&self.statements.revocations, (user,))?;
        devices.extend(cursors.into_iter().map(|(device,)| device));
        devices.extend(pushed.into_iter().map(|(device, _)| device));
        devices.extend(revoked.into_iter().map(|(device, _)| device));
        // Not the revocation of every device, nor the record of a deletion.
        devices.retain(|device| !device.is_empty() && device != super::ACCOUNT_DELETED_SCOPE);
        devices.sort();
        devices.dedup();
        // CQL says nothing of how many rows a DELETE removed: count the
        // rows and partitions addressed.
        let mut rows = 0u64;
        for device in &devices {
            let device = device.as_str();
            let s = &self.statements;
            for statement in [
                &s.delete_sends,
                &s.delete_sends_by_time,
                &s.delete_device_keys,
                &s.delete_prekeys,
                &s.delete_revocation,
            ] {
                self.execute(statement, (user, device))?;
                rows += 1;
            }
        }
        let s = &self.statements;
        for statement in [
            &s.delete_inbox,
            &s.delete_inbox_by_message,
            &s.delete_inbox_head,
            &s.delete_cursors,
            &s.delete_presence,
            &s.delete_push_targets,
            &s.delete_devices_seen,
        ] {
            self.execute(statement, (user,))?;
            rows += 1;
        }
        // `groups_of` reads a bounded page: take pages until none is left.
        let mut groups = Vec::new();
        loop {
            let page = self.groups_of(user)?;
            // A page of groups already left: a replica has not seen the
            // deletes yet (consistency ONE); stop rather than spin.
            if page.is_empty() || page.iter().all(|group| groups.contains(group)) {
                break;
            }
            for group in &page {
                self.execute(&self.statements.delete_member, (group.as_str(), user))?;
                self.execute(&self.statements.delete_group_of, (user, group.as_str()))?;
                rows += 2;
            }
            groups.extend(page);
        }
        groups.sort();
        // Written with its time as the write timestamp, like a revocation:
        // the later deletion wins.
        let at = i64::try_from(at_ms)?;
        let scope = super::ACCOUNT_DELETED_SCOPE;
        self.execute(
            &self.statements.put_revocation,
            (user, scope, at, at.saturating_mul(1_000)),
        )?;
        Ok(super::AccountRemoved { rows, groups })
    }

    fn put_device_seen(&mut self, user: &str, device: &str, at_ms: u64) -> Result<()> {
        let at = i64::try_from(at_ms)?;
        self.execute(
            &self.statements.put_device_seen,
            (user, device, at, at.saturating_mul(1_000)),
        )?;
        self.put_device_by_seen(user, device, at_ms, 0)
    }

    fn expire_devices(&mut self, seen_before_ms: u64, limit: usize) -> Result<usize> {
        let (mut next, seed) = self.device_progress()?;
        let budget = limit.saturating_mul(DEVICE_ROWS_READ_PER_LIMIT);
        let (mut budget, seed) = self.seed_devices_by_seen(next, seed, budget)?;
        if budget == 0 {
            return Ok(0);
        }
        // Buckets wholly before the cutoff; each part of one in turn.
        let end = i64::try_from(seen_before_ms / self.device_bucket_ms)?;
        let before = i64::try_from(seen_before_ms)?;
        let before_us = before.saturating_mul(1_000);
        let mut removed = 0;
        while next < end {
            for part in 0..DEVICE_BUCKET_PARTS {
                loop {
                    let page: Vec<(String, String)> = self.rows(
                        &self.statements.devices_in_bucket,
                        (next, part, DEVICE_PAGE_ROWS),
                    )?;
                    for (user, device) in &page {
                        let (user, device) = (user.as_str(), device.as_str());
                        let seen: Vec<(i64,)> =
                            self.rows(&self.statements.device_seen_at, (user, device))?;
                        // Seen since (its row is in a later bucket): it stays.
                        if seen.first().is_none_or(|(at,)| *at < before) {
                            for statement in &self.statements.expire_device_rows {
                                self.execute(statement, (before_us, user, device))?;
                            }
                            removed += 1;
                        }
                        self.execute(
                            &self.statements.delete_device_by_seen,
                            (next, part, user, device),
                        )?;
                        budget = budget.saturating_sub(1);
                        if removed >= limit || budget == 0 {
                            return Ok(removed);
                        }
                    }
                    if page.len() < DEVICE_PAGE_ROWS as usize {
                        break;
                    }
                }
            }
            next += 1;
            self.execute(&self.statements.put_progress, (next, seed, DEVICE_PROGRESS))?;
        }
        Ok(removed)
    }

    fn account_deleted_at(&mut self, user: &str) -> Result<Option<u64>> {
        let revoked: Vec<(String, i64)> = self.rows(&self.statements.revocations, (user,))?;
        Ok(revoked
            .into_iter()
            .find(|(scope, _)| scope == super::ACCOUNT_DELETED_SCOPE)
            .map(|(_, at)| at.max(0) as u64))
    }

    fn put_push_target(&mut self, user: &str, device: &str, target: Option<&[u8]>) -> Result<()> {
        match target {
            Some(target) => {
                let now = super::unix_ms_now() as i64;
                self.execute(
                    &self.statements.put_push_target,
                    (user, device, target, now),
                )
            }
            None => self.execute(&self.statements.delete_push_target, (user, device)),
        }
    }

    fn push_targets(&mut self, user: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let mut rows: Vec<(String, Vec<u8>)> = self.rows(&self.statements.push_targets, (user,))?;
        rows.truncate(super::PUSH_TARGETS_PER_USER_MAX);
        Ok(rows)
    }

    fn revoked_at(&mut self, user: &str, device: &str) -> Result<Option<u64>> {
        let rows: Vec<(String, i64)> = self.rows(&self.statements.revocations, (user,))?;
        Ok(rows
            .into_iter()
            .filter(|(scope, _)| scope.is_empty() || scope == device)
            .map(|(_, at)| at.max(0) as u64)
            .max())
    }

    fn add_members(&mut self, group: &str, members: &[&str]) -> Result<()> {
        for member in members {
            self.execute(&self.statements.put_member, (group, *member))?;
            self.execute(&self.statements.put_group_of, (*member, group))?;
        }
        Ok(())
    }

    fn remove_members(&mut self, group: &str, members: &[&str]) -> Result<()> {
        for member in members {
            self.execute(&self.statements.delete_member, (group, *member))?;
            self.execute(&self.statements.delete_group_of, (*member, group))?;
        }
        Ok(())
    }

    fn set_roles(
        &mut self,
        group: &str,
        members: &[&str],
        joined_id: Option<u64>,
        admin: Option<bool>,
    ) -> Result<()> {
        for member in members {
            if let Some(joined) = joined_id {
                let joined = i64::try_from(joined)?;
                self.execute(&self.statements.set_joined, (joined, group, *member))?;
            }
            if let Some(admin) = admin {
                self.execute(&self.statements.set_admin, (admin, group, *member))?;
            }
        }
        Ok(())
    }

    fn member_roles(&mut self, group: &str) -> Result<Vec<MemberRole>> {
        let limit = super::MEMBERSHIP_READ_MAX as i32;
        let rows: Vec<(String, Option<bool>, Option<i64>)> =
            self.rows(&self.statements.member_roles, (group, limit))?;
        Ok(rows
            .into_iter()
            .map(|(user, admin, joined)| MemberRole {
                user,
                admin: admin.unwrap_or(false),
                joined_id: joined.unwrap_or(0).max(0) as u64,
            })
            .collect())
    }

    fn admins_only(&mut self, group: &str) -> Result<bool> {
        let rows: Vec<(Option<bool>,)> = self.rows(&self.statements.admins_only, (group,))?;
        Ok(rows.first().and_then(|(value,)| *value).unwrap_or(false))
    }

    fn set_admins_only(&mut self, group: &str, admins_only: bool) -> Result<()> {
        self.execute(&self.statements.set_admins_only, (group, admins_only))
    }

    fn groups_of(&mut self, user: &str) -> Result<Vec<String>> {
        let limit = super::MEMBERSHIP_READ_MAX as i32;
        let rows: Vec<(String,)> = self.rows(&self.statements.groups_of, (user, limit))?;
        Ok(rows.into_iter().map(|(group,)| group).collect())
    }

    fn put_presence(&mut self, node: u16, entries: &[PresenceEntry<'_>]) -> Result<()> {
        for entry in entries {
            self.execute(
                &self.statements.put_presence,
                (
                    entry.user,
                    i32::from(node),
                    entry.online,
                    id(entry.last_seen_ms),
                    if entry.online { 0 } else { self.presence_ttl_s },
                ),
            )?;
        }
        Ok(())
    }

    fn presence(&mut self, user: &str) -> Result<Vec<Presence>> {
        let limit = super::PRESENCE_NODES_MAX as i32;
        let rows: Vec<(bool, i64)> = self.rows(&self.statements.presence, (user, limit))?;
        Ok(rows
            .into_iter()
            .map(|(online, seen)| Presence {
                online,
                last_seen_ms: seen as u64,
            })
            .collect())
    }

    fn put_device_keys(&mut self, upload: &DeviceKeys<'_>) -> Result<u32> {
        let (user, device) = (upload.user, upload.device);
        let stored = self.prekey_count(user, device)?;
        let total = stored + upload.one_time_prekeys.len() as u32;
        anyhow::ensure!(
            total <= STORED_PREKEYS_MAX,
            ReadRefused("the device would hold more one-time prekeys than allowed")
        );
        self.execute(
            &self.statements.put_device_keys,
            (
                user,
                device,
                upload.identity_key,
                upload.signed_prekey,
                upload.signed_prekey_signature,
            ),
        )?;
        let last: Vec<(i64,)> = self.rows(&self.statements.last_prekey, (user, device))?;
        let first = last.first().map_or(1, |(id,)| id + 1);
        for (id, prekey) in (first..).zip(upload.one_time_prekeys) {
            self.execute(
                &self.statements.put_prekey,
                (user, device, id, prekey.as_str()),
            )?;
        }
        Ok(total)
    }

    fn take_bundles(&mut self, user: &str) -> Result<Vec<(Bundle, u32)>> {
        let devices: Vec<(String, String, String, String)> =
            self.rows(&self.statements.device_keys, (user,))?;
        let mut bundles = Vec::new();
        for (device, identity_key, signed_prekey, signed_prekey_signature) in devices {
            let mut taken = None;
            for _ in 0..CAS_ATTEMPTS {
                let first: Vec<(i64, String)> =
                    self.rows(&self.statements.first_prekey, (user, device.as_str()))?;
                let Some((key_id, prekey)) = first.into_iter().next() else {
                    break;
                };
                // Only the fetch whose conditional delete applies gets it.
                if self.applied(
                    &self.statements.take_prekey,
                    (user, device.as_str(), key_id),
                )? {
                    taken = Some(prekey);
                    break;
                }
            }
            let left = self.prekey_count(user, &device)?;
            bundles.push((
                Bundle {
                    device,
                    identity_key,
                    signed_prekey,
                    signed_prekey_signature,
                    one_time_prekey: taken,
                },
                left,
            ));
        }
        Ok(bundles)
    }
}

impl Scylla {
    fn prekey_count(&self, user: &str, device: &str) -> Result<u32> {
        let rows: Vec<(i64,)> = self.rows(&self.statements.count_prekeys, (user, device))?;
        Ok(rows.first().map_or(0, |(count,)| *count as u32))
    }
}
