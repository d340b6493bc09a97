//! The test-only echo endpoint (`/echo`, on only with `echo_endpoint`): a
//! plain RFC 6455 echo server over the gateway's own framing, for the
//! Autobahn|Testsuite conformance run. It sends every text and binary
//! message back, answers pings, and closes as §7 asks.
//!
//! Owns that loop and nothing else: no token, no user, no storage, no
//! routing, no allowances (it is off by default for that reason, and
//! documented as test-only). Shares the chat endpoint's decoder (framing,
//! masking, fragments, control frames, close codes, limits) and its link
//! (plain or TLS), so what it proves holds for the chat endpoint too; the
//! one difference is that the chat endpoint refuses binary messages (1003).

use std::rc::Rc;
use std::time::Duration;

use chat_protocol::codes::CloseCode;
use chat_protocol::handshake;
use chat_protocol::ws::{self, Flow, WsDecoder, WsEvent};
use monoio::net::TcpStream;

use super::state::Shard;
use crate::limits::PARTIAL_READ_BYTES;
use crate::link::Link;
use crate::sock;

/// How the echo loop ends.
enum Ending {
    /// Close with this code (answering the client's close, or failing the connection).
    Close(u16),
    /// The peer is gone.
    Lost,
}

pub async fn serve(
    shard: Rc<Shard>,
    stream: TcpStream,
    mut link: Link,
    accept_key: String,
    early_bytes: Vec<u8>,
) {
    let upgraded = link
        .write_all(&stream, &handshake::switching_protocols(&accept_key))
        .await;
    if upgraded {
        if let Ending::Close(code) = echo(&shard, &stream, &mut link, early_bytes).await {
            close(&shard, &stream, &mut link, code).await;
        }
    }
    drop(stream);
    shard.node.release_connection();
}

async fn echo(shard: &Shard, stream: &TcpStream, link: &mut Link, early: Vec<u8>) -> Ending {
    let limit = shard.config.message_bytes_max;
    let mut decoder = WsDecoder::with_binary();
    let mut input = early;
    let mut out = Vec::new();
    loop {
        let mut ending = None;
        let decoded = decoder.decode(&mut input, limit, |event| {
            match event {
                WsEvent::Text(text) if std::str::from_utf8(text).is_err() => {
                    ending = Some(CloseCode::InvalidPayload.code());
                    return Flow::Stop;
                }
                WsEvent::Text(text) => ws::encode_message(false, text, &mut out),
                WsEvent::Binary(data) => ws::encode_message(true, data, &mut out),
                WsEvent::Ping(payload) => out.extend_from_slice(&ws::pong_frame(payload)),
                WsEvent::Pong | WsEvent::Fragment => {}
                WsEvent::Close(code) => {
                    // Echo the client's code (§5.5.1); none given: 1000.
                    ending = Some(code.unwrap_or(CloseCode::Normal.code()));
                    return Flow::Stop;
                }
            }
            Flow::Continue
        });
        let consumed = match decoded {
            Ok(consumed) => consumed,
            Err(code) => {
                ending = Some(code.code());
                input.len()
            }
        };
        input.drain(..consumed);
        if !out.is_empty() {
            if !link.write_all(stream, &out).await {
                return Ending::Lost;
            }
            out.clear();
        }
        if let Some(code) = ending {
            return Ending::Close(code);
        }
        // Read more: at least what the frame at the front still needs.
        let have = input.len();
        let want = ws::frame_length(&input)
            .filter(|length| *length > have)
            .unwrap_or(have + PARTIAL_READ_BYTES);
        input.resize(want, 0);
        loop {
            match link.recv(&mut input[have..]) {
                Ok(0) => return Ending::Lost,
                Ok(read) => {
                    input.truncate(have + read);
                    break;
                }
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                    if stream.readable(false).await.is_err() {
                        return Ending::Lost;
                    }
                }
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return Ending::Lost,
            }
        }
    }
}

/// Sends the close frame, then waits (bounded) for the client to close.
async fn close(shard: &Shard, stream: &TcpStream, link: &mut Link, code: u16) {
    let frame = ws::close_frame_code(code);
    let grace = Duration::from_millis(shard.config.close_grace_ms);
    let sent = monoio::time::timeout(grace, link.write_all(stream, &frame)).await;
    if !matches!(sent, Ok(true)) {
        return;
    }
    link.close_notify();
    let _ = monoio::time::timeout(grace, link.write_all(stream, &[])).await;
    sock::shutdown_write(std::os::fd::AsRawFd::as_raw_fd(stream));
    let _ = monoio::time::timeout(grace, async {
        let mut sink = [0u8; 512];
        loop {
            match link.recv(&mut sink) {
                Ok(0) => return,
                Ok(_) => {}
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                    if stream.readable(false).await.is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    })
    .await;
}
