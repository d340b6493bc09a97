//! The PostgreSQL backend: small clusters, and several nodes sharing one database.
//!
//! Owns the schema (`schema/postgres.sql`, applied under an advisory lock so
//! writers starting together do not race), one transaction per batch, and
//! the per-user inbox counter (`inbox_heads`), whose row lock keeps sequences
//! gap-free when writers on several nodes append to one user's inbox. Never
//! reads or writes outside a statement's parameters (no string-built SQL).

use anyhow::{Context, Result};
use chat_protocol::store_wire::RecentSend;
use postgres::{Client, GenericClient, NoTls};

use super::{Cursor, InboxEntry, Tables};
use crate::backend::{Backend, BatchWriter};

const SCHEMA: &str = include_str!("../../schema/postgres.sql");
/// Arbitrary, fixed: serialises schema set-up across writers.
const SCHEMA_LOCK: i64 = 0x63_68_61_74;

pub struct PostgresBackend {
    url: String,
}

impl PostgresBackend {
    pub fn connect(url: &str) -> Result<Self> {
        let mut client = Client::connect(url, NoTls).context("connecting to PostgreSQL")?;
        client.execute("SELECT pg_advisory_lock($1)", &[&SCHEMA_LOCK])?;
        let applied = client.batch_execute(SCHEMA);
        client.execute("SELECT pg_advisory_unlock($1)", &[&SCHEMA_LOCK])?;
        applied.context("applying schema/postgres.sql")?;
        Ok(Self {
            url: url.to_owned(),
        })
    }
}

impl Backend for PostgresBackend {
    fn name(&self) -> &'static str {
        "postgres"
    }
    fn writer(&self) -> Result<Box<dyn BatchWriter>> {
        Ok(Box::new(PostgresWriter {
            url: self.url.clone(),
            client: None,
        }))
    }
    fn reader(&self) -> Result<Box<dyn Tables + Send>> {
        Ok(Box::new(Pg {
            client: Client::connect(&self.url, NoTls)?,
            for_update: false,
        }))
    }
}

/// Reconnects lazily, so a database restart costs retried batches, not the process.
struct PostgresWriter {
    url: String,
    client: Option<Client>,
}

impl BatchWriter for PostgresWriter {
    fn write_batch(&mut self, work: &mut dyn FnMut(&mut dyn Tables) -> Result<()>) -> Result<()> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = Some(Client::connect(&self.url, NoTls).context("reconnecting")?);
        }
        let client = self.client.as_mut().expect("connected above");
        let transaction = client.transaction()?;
        let mut tables = Pg {
            client: transaction,
            for_update: true,
        };
        work(&mut tables)?;
        tables.client.commit()?;
        Ok(())
    }
}

/// The tables over a client or a transaction.
struct Pg<C> {
    client: C,
    /// Lock rows read for update (inside a batch's transaction).
    for_update: bool,
}

fn id(value: u64) -> i64 {
    value as i64
}

impl<C: GenericClient + Send> Tables for Pg<C> {
    fn message(&mut self, conversation: &str, message_id: u64) -> Result<Option<Vec<u8>>> {
        let row = self.client.query_opt(
            "SELECT record FROM messages WHERE conversation = $1 AND message_id = $2",
            &[&conversation, &id(message_id)],
        )?;
        Ok(row.map(|row| row.get(0)))
    }

    fn put_message(&mut self, conversation: &str, message_id: u64, record: &[u8]) -> Result<()> {
        self.client.execute(
            "INSERT INTO messages (conversation, message_id, record) VALUES ($1, $2, $3) \
             ON CONFLICT DO NOTHING",
            &[&conversation, &id(message_id), &record],
        )?;
        Ok(())
    }

    fn history(
        &mut self,
        conversation: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Vec<u8>>> {
        let rows = self.client.query(
            "SELECT record FROM messages WHERE conversation = $1 AND message_id < $2 \
             ORDER BY message_id DESC LIMIT $3",
            &[
                &conversation,
                &id(before.unwrap_or(i64::MAX as u64)),
                &(limit as i64),
            ],
        )?;
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
        self.client.execute(
            "INSERT INTO sends (user_id, device_id, client_msg_id, message_id, conversation) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
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

    fn recent_sends(
        &mut self,
        user: &str,
        device: &str,
        since_message_id: u64,
        limit: usize,
    ) -> Result<Vec<RecentSend>> {
        let rows = self.client.query(
            "SELECT client_msg_id, message_id, conversation FROM sends \
             WHERE user_id = $1 AND device_id = $2 AND message_id >= $3 \
             ORDER BY message_id DESC LIMIT $4",
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
        let row = self.client.query_one(
            "INSERT INTO inbox_heads (user_id, seq) VALUES ($1, 1) \
             ON CONFLICT (user_id) DO UPDATE SET seq = inbox_heads.seq + 1 RETURNING seq",
            &[&user],
        )?;
        let seq: i64 = row.get(0);
        self.client.execute(
            "INSERT INTO inbox (user_id, seq, message_id, conversation, origin_device) \
             VALUES ($1, $2, $3, $4, $5)",
            &[&user, &seq, &id(message_id), &conversation, &origin_device],
        )?;
        Ok(seq as u64)
    }

    fn inbox_entry_of(&mut self, user: &str, message_id: u64) -> Result<Option<(u64, String)>> {
        let row = self.client.query_opt(
            "SELECT seq, conversation FROM inbox WHERE user_id = $1 AND message_id = $2",
            &[&user, &id(message_id)],
        )?;
        Ok(row.map(|row| (row.get::<_, i64>(0) as u64, row.get(1))))
    }

    fn inbox_after(&mut self, user: &str, after: u64, limit: usize) -> Result<Vec<InboxEntry>> {
        let rows = self.client.query(
            "SELECT seq, message_id, conversation, origin_device FROM inbox \
             WHERE user_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            &[&user, &id(after), &(limit as i64)],
        )?;
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

    fn cursor(&mut self, user: &str, device: &str) -> Result<Cursor> {
        let sql = if self.for_update {
            "SELECT state FROM cursors WHERE user_id = $1 AND device_id = $2 FOR UPDATE"
        } else {
            "SELECT state FROM cursors WHERE user_id = $1 AND device_id = $2"
        };
        match self.client.query_opt(sql, &[&user, &device])? {
            Some(row) => Ok(Cursor::decode(row.get::<_, &[u8]>(0))?),
            None => Ok(Cursor::default()),
        }
    }

    fn put_cursor(&mut self, user: &str, device: &str, cursor: &Cursor) -> Result<()> {
        self.client.execute(
            "INSERT INTO cursors (user_id, device_id, state) VALUES ($1, $2, $3) \
             ON CONFLICT (user_id, device_id) DO UPDATE SET state = EXCLUDED.state",
            &[&user, &device, &cursor.encode()],
        )?;
        Ok(())
    }
}
