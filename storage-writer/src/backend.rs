//! Choosing and opening a backend from the command line's options.
//!
//! Owns `BackendKind`, `BackendOptions` and `open`, and the embedded
//! store's `Backend` (the default). The seam itself (`Backend`,
//! `BatchWriter`, `Tables`) is `store`'s, below this file, so the backends
//! never import it back. Never holds records.

use std::path::PathBuf;

use anyhow::Result;

use crate::store::embedded::{Embedded, Fsync};
use crate::store::{Backend, BatchWriter, Tables};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    /// fjall in `--data-dir`: a single node with nothing else installed.
    Embedded,
    /// PostgreSQL at `--postgres-url`: small clusters.
    Postgres,
    /// ScyllaDB at `--scylla-uri`: large clusters (build with `--features scylla`).
    Scylla,
}

/// Everything a backend needs to open.
#[derive(Debug, Clone)]
// Fields read only in builds with the `scylla` or `postgres` feature.
#[cfg_attr(
    any(not(feature = "scylla"), not(feature = "postgres")),
    allow(dead_code)
)]
pub struct BackendOptions {
    pub kind: BackendKind,
    pub data_dir: PathBuf,
    pub fsync: Fsync,
    pub cache_bytes: u64,
    pub postgres_url: Option<String>,
    pub scylla_uri: Option<String>,
    pub scylla_keyspace: String,
    pub scylla_replication_factor: u8,
    pub scylla_consistency: String,
    /// How long an idempotency key is kept (ScyllaDB: its TTL).
    pub idempotency_window: std::time::Duration,
    /// How long an offline presence row is kept (ScyllaDB: its TTL; 0: kept).
    pub presence_retention: std::time::Duration,
    /// How long messages are kept (ScyllaDB: their TTL; `None`: forever).
    pub message_retention: Option<std::time::Duration>,
    /// How long a device not seen keeps its rows (ScyllaDB: sizes the time
    /// buckets of `devices_by_seen` when the keyspace first gets them).
    pub device_retention: std::time::Duration,
    /// PostgreSQL: the window of one partition, in ms.
    pub postgres_partition_ms: u64,
}

pub fn open(options: &BackendOptions) -> Result<Box<dyn Backend>> {
    match options.kind {
        BackendKind::Embedded => {
            std::fs::create_dir_all(&options.data_dir)?;
            let store = Embedded::open(
                &options.data_dir.join("store"),
                options.cache_bytes,
                options.fsync,
                options.message_retention,
            )?;
            Ok(Box::new(EmbeddedBackend(store)))
        }
        BackendKind::Postgres => open_postgres(options),
        BackendKind::Scylla => open_scylla(options),
    }
}

#[cfg(feature = "postgres")]
fn open_postgres(options: &BackendOptions) -> Result<Box<dyn Backend>> {
    let url = options
        .postgres_url
        .as_deref()
        .ok_or_else(|| anyhow::anyhow!("--backend postgres needs --postgres-url"))?;
    Ok(Box::new(
        crate::store::postgres::PostgresBackend::connect_with(url, options.postgres_partition_ms)?,
    ))
}

#[cfg(not(feature = "postgres"))]
fn open_postgres(_: &BackendOptions) -> Result<Box<dyn Backend>> {
    anyhow::bail!("this build has no PostgreSQL backend (build with --features postgres)")
}

#[cfg(feature = "scylla")]
fn open_scylla(options: &BackendOptions) -> Result<Box<dyn Backend>> {
    let uri = options
        .scylla_uri
        .as_deref()
        .ok_or_else(|| anyhow::anyhow!("--backend scylla needs --scylla-uri"))?;
    Ok(Box::new(crate::store::scylla::ScyllaBackend::connect(
        uri,
        &options.scylla_keyspace,
        options.scylla_replication_factor,
        &options.scylla_consistency,
        crate::store::scylla::Lifetimes {
            idempotency_window: options.idempotency_window,
            presence_retention: options.presence_retention,
            message_retention: options.message_retention,
            device_retention: options.device_retention,
        },
    )?))
}

#[cfg(not(feature = "scylla"))]
fn open_scylla(_: &BackendOptions) -> Result<Box<dyn Backend>> {
    anyhow::bail!("this build has no ScyllaDB backend (build with --features scylla)")
}

pub struct EmbeddedBackend(pub Embedded);

struct EmbeddedBatchWriter(crate::store::embedded::EmbeddedWriter);

impl BatchWriter for EmbeddedBatchWriter {
    fn write_batch(&mut self, work: &mut dyn FnMut(&mut dyn Tables) -> Result<()>) -> Result<()> {
        work(&mut self.0)?;
        self.0.persist()
    }

    /// fjall poisons its keyspace when a journal write or fsync fails (a
    /// full disk, an I/O error): every later write fails until the store is
    /// opened again, and opening it replays its journal.
    fn must_restart(&self, error: &anyhow::Error) -> bool {
        error
            .chain()
            .any(|cause| matches!(cause.downcast_ref(), Some(fjall::Error::Poisoned)))
    }
}

impl Backend for EmbeddedBackend {
    fn name(&self) -> &'static str {
        "embedded"
    }
    fn writer(&self) -> Result<Box<dyn BatchWriter>> {
        Ok(Box::new(EmbeddedBatchWriter(self.0.writer())))
    }
    fn reader(&self) -> Result<Box<dyn Tables + Send>> {
        Ok(Box::new(self.0.clone()))
    }
}
