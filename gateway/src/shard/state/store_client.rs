//! The shard's connection to the storage-writer's read path (a Unix socket).
//!
//! Owns connecting (and reconnecting with back-off), the `Hello` that names
//! this shard's ring, in-flight read requests (bounded; matched to answers by
//! id; re-sent after a reconnect, since reads are idempotent), and passing
//! `Durable` notices to its owner (the shard, through `ReadPathOwner`, so
//! this file knows nothing above it). Runs on the shard's thread; never
//! blocks it: requests are awaited by the tasks that need them, with a timeout.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::poll_fn;
use std::path::PathBuf;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Duration;

use chat_protocol::store_wire::{self, Request, Response};
use monoio::io::{AsyncReadRent, AsyncWriteRentExt, Splitable};
use monoio::net::UnixStream;

use crate::limits::{
    STORE_INFLIGHT_MAX, STORE_READ_CHUNK_BYTES, STORE_RECONNECT_BACKOFF_MAX_MS,
    STORE_RECONNECT_BACKOFF_MIN_MS, STORE_STARTUP_GRACE_MS,
};

const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(STORE_RECONNECT_BACKOFF_MIN_MS);
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_millis(STORE_RECONNECT_BACKOFF_MAX_MS);

/// What owns a read-path client: where `Durable` notices and the
/// connection state go. The shard implements it.
pub trait ReadPathOwner: 'static {
    fn read_path(&self) -> &StoreClient;
    fn shard_id(&self) -> usize;
    fn on_durable(&self, position: u64);
    /// The writer's commits fail, for `reason` (until the next `Durable`).
    fn on_stalled(&self, reason: String);
    /// The writer did not store this shard's message `message_id`.
    fn on_refused(&self, message_id: u64, reason: String);
    fn set_connected(&self, connected: bool);
}

type FnvBuildHasher = std::hash::BuildHasherDefault<fnv::FnvHasher>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage is unavailable; retry")]
    Unavailable,
    #[error("{0}")]
    Refused(String),
}

struct Slot {
    /// The encoded request, kept to re-send after a reconnect.
    frame: Vec<u8>,
    response: RefCell<Option<Response>>,
    waker: Cell<Option<Waker>>,
}

pub struct StoreClient {
    shard_id: u16,
    ring_path: String,
    socket_path: PathBuf,
    next_req: Cell<u32>,
    inflight: RefCell<HashMap<u32, Rc<Slot>, FnvBuildHasher>>,
    /// Bytes waiting for the writer task.
    outgoing: RefCell<Vec<u8>>,
    writer_waker: Cell<Option<Waker>>,
    /// Bumped on every connect and disconnect; a writer task of an old
    /// connection sees the change and ends.
    generation: Cell<u64>,
    connected: Cell<bool>,
}

impl StoreClient {
    pub fn new(shard_id: u16, ring_path: String, socket_path: PathBuf) -> Self {
        Self {
            shard_id,
            ring_path,
            socket_path,
            next_req: Cell::new(1),
            inflight: RefCell::default(),
            outgoing: RefCell::default(),
            writer_waker: Cell::new(None),
            generation: Cell::new(0),
            connected: Cell::new(false),
        }
    }

    /// Sends the request `build(id)` and waits for its answer.
    pub async fn request(
        &self,
        build: impl FnOnce(u32) -> Request,
        timeout: Duration,
    ) -> Result<Response, StoreError> {
        if self.inflight.borrow().len() >= STORE_INFLIGHT_MAX {
            return Err(StoreError::Unavailable);
        }
        let req = self.next_req.get();
        self.next_req.set(req.wrapping_add(1).max(1));
        let slot = Rc::new(Slot {
            frame: build(req).encode(),
            response: RefCell::new(None),
            waker: Cell::new(None),
        });
        self.inflight.borrow_mut().insert(req, slot.clone());
        if self.connected.get() {
            self.outgoing.borrow_mut().extend_from_slice(&slot.frame);
            self.wake_writer();
        }
        let answer = poll_fn(|cx| match slot.response.borrow_mut().take() {
            Some(response) => Poll::Ready(response),
            None => {
                slot.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        });
        let result = monoio::time::timeout(timeout, answer).await;
        self.inflight.borrow_mut().remove(&req);
        match result {
            Ok(Response::Failed {
                retryable: true, ..
            }) => Err(StoreError::Unavailable),
            Ok(Response::Failed { reason, .. }) => Err(StoreError::Refused(reason)),
            Ok(response) => Ok(response),
            Err(_) => Err(StoreError::Unavailable),
        }
    }

    fn wake_writer(&self) {
        if let Some(waker) = self.writer_waker.take() {
            waker.wake();
        }
    }

    fn complete(&self, req: u32, response: Response) {
        let slot = self.inflight.borrow().get(&req).cloned();
        if let Some(slot) = slot {
            *slot.response.borrow_mut() = Some(response);
            if let Some(waker) = slot.waker.take() {
                waker.wake();
            }
        }
    }
}

/// Keeps the shard connected to the storage-writer for as long as it runs.
pub async fn run<O: ReadPathOwner>(shard: Rc<O>) {
    let client = shard.read_path();
    let shard_id = shard.shard_id();
    let mut backoff = RECONNECT_BACKOFF_MIN;
    let mut warned = false;
    let started = std::time::Instant::now();
    loop {
        let stream = match UnixStream::connect(&client.socket_path).await {
            Ok(stream) => stream,
            Err(error) => {
                // A writer starting next to the gateway takes a moment: no noise for that.
                if !warned && started.elapsed() > Duration::from_millis(STORE_STARTUP_GRACE_MS) {
                    tracing::warn!(shard = shard_id, socket = %client.socket_path.display(), %error, "storage-writer not reachable; acknowledgements wait until it is");
                    warned = true;
                }
                monoio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
                continue;
            }
        };
        backoff = RECONNECT_BACKOFF_MIN;
        warned = false;
        tracing::info!(shard = shard_id, "connected to the storage-writer");
        let (reader, writer) = stream.into_split();
        {
            let mut outgoing = client.outgoing.borrow_mut();
            outgoing.clear();
            outgoing.extend_from_slice(
                &Request::Hello {
                    version: store_wire::READ_PATH_VERSION,
                    shard: client.shard_id,
                    ring: client.ring_path.clone(),
                }
                .encode(),
            );
            for slot in client.inflight.borrow().values() {
                outgoing.extend_from_slice(&slot.frame);
            }
        }
        client.generation.set(client.generation.get() + 1);
        client.connected.set(true);
        shard.set_connected(true);
        monoio::spawn(write_loop(shard.clone(), writer, client.generation.get()));
        if let Err(error) = read_loop(&shard, reader).await {
            tracing::warn!(shard = shard_id, %error, "lost the storage-writer; reconnecting");
        }
        client.connected.set(false);
        shard.set_connected(false);
        client.generation.set(client.generation.get() + 1);
        client.outgoing.borrow_mut().clear();
        client.wake_writer();
        monoio::time::sleep(RECONNECT_BACKOFF_MIN).await;
    }
}

async fn write_loop<O: ReadPathOwner>(
    shard: Rc<O>,
    mut writer: monoio::io::OwnedWriteHalf<UnixStream>,
    generation: u64,
) {
    let client = shard.read_path();
    loop {
        let pending = poll_fn(|cx| {
            if client.generation.get() != generation {
                return Poll::Ready(None);
            }
            let bytes = std::mem::take(&mut *client.outgoing.borrow_mut());
            if bytes.is_empty() {
                client.writer_waker.set(Some(cx.waker().clone()));
                return Poll::Pending;
            }
            Poll::Ready(Some(bytes))
        })
        .await;
        let Some(bytes) = pending else {
            return;
        };
        let (result, _) = writer.write_all(bytes).await;
        if result.is_err() {
            return; // the read loop sees the connection end too
        }
    }
}

async fn read_loop<O: ReadPathOwner>(
    shard: &Rc<O>,
    mut reader: monoio::io::OwnedReadHalf<UnixStream>,
) -> anyhow::Result<()> {
    let mut buffer: Vec<u8> = Vec::new();
    // monoio reads into a buffer from its start, so read into a chunk and append.
    let mut chunk: Vec<u8> = Vec::with_capacity(STORE_READ_CHUNK_BYTES);
    loop {
        chunk.clear();
        let (result, returned) = reader.read(chunk).await;
        chunk = returned;
        if result? == 0 {
            anyhow::bail!("the storage-writer closed the connection");
        }
        buffer.extend_from_slice(&chunk);
        let mut consumed = 0;
        while let Some(len) = store_wire::frame_len(&buffer[consumed..])? {
            if buffer.len() - consumed < len {
                break;
            }
            let response = Response::decode(&buffer[consumed + 4..consumed + len])?;
            consumed += len;
            match response {
                Response::Durable { position } => shard.on_durable(position),
                Response::Stalled { reason } => shard.on_stalled(reason),
                Response::Refused { message_id, reason } => shard.on_refused(message_id, reason),
                Response::SyncPage { req, .. }
                | Response::Messages { req, .. }
                | Response::RecentSends { req, .. }
                | Response::KeysUploaded { req, .. }
                | Response::SendOf { req, .. }
                | Response::Keys { req, .. }
                | Response::MemberRoles { req, .. }
                | Response::Devices { req, .. }
                | Response::Presence { req, .. }
                | Response::Revoked { req, .. }
                | Response::RevokedAt { req, .. }
                | Response::PushTargetStored { req, .. }
                | Response::AccountDeleted { req, .. }
                | Response::DeviceSeenStored { req, .. }
                | Response::Groups { req, .. }
                | Response::Failed { req, .. } => shard.read_path().complete(req, response),
            }
        }
        buffer.drain(..consumed);
    }
}
