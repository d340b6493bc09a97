//! One WebSocket connection: its send queue, and the task that reads and writes its socket.
//!
//! Owns a connection's bounded outbox, its close decision, its liveness clock,
//! and the read path: wait for readiness, read into the shard's shared buffer,
//! decode frames, hand text to the router. An idle connection parks one
//! readiness wait and no buffer (the memory budget in ARCHITECTURE.md).
//! Runs only on its shard's thread. Never routes messages itself (`router`)
//! and never blocks: every read and write is non-blocking.

use std::cell::{Cell, RefCell};
use std::collections::{HashSet, VecDeque};
use std::future::{poll_fn, Future};
use std::io::{self, ErrorKind, IoSlice};
use std::os::fd::{AsRawFd, RawFd};
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chat_protocol::codes::CloseCode;
use chat_protocol::ws::{self, Flow, WsDecoder, WsEvent};
use monoio::net::TcpStream;

use super::limits::TokenBucket;
use super::{router, sync, Shard};
use crate::metrics::bump;
use crate::sock;

/// Reads per readiness wake-up before the task yields to others (fairness).
const READS_PER_WAKE_MAX: usize = 4;
/// Outbox entries written per `sendmsg` call.
const IOVECS_PER_WRITE_MAX: usize = 64;
/// Bytes read at once into a partial frame's own buffer.
const PARTIAL_READ_BYTES: usize = 16 * 1024;

/// A registered connection, shared between its task and the shard's tables.
pub struct Conn {
    /// Key in the shard's connection slab.
    pub slot: usize,
    pub user_id: Rc<str>,
    pub device_id: Box<str>,
    /// Encoded bytes waiting to be written, oldest first. Bounded by `outbox_bytes_max`.
    outbox: RefCell<VecDeque<Bytes>>,
    outbox_bytes: Cell<u32>,
    outbox_bytes_max: u32,
    /// Set once; the task closes the connection with this code.
    close: Cell<Option<CloseCode>>,
    waker: Cell<Option<Waker>>,
    /// True between a wake and the task's next poll (coalesces wakes).
    notified: Cell<bool>,
    /// Shard clock (ms) of the last bytes received.
    last_seen_ms: Cell<u64>,
    /// (start of the current minute on the shard clock, wrapping; client errors in it).
    errors_in_window: Cell<(u32, u32)>,
    /// Text frames this connection may still send (rate limit).
    pub frames: Cell<TokenBucket>,
    /// While a sync runs: live messages held back until it ends (boxed, so
    /// an idle connection pays one pointer).
    sync: Cell<Option<Box<SyncHold>>>,
    /// True while a frame of this connection waits for storage; its later
    /// frames are not read until then (their order is kept).
    paused: Cell<bool>,
    /// The connect-time warm-up hit its bound: an unknown send id may still
    /// be an older send, so storage is asked before a new id is made.
    warm_truncated: Cell<bool>,
}

/// What a connection holds while its sync runs.
#[derive(Default)]
struct SyncHold {
    /// Live messages that arrived during the sync, in order.
    held: Vec<(u64, Bytes)>,
    held_bytes: usize,
    /// Message ids the sync sent, so a held live copy is not sent twice.
    synced: HashSet<u64, FnvBuildHasher>,
}

type FnvBuildHasher = std::hash::BuildHasherDefault<fnv::FnvHasher>;

/// The message id of frames that are never stored (typing).
pub const EPHEMERAL: u64 = 0;

impl Conn {
    pub fn new(
        slot: usize,
        user_id: Rc<str>,
        device_id: &str,
        outbox_bytes_max: usize,
        frames: TokenBucket,
        now_ms: u64,
    ) -> Self {
        Self {
            slot,
            user_id,
            device_id: device_id.into(),
            outbox: RefCell::new(VecDeque::new()),
            outbox_bytes: Cell::new(0),
            outbox_bytes_max: u32::try_from(outbox_bytes_max)
                .expect("config bounds send_queue_bytes_max below 4 GiB"),
            close: Cell::new(None),
            waker: Cell::new(None),
            notified: Cell::new(false),
            last_seen_ms: Cell::new(now_ms),
            errors_in_window: Cell::new((now_ms as u32, 0)),
            frames: Cell::new(frames),
            sync: Cell::new(None),
            paused: Cell::new(false),
            warm_truncated: Cell::new(false),
        }
    }

    /// Stops processing this connection's frames until `resume`.
    pub fn pause(&self) {
        self.paused.set(true);
    }

    /// Processes this connection's frames again, from where they stopped.
    pub fn resume(&self) {
        self.paused.set(false);
        self.wake();
    }

    pub fn is_paused(&self) -> bool {
        self.paused.get()
    }

    pub fn set_warm_truncated(&self, truncated: bool) {
        self.warm_truncated.set(truncated);
    }

    pub fn warm_truncated(&self) -> bool {
        self.warm_truncated.get()
    }

    /// Queues a live message; while a sync runs it is held until the sync
    /// ends. An ephemeral frame (`message_id` 0: typing) is dropped instead:
    /// it would be stale by then.
    pub fn deliver(&self, message_id: u64, frame: Bytes) -> bool {
        let Some(mut hold) = self.sync.take() else {
            return self.enqueue(frame);
        };
        if message_id == EPHEMERAL {
            self.sync.set(Some(hold));
            return false;
        }
        let fits = hold.held_bytes + frame.len() <= self.outbox_bytes_max as usize;
        if fits {
            hold.held_bytes += frame.len();
            hold.held.push((message_id, frame));
        }
        self.sync.set(Some(hold));
        if !fits {
            self.request_close(CloseCode::SlowConsumer);
        }
        fits && !self.is_closing()
    }

    /// Starts holding live messages for a sync. False if one is running.
    pub fn begin_sync(&self) -> bool {
        let hold = self.sync.take();
        let running = hold.is_some();
        self.sync.set(Some(hold.unwrap_or_default()));
        !running
    }

    /// Queues a message the sync read from storage.
    pub fn enqueue_synced(&self, message_id: u64, frame: Bytes) -> bool {
        if let Some(mut hold) = self.sync.take() {
            hold.synced.insert(message_id);
            self.sync.set(Some(hold));
        }
        self.enqueue(frame)
    }

    /// Ends the sync: queues the held live messages it did not already send.
    pub fn end_sync(&self) {
        let Some(hold) = self.sync.take() else {
            return;
        };
        for (message_id, frame) in hold.held {
            if !hold.synced.contains(&message_id) && !self.enqueue(frame) {
                return;
            }
        }
    }

    /// Bytes waiting to be written to the socket.
    pub fn queued_bytes(&self) -> usize {
        self.outbox_bytes.get() as usize
    }

    /// Queues encoded bytes. A full outbox closes the connection as a slow
    /// consumer (4001) and returns false; so does a closing connection.
    pub fn enqueue(&self, bytes: Bytes) -> bool {
        if self.close.get().is_some() {
            return false;
        }
        let queued = u64::from(self.outbox_bytes.get()) + bytes.len() as u64;
        if queued > u64::from(self.outbox_bytes_max) {
            self.request_close(CloseCode::SlowConsumer);
            return false;
        }
        self.outbox_bytes.set(queued as u32);
        self.outbox.borrow_mut().push_back(bytes);
        self.wake();
        true
    }

    /// Asks the task to close with `code`; the first request wins.
    pub fn request_close(&self, code: CloseCode) {
        if self.close.get().is_none() {
            self.close.set(Some(code));
            self.wake();
        }
    }

    pub fn is_closing(&self) -> bool {
        self.close.get().is_some()
    }

    pub fn last_seen_ms(&self) -> u64 {
        self.last_seen_ms.get()
    }

    /// Counts a client error; true when the connection passed `errors_max` in a minute.
    pub fn count_error(&self, now_ms: u64, errors_max: u32) -> bool {
        let now = now_ms as u32;
        let (window_start_ms, count) = self.errors_in_window.get();
        let (window_start_ms, count) = if now.wrapping_sub(window_start_ms) >= 60_000 {
            (now, 1)
        } else {
            (window_start_ms, count + 1)
        };
        self.errors_in_window.set((window_start_ms, count));
        count > errors_max
    }

    fn has_outbound(&self) -> bool {
        !self.outbox.borrow().is_empty()
    }

    fn wake(&self) {
        if self.notified.replace(true) {
            return;
        }
        if let Some(waker) = self.waker.take() {
            waker.wake_by_ref();
            self.waker.set(Some(waker));
        }
    }

    fn register(&self, waker: &Waker) {
        self.notified.set(false);
        let current = self.waker.take();
        self.waker.set(Some(match current {
            Some(current) if current.will_wake(waker) => current,
            _ => waker.clone(),
        }));
    }
}

enum Event {
    Readable(io::Result<()>),
    Writable(io::Result<()>),
    Woken,
}

enum Ending {
    /// The gateway closes with this code (it may be answering the client's close).
    Close(CloseCode),
    /// The peer vanished or the socket failed; nothing more can be sent.
    Lost,
}

/// Bytes of a frame that arrived in pieces, plus the framing state.
struct Reader {
    decoder: WsDecoder,
    /// An incomplete frame, or frames not yet processed because the
    /// connection paused; empty (no allocation) almost always.
    partial: Vec<u8>,
    /// `partial` holds frames that stopped at a pause and wait for `resume`.
    stalled: bool,
}

/// Serves one registered connection until it closes, then unregisters it.
pub async fn serve(shard: Rc<Shard>, stream: TcpStream, conn: Rc<Conn>, early_bytes: Vec<u8>) {
    let mut reader = Reader {
        decoder: WsDecoder::default(),
        partial: Vec::new(),
        stalled: false,
    };
    // Bytes of the outbox's front entry already written.
    let mut front_written = 0usize;
    // `hello` goes out now; the device's frames are read only once its recent
    // sends are loaded, so a retry after a gateway restart is recognised.
    let _ = flush(stream.as_raw_fd(), &shard, &conn, &mut front_written);
    // One boxed future for the whole start: the storage request's future is
    // large and short-lived; inline, it would size the connection's task for
    // as long as the connection lives.
    Box::pin(start(&shard, &conn)).await;
    if !early_bytes.is_empty() && !conn.is_closing() {
        let mut early_bytes = early_bytes;
        let consumed = process(&shard, &conn, &mut reader.decoder, &mut early_bytes);
        early_bytes.drain(..consumed);
        reader.partial = early_bytes;
        reader.stalled = conn.is_paused();
    }

    // Boxed so the long-lived task holds only the small steady-state future;
    // the close path (timers, two readiness waits) is allocated when needed.
    let ending = Box::pin(serve_until_closing(
        &shard,
        &stream,
        &conn,
        &mut reader,
        &mut front_written,
    ))
    .await;

    shard.unregister(&conn);
    if let Ending::Close(code) = ending {
        shard.metrics().closed(code);
        Box::pin(close_gracefully(
            &shard,
            &stream,
            &conn,
            code,
            front_written,
        ))
        .await;
    }
    drop(stream);
    shard.node.release_connection();
}

/// Before the device's frames are read: load its recent sends (idempotency
/// after a restart), wait for this node's backplane subscription to its user
/// (so the sync cannot miss a message published just before it), then start
/// its sync. Storage not answering closes with 1013.
async fn start(shard: &Rc<Shard>, conn: &Rc<Conn>) {
    if let Err(error) = sync::warm_idempotency(shard, conn).await {
        tracing::debug!(shard = shard.id, %error, "could not load recent sends");
        conn.request_close(CloseCode::TryAgainLater);
        return;
    }
    shard.interest_ready(&conn.user_id).await;
    monoio::spawn(sync::sync_device(shard.clone(), conn.clone(), None));
}

/// The connection's life: write what is queued, read what arrives, until a
/// close is requested or the peer is gone.
async fn serve_until_closing(
    shard: &Rc<Shard>,
    stream: &TcpStream,
    conn: &Rc<Conn>,
    reader: &mut Reader,
    front_written: &mut usize,
) -> Ending {
    let fd = stream.as_raw_fd();
    let mut read_ready = pin!(stream.readable(false));
    let mut write_ready: Option<Pin<Box<dyn Future<Output = io::Result<()>> + '_>>> = None;

    loop {
        if reader.stalled && !conn.is_paused() {
            process_stalled(shard, conn, reader);
        }
        if write_ready.is_none() && conn.has_outbound() {
            match flush(fd, shard, conn, front_written) {
                Ok(true) => {}
                Ok(false) => write_ready = Some(Box::pin(stream.writable(false))),
                Err(_) => break Ending::Lost,
            }
        }
        if let Some(code) = conn.close.get() {
            break Ending::Close(code);
        }
        let event = poll_fn(|cx| {
            conn.register(cx.waker());
            if conn.is_closing() || (write_ready.is_none() && conn.has_outbound()) {
                return Poll::Ready(Event::Woken);
            }
            if let Some(writable) = write_ready.as_mut() {
                if let Poll::Ready(result) = writable.as_mut().poll(cx) {
                    return Poll::Ready(Event::Writable(result));
                }
            }
            // Paused: the socket's later frames wait (back-pressure on the client).
            if conn.is_paused() || reader.stalled {
                return Poll::Pending;
            }
            read_ready.as_mut().poll(cx).map(Event::Readable)
        })
        .await;
        match event {
            Event::Woken => {}
            Event::Writable(Ok(())) => write_ready = None,
            Event::Readable(Ok(())) => {
                read_ready.set(stream.readable(false));
                if !read_available(shard, conn, fd, reader) {
                    break Ending::Lost;
                }
                // Frames after a pausing one wait in `partial` for the resume.
                reader.stalled = conn.is_paused() && !reader.partial.is_empty();
            }
            Event::Readable(Err(_)) | Event::Writable(Err(_)) => break Ending::Lost,
        }
    }
}

/// Processes frames that waited for a pause to end (no read first: they
/// are already here).
fn process_stalled(shard: &Rc<Shard>, conn: &Rc<Conn>, reader: &mut Reader) {
    let consumed = process(shard, conn, &mut reader.decoder, &mut reader.partial);
    reader.partial.drain(..consumed);
    if reader.partial.is_empty() {
        reader.partial = Vec::new();
    }
    reader.stalled = conn.is_paused() && !reader.partial.is_empty();
}

/// Reads what the socket has and processes it. False when the peer is gone.
fn read_available(shard: &Rc<Shard>, conn: &Rc<Conn>, fd: RawFd, reader: &mut Reader) -> bool {
    for _ in 0..READS_PER_WAKE_MAX {
        if conn.is_closing() || conn.is_paused() {
            return true;
        }
        let result = if reader.partial.is_empty() {
            read_into_scratch(shard, conn, fd, reader)
        } else {
            read_into_partial(shard, conn, fd, reader)
        };
        match result {
            Ok(ReadResult::Drained) => return true,
            Ok(ReadResult::More) => {}
            Ok(ReadResult::Eof) => return false,
            Err(error) if error.kind() == ErrorKind::WouldBlock => return true,
            Err(error) if error.kind() == ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    true
}

enum ReadResult {
    /// The socket is probably empty now.
    Drained,
    /// The buffer filled; there may be more.
    More,
    Eof,
}

/// The common case: no partial frame, so read into the shard's shared buffer
/// and keep only an incomplete tail (if any) for this connection.
fn read_into_scratch(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    fd: RawFd,
    reader: &mut Reader,
) -> io::Result<ReadResult> {
    let mut scratch = shard.scratch.take();
    let result = sock::recv(fd, &mut scratch);
    let outcome = match result {
        Ok(0) => Ok(ReadResult::Eof),
        Ok(read) => {
            conn.last_seen_ms.set(shard.now_ms());
            let consumed = process(shard, conn, &mut reader.decoder, &mut scratch[..read]);
            if consumed < read && !conn.is_closing() {
                let tail = &scratch[consumed..read];
                let frame_len = ws::frame_length(tail).unwrap_or(0).max(tail.len());
                let mut partial = Vec::with_capacity(frame_len);
                partial.extend_from_slice(tail);
                reader.partial = partial;
            }
            Ok(if read == scratch.len() {
                ReadResult::More
            } else {
                ReadResult::Drained
            })
        }
        Err(error) => Err(error),
    };
    *shard.scratch.borrow_mut() = scratch;
    outcome
}

/// A frame is arriving in pieces: read straight into its own buffer, sized
/// from its header, so a large frame is copied once.
fn read_into_partial(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    fd: RawFd,
    reader: &mut Reader,
) -> io::Result<ReadResult> {
    let have = reader.partial.len();
    // The decoder already refused headers announcing more than message_bytes_max,
    // so a known frame length is bounded.
    let want = match ws::frame_length(&reader.partial) {
        Some(frame_len) if frame_len > have => frame_len,
        _ => have + PARTIAL_READ_BYTES,
    };
    reader.partial.resize(want, 0);
    let result = sock::recv(fd, &mut reader.partial[have..]);
    let read = match result {
        Ok(read) => read,
        Err(error) => {
            reader.partial.truncate(have);
            return Err(error);
        }
    };
    reader.partial.truncate(have + read);
    if read == 0 {
        return Ok(ReadResult::Eof);
    }
    conn.last_seen_ms.set(shard.now_ms());
    let filled = have + read == want;
    let consumed = process(shard, conn, &mut reader.decoder, &mut reader.partial);
    reader.partial.drain(..consumed);
    if reader.partial.is_empty() {
        reader.partial = Vec::new();
    }
    Ok(if filled {
        ReadResult::More
    } else {
        ReadResult::Drained
    })
}

/// Decodes frames from `input` and acts on them. Returns bytes consumed.
fn process(shard: &Rc<Shard>, conn: &Rc<Conn>, decoder: &mut WsDecoder, input: &mut [u8]) -> usize {
    let metrics = shard.metrics();
    let result = decoder.decode(input, shard.config.message_bytes_max, |event| {
        bump(&metrics.frames_in, 1);
        match event {
            WsEvent::Text(text) => router::on_text(shard, conn, text),
            WsEvent::Ping(payload) => {
                conn.enqueue(Bytes::from(ws::pong_frame(payload)));
            }
            WsEvent::Pong => {}
            WsEvent::Close(_) => conn.request_close(CloseCode::Normal),
        }
        if conn.is_closing() || conn.is_paused() {
            Flow::Stop
        } else {
            Flow::Continue
        }
    });
    match result {
        Ok(consumed) => consumed,
        Err(code) => {
            conn.request_close(code);
            input.len()
        }
    }
}

/// Writes queued bytes until the queue is empty (true) or the socket is full (false).
fn flush(fd: RawFd, shard: &Shard, conn: &Conn, front_written: &mut usize) -> io::Result<bool> {
    loop {
        let sent = {
            let outbox = conn.outbox.borrow();
            if outbox.is_empty() {
                drop(outbox);
                // An idle connection keeps no queue capacity (memory budget).
                *conn.outbox.borrow_mut() = VecDeque::new();
                return Ok(true);
            }
            let mut slices = [IoSlice::new(&[]); IOVECS_PER_WRITE_MAX];
            let mut count = 0;
            for (index, bytes) in outbox.iter().take(IOVECS_PER_WRITE_MAX).enumerate() {
                let start = if index == 0 { *front_written } else { 0 };
                slices[index] = IoSlice::new(&bytes[start..]);
                count += 1;
            }
            match sock::send_vectored(fd, &slices[..count]) {
                Ok(sent) => sent,
                Err(error) if error.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(error) if error.kind() == ErrorKind::Interrupted => continue,
                Err(error) => return Err(error),
            }
        };
        let mut outbox = conn.outbox.borrow_mut();
        conn.outbox_bytes.set(conn.outbox_bytes.get() - sent as u32);
        let mut remaining = sent;
        let mut frames = 0;
        while remaining > 0 {
            let front_left = outbox
                .front()
                .expect("sent bytes came from the outbox")
                .len()
                - *front_written;
            if remaining >= front_left {
                remaining -= front_left;
                outbox.pop_front();
                *front_written = 0;
                frames += 1;
            } else {
                *front_written += remaining;
                remaining = 0;
            }
        }
        bump(&shard.metrics().frames_out, frames);
    }
}

/// Sends what should still go out, then the close frame, then waits (bounded)
/// for the client to close its side, as RFC 6455 §7 asks.
async fn close_gracefully(
    shard: &Shard,
    stream: &TcpStream,
    conn: &Conn,
    code: CloseCode,
    mut front_written: usize,
) {
    let fd = stream.as_raw_fd();
    {
        let mut outbox = conn.outbox.borrow_mut();
        if code == CloseCode::SlowConsumer {
            // The backlog is the problem: keep only a frame already half written.
            outbox.truncate(usize::from(front_written > 0));
        }
        let close = Bytes::from(ws::close_frame(code));
        let queued = outbox.iter().map(Bytes::len).sum::<usize>() - front_written + close.len();
        conn.outbox_bytes.set(queued as u32);
        outbox.push_back(close);
    }
    let deadline = Instant::now() + Duration::from_millis(shard.config.close_grace_ms);
    loop {
        match flush(fd, shard, conn, &mut front_written) {
            Ok(true) => break,
            Ok(false) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero()
                    || monoio::time::timeout(left, stream.writable(false))
                        .await
                        .is_err()
                {
                    return;
                }
            }
            Err(_) => return,
        }
    }
    sock::shutdown_write(fd);
    // Read and discard until the client closes (EOF) or the grace period ends.
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        match monoio::time::timeout(left, stream.readable(false)).await {
            Ok(Ok(())) => {}
            _ => return,
        }
        let mut scratch = shard.scratch.take();
        let result = sock::recv(fd, &mut scratch);
        *shard.scratch.borrow_mut() = scratch;
        match result {
            Ok(0) => return,
            Ok(_) => {}
            Err(error)
                if error.kind() == ErrorKind::WouldBlock
                    || error.kind() == ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}
