//! The task that serves one connection's socket: reads frames, writes the
//! outbox, closes as RFC 6455 §7 asks.
//!
//! Owns the read path (wait for readiness, read into the shard's shared
//! buffer, decode WebSocket frames, hand each text to the dispatcher), the
//! vectored writes of the outbox, the connect-time start (idempotency warm-up,
//! backplane interest, the first sync) and the graceful close. An idle
//! connection parks one readiness wait and no buffer (the memory budget in
//! `docs/design/memory-budget.md`). Runs only on its shard's thread; never
//! blocks (every read and write is non-blocking) and never routes a message.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io::{self, ErrorKind, IoSlice};
use std::os::fd::AsRawFd;
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chat_protocol::codes::CloseCode;
use chat_protocol::ws::{self, Flow, WsDecoder, WsEvent};
use monoio::net::TcpStream;

use super::dispatch;
use super::features::sync;
use super::send::reply;
use super::state::conn::Conn;
use super::state::Shard;
use crate::limits::{IOVECS_PER_WRITE_MAX, PARTIAL_READ_BYTES, READS_PER_WAKE_MAX};
use crate::link::Link;
use crate::metrics::bump;
use crate::sock;

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

/// A connection's byte stream and framing state, owned by its task and
/// lent whole to the steady-state loop (one reference, not four: the loop's
/// future lives as long as the connection).
struct Session {
    stream: TcpStream,
    link: Link,
    reader: Reader,
    /// Bytes of the outbox's front entry already written.
    front_written: usize,
}

/// Serves one registered connection until it closes, then unregisters it.
/// `tls` is the connection's TLS session (handshake done) on a `wss://` listener.
///
/// Not an `async fn`: one keeps each argument twice in the connection's
/// task, once as the argument and once as the local it is moved into
/// (rust-lang/rust#62958). The session is built here, outside the `async
/// move` block, which then holds each value once: the task is 248 bytes
/// instead of 400 (`docs/design/memory-budget.md`).
pub fn serve(
    shard: Rc<Shard>,
    stream: TcpStream,
    tls: Option<Box<rustls::ServerConnection>>,
    conn: Rc<Conn>,
    early_bytes: Vec<u8>,
) -> impl Future<Output = ()> {
    let link = Link::new(stream.as_raw_fd(), tls);
    let mut session = Session {
        stream,
        link,
        // Bytes that came with the upgrade request wait here for the start.
        reader: Reader {
            decoder: WsDecoder::default(),
            partial: early_bytes,
            stalled: false,
        },
        front_written: 0,
    };
    async move {
        // `hello` goes out now; the device's frames are read only once its recent
        // sends are loaded, so a retry after a gateway restart is recognised.
        let _ = flush(&mut session.link, &shard, &conn, &mut session.front_written);
        // One boxed future for the whole start: the storage request's future is
        // large and short-lived; inline, it would size the connection's task for
        // as long as the connection lives.
        Box::pin(start(&shard, &conn)).await;
        let reader = &mut session.reader;
        if !reader.partial.is_empty() && !conn.is_closing() {
            let consumed = process(&shard, &conn, &mut reader.decoder, &mut reader.partial);
            reader.partial.drain(..consumed);
            reader.stalled = conn.is_paused();
        }

        // Boxed so the long-lived task holds only the small steady-state future;
        // the close path (timers, two readiness waits) is allocated when needed.
        let ending = Box::pin(serve_until_closing(&shard, &conn, &mut session)).await;

        shard.unregister(&conn);
        // No sighting of a revoked device (it would leave a row of a deleted
        // account behind).
        if !conn.was_revoked() {
            shard.note_device_seen(&conn);
        }
        if let Ending::Close(code) = ending {
            shard.metrics().closed(code);
            Box::pin(close_gracefully(&shard, &conn, &mut session, code)).await;
        }
        drop(session);
        shard.node.release_connection();
    }
}

/// Before the device's frames are read: load its recent sends (idempotency
/// after a restart), wait until the backplane routes its user's messages to
/// this node (so the sync cannot miss a message published just before it), then start
/// its sync. Storage not answering closes with 1013.
async fn start(shard: &Rc<Shard>, conn: &Rc<Conn>) {
    if let Err(error) = sync::warm_idempotency(shard, conn).await {
        tracing::debug!(shard = shard.id, %error, "could not load recent sends");
        conn.request_close(CloseCode::TryAgainLater);
        return;
    }
    shard.interest_ready(&conn.user_id).await;
    sync::start(shard, conn, chat_protocol::store_wire::SyncFrom::Cursor);
}

/// The connection's life: write what is queued, read what arrives, until a
/// close is requested or the peer is gone. An `async move` block for the
/// reason `serve` gives; its poll closure copies what it only reads, so it
/// holds three references, not five.
// Clippy's `async fn` form is the one that stores each argument twice.
#[allow(clippy::manual_async_fn)]
fn serve_until_closing<'a>(
    shard: &'a Rc<Shard>,
    conn: &'a Rc<Conn>,
    session: &'a mut Session,
) -> impl Future<Output = Ending> + 'a {
    async move {
        let mut read_ready = pin!(session.stream.readable(false));
        let mut write_ready: Option<Pin<Box<dyn Future<Output = io::Result<()>> + '_>>> = None;

        loop {
            if session.reader.stalled && !conn.is_paused() {
                process_stalled(shard, conn, &mut session.reader);
            }
            if write_ready.is_none() && (conn.has_outbound() || session.link.wants_write()) {
                match flush(&mut session.link, shard, conn, &mut session.front_written) {
                    Ok(true) => {}
                    Ok(false) => write_ready = Some(Box::pin(session.stream.writable(false))),
                    Err(_) => break Ending::Lost,
                }
            }
            if let Some(code) = conn.close_code() {
                break Ending::Close(code);
            }
            // TLS may hold decrypted bytes the socket will not signal again.
            let input_buffered = session.link.has_buffered_input();
            let stalled = session.reader.stalled;
            let writing = &mut write_ready;
            let reading = &mut read_ready;
            let event = poll_fn(move |cx| {
                conn.register(cx.waker());
                if conn.is_closing() || (writing.is_none() && conn.has_outbound()) {
                    return Poll::Ready(Event::Woken);
                }
                if let Some(writable) = writing.as_mut() {
                    if let Poll::Ready(result) = writable.as_mut().poll(cx) {
                        return Poll::Ready(Event::Writable(result));
                    }
                }
                // Paused: the socket's later frames wait (back-pressure on the client).
                if conn.is_paused() || stalled {
                    return Poll::Pending;
                }
                if input_buffered {
                    return Poll::Ready(Event::Readable(Ok(())));
                }
                reading.as_mut().poll(cx).map(Event::Readable)
            })
            .await;
            match event {
                Event::Woken => {}
                Event::Writable(Ok(())) => write_ready = None,
                Event::Readable(Ok(())) => {
                    read_ready.set(session.stream.readable(false));
                    let reader = &mut session.reader;
                    if !read_available(shard, conn, &mut session.link, reader) {
                        break Ending::Lost;
                    }
                    // Frames after a pausing one wait in `partial` for the resume.
                    reader.stalled = conn.is_paused() && !reader.partial.is_empty();
                }
                Event::Readable(Err(_)) | Event::Writable(Err(_)) => break Ending::Lost,
            }
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
fn read_available(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    link: &mut Link,
    reader: &mut Reader,
) -> bool {
    for _ in 0..READS_PER_WAKE_MAX {
        if conn.is_closing() || conn.is_paused() {
            return true;
        }
        let result = if reader.partial.is_empty() {
            read_into_scratch(shard, conn, link, reader)
        } else {
            read_into_partial(shard, conn, link, reader)
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
    link: &mut Link,
    reader: &mut Reader,
) -> io::Result<ReadResult> {
    let mut scratch = shard.scratch.take();
    let result = link.recv(&mut scratch);
    let outcome = match result {
        Ok(0) => Ok(ReadResult::Eof),
        Ok(read) => {
            conn.seen_at(shard.monotonic_ms());
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
    link: &mut Link,
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
    let result = link.recv(&mut reader.partial[have..]);
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
    conn.seen_at(shard.monotonic_ms());
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
            WsEvent::Text(text) => dispatch::on_text(shard, conn, text),
            // Frames that are not messages take from the same allowance as
            // text frames: a flood of pings, pongs or empty fragments is
            // answered `rate_limited` and, past the abuse limit, 1008.
            WsEvent::Ping(payload) => {
                if reply::take_frame(shard, conn) {
                    conn.enqueue(Bytes::from(ws::pong_frame(payload)));
                }
            }
            WsEvent::Pong | WsEvent::Fragment => {
                reply::take_frame(shard, conn);
            }
            WsEvent::Close(_) => conn.request_close(CloseCode::Normal),
            // The chat decoder refuses binary frames itself (1003).
            WsEvent::Binary(_) => conn.request_close(CloseCode::UnsupportedData),
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

/// Writes queued bytes until the queue is empty (true) or the socket is full
/// (false). On TLS, empty also means every encrypted byte left.
fn flush(
    link: &mut Link,
    shard: &Shard,
    conn: &Conn,
    front_written: &mut usize,
) -> io::Result<bool> {
    loop {
        let sent = {
            let outbox = conn.outbox.borrow();
            if outbox.is_empty() {
                drop(outbox);
                // An idle connection keeps no queue capacity (memory budget).
                *conn.outbox.borrow_mut() = VecDeque::new();
                return link.write_pending();
            }
            let mut slices = [IoSlice::new(&[]); IOVECS_PER_WRITE_MAX];
            let mut count = 0;
            for (index, bytes) in outbox.iter().take(IOVECS_PER_WRITE_MAX).enumerate() {
                let start = if index == 0 { *front_written } else { 0 };
                slices[index] = IoSlice::new(&bytes[start..]);
                count += 1;
            }
            match link.send_vectored(&slices[..count]) {
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
async fn close_gracefully(shard: &Shard, conn: &Conn, session: &mut Session, code: CloseCode) {
    let Session {
        stream,
        link,
        front_written,
        ..
    } = session;
    let fd = stream.as_raw_fd();
    {
        let mut outbox = conn.outbox.borrow_mut();
        if code == CloseCode::SlowConsumer {
            // The backlog is the problem: keep only a frame already half written.
            outbox.truncate(usize::from(*front_written > 0));
        }
        let close = Bytes::from(ws::close_frame(code));
        let queued = outbox.iter().map(Bytes::len).sum::<usize>() - *front_written + close.len();
        conn.outbox_bytes.set(queued as u32);
        outbox.push_back(close);
    }
    let deadline = Instant::now() + Duration::from_millis(shard.config.close_grace_ms);
    let mut close_notify_queued = !link.is_tls();
    loop {
        match flush(link, shard, conn, front_written) {
            // TLS ends with close_notify after the close frame.
            Ok(true) if !close_notify_queued => {
                link.close_notify();
                close_notify_queued = true;
            }
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
    // Read and discard until the client closes (EOF) or the grace period
    // ends (TLS records too: nothing more is decrypted).
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
