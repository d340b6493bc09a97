//! Accepting sockets and the WebSocket handshake, on whichever shard the
//! kernel picked, and adopting the socket on its user's home shard.
//!
//! Owns the accept loop (capacity check, back-off on fd exhaustion), the
//! TLS handshake on a `wss://` listener (through `link`, whose session then
//! travels with the socket), the bounded, timed handshake read, token
//! verification, the hand-off of an
//! authenticated socket to its user's home shard, and adoption there
//! (register the connection, answer 101, say `hello`, start its socket
//! task). A plain `GET` of another path is answered with what `web` says
//! (the browser client), within the same time bound. Refusals are HTTP
//! answers (401, 4xx, 503; plain bytes on the TLS port get a plain 400),
//! never a dropped socket, except a failed TLS handshake (rustls's alert
//! is the answer). Never serves WebSocket
//! frames itself (`socket.rs` does).

use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use chat_protocol::frames::{self, HelloFrame};
use chat_protocol::handshake::{self, HandshakeError, UpgradeRequest};
use chat_protocol::store_wire::{Request, Response};
use chat_protocol::{ids, ws, PROTOCOL_VERSION};
use monoio::net::{TcpListener, TcpStream};

use super::state::conn::Conn;
use super::state::token_bucket::TokenBucket;
use super::state::Shard;
use super::{echo, socket};
use crate::limits::FD_EXHAUSTED_PAUSE_MS;
use crate::link::{Handshake, Link};
use crate::mesh::{Handoff, Sender, ShardMessage};
use crate::metrics::{bump, Refusal};
use crate::sock;

/// The WebSocket endpoint's path.
pub const WS_PATH: &str = "/ws";
/// The test-only echo endpoint's path (`echo_endpoint`, off by default).
pub const ECHO_PATH: &str = "/echo";

/// Which endpoint an upgrade is for.
enum Endpoint {
    Chat,
    Echo,
}

/// A 503 refusal, sent when the node is full or draining.
fn refusal_503(body: &str) -> Vec<u8> {
    handshake::refusal(503, "Service Unavailable", body)
}

enum Accepted {
    Socket(std::io::Result<(TcpStream, std::net::SocketAddr)>),
    Draining,
}

pub async fn accept_loop(shard: Rc<Shard>, listener: TcpListener) {
    let mut exhausted_logged = false;
    loop {
        let accepted = monoio::select! {
            result = listener.accept() => Accepted::Socket(result),
            _ = shard.drain_started.wait() => Accepted::Draining,
        };
        match accepted {
            Accepted::Draining => break,
            Accepted::Socket(Ok((stream, _peer))) => {
                exhausted_logged = false;
                if !shard.node.try_claim_connection() {
                    shard.metrics().refused(Refusal::AtCapacity);
                    // On TLS a plain answer would be noise: the socket just closes.
                    if shard.tls.is_none() {
                        sock::send_best_effort(
                            stream.as_raw_fd(),
                            &refusal_503("node at connection capacity"),
                        );
                    }
                    continue;
                }
                monoio::spawn(handshake(shard.clone(), stream));
            }
            Accepted::Socket(Err(error)) => {
                let exhausted = matches!(
                    error.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                );
                if exhausted {
                    if !exhausted_logged {
                        tracing::warn!(shard = shard.id, %error, "accept: out of file descriptors or memory; pausing accepts");
                        exhausted_logged = true;
                    }
                    monoio::time::sleep(Duration::from_millis(FD_EXHAUSTED_PAUSE_MS)).await;
                } else {
                    tracing::debug!(shard = shard.id, %error, "accept failed");
                }
            }
        }
    }
    drop(listener);
    tracing::info!(shard = shard.id, "stopped accepting");
}

enum ReadError {
    /// The client went away before finishing its request.
    Closed,
    Refused(HandshakeError),
    /// A page request, answered (or the client left) within the handshake time.
    Page,
    /// Plain bytes on the TLS listener.
    NotTls,
    /// The TLS handshake failed (rustls sent the alert).
    Tls,
}

/// The first byte of a TLS record carrying a handshake (RFC 8446 §5.1).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Reads and answers one upgrade request; the connection slot is already claimed.
async fn handshake(shard: Rc<Shard>, stream: TcpStream) {
    let fd = stream.as_raw_fd();
    let mut link = match shard.tls.as_ref() {
        None => Link::plain(fd),
        Some(config) => match rustls::ServerConnection::new(config.clone()) {
            Ok(session) => Link::new(fd, Some(Box::new(session))),
            Err(error) => {
                tracing::warn!(%error, "could not start a TLS session");
                drop(stream);
                shard.node.release_connection();
                return;
            }
        },
    };
    let timeout = Duration::from_millis(shard.config.handshake_timeout_ms);
    let outcome = monoio::time::timeout(timeout, async {
        if link.is_tls() {
            tls_handshake(&stream, &mut link).await?;
        }
        read_upgrade(&shard, &stream, &mut link).await
    })
    .await;
    let refuse = |link: &mut Link, refusal: Refusal, status: u16, reason: &str, body: &str| {
        shard.metrics().refused(refusal);
        link.send_best_effort(&handshake::refusal(status, reason, body));
    };
    match outcome {
        Err(_elapsed) => refuse(
            &mut link,
            Refusal::Timeout,
            408,
            "Request Timeout",
            "handshake timed out",
        ),
        Ok(Err(ReadError::Closed | ReadError::Page)) => {}
        Ok(Err(ReadError::NotTls)) => {
            shard.metrics().refused(Refusal::NotTls);
            // Answered in plain HTTP, which is what the client speaks.
            sock::send_best_effort(
                fd,
                &handshake::refusal(
                    400,
                    "Bad Request",
                    "this listener speaks TLS: use wss:// (or https:// for the web client)",
                ),
            );
        }
        Ok(Err(ReadError::Tls)) => shard.metrics().refused(Refusal::TlsHandshake),
        Ok(Err(ReadError::Refused(error))) => {
            let (status, reason) = error.status();
            let refusal = match error {
                HandshakeError::TooLarge => Refusal::TooLarge,
                HandshakeError::BadRequest(_) => Refusal::BadRequest,
                HandshakeError::MethodNotAllowed => Refusal::MethodNotAllowed,
                HandshakeError::NotFound => Refusal::NotFound,
                HandshakeError::UpgradeRequired => Refusal::UpgradeRequired,
            };
            refuse(&mut link, refusal, status, reason, &error.to_string());
        }
        Ok(Ok((Endpoint::Echo, upgrade, early_bytes))) => {
            bump(&shard.metrics().handshakes_accepted, 1);
            let serve = echo::serve(shard.clone(), stream, link, upgrade.accept_key, early_bytes);
            monoio::spawn(serve);
            return;
        }
        Ok(Ok((Endpoint::Chat, upgrade, early_bytes))) => {
            match shard
                .verifier
                .verify(&upgrade.token, crate::clock::unix_s())
            {
                Ok(claims) => match revocation(&shard, &claims).await {
                    Ok(()) => {
                        route_to_home(
                            &shard,
                            stream,
                            link.into_session(),
                            &claims.sub,
                            &claims.dev,
                            upgrade.accept_key,
                            early_bytes,
                        );
                        return;
                    }
                    Err(Refusal::Revoked) => refuse(
                        &mut link,
                        Refusal::Revoked,
                        401,
                        "Unauthorized",
                        "this device was revoked: sign in again for a new token",
                    ),
                    Err(refusal) => {
                        shard.metrics().refused(refusal);
                        link.send_best_effort(&refusal_503(
                            "storage cannot confirm this device is not revoked",
                        ));
                    }
                },
                Err(error) => refuse(
                    &mut link,
                    Refusal::Unauthorized,
                    401,
                    "Unauthorized",
                    &error.to_string(),
                ),
            }
        }
    }
    drop(stream);
    shard.node.release_connection();
}

/// Runs the TLS handshake to its end. Plain bytes (an `http://` or `ws://`
/// client on this port) are told apart by their first byte before rustls
/// sees them, so they get an answer they can read.
async fn tls_handshake(stream: &TcpStream, link: &mut Link) -> Result<(), ReadError> {
    loop {
        match sock::peek_byte(stream.as_raw_fd()) {
            Ok(None) => return Err(ReadError::Closed),
            Ok(Some(TLS_HANDSHAKE_RECORD)) => break,
            Ok(Some(_)) => return Err(ReadError::NotTls),
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                stream
                    .readable(false)
                    .await
                    .map_err(|_| ReadError::Closed)?;
            }
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return Err(ReadError::Closed),
        }
    }
    loop {
        let ready = match link.handshake_step() {
            Ok(Handshake::Done) => return Ok(()),
            Ok(Handshake::WantsRead) => stream.readable(false).await,
            Ok(Handshake::WantsWrite) => stream.writable(false).await,
            Err(error) if error.kind() == std::io::ErrorKind::InvalidData => {
                tracing::debug!(%error, "TLS handshake failed");
                return Err(ReadError::Tls);
            }
            Err(_) => return Err(ReadError::Closed),
        };
        ready.map_err(|_| ReadError::Closed)?;
    }
}

/// Reads until a complete upgrade request is buffered (bounded by
/// `handshake_bytes_max`). Returns it with any bytes that followed it.
async fn read_upgrade(
    shard: &Shard,
    stream: &TcpStream,
    link: &mut Link,
) -> Result<(Endpoint, UpgradeRequest, Vec<u8>), ReadError> {
    let limit = shard.config.handshake_bytes_max;
    let mut buffer = vec![0u8; 1024.min(limit)];
    let mut filled = 0;
    loop {
        if filled == buffer.len() {
            buffer.resize((buffer.len() * 2).min(limit), 0);
        }
        // Read before waiting: TLS may already hold the request, decrypted
        // with the handshake's last bytes, and the socket would not signal it.
        match link.recv(&mut buffer[filled..]) {
            Ok(0) => return Err(ReadError::Closed),
            Ok(read) => filled += read,
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                stream
                    .readable(false)
                    .await
                    .map_err(|_| ReadError::Closed)?;
                continue;
            }
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return Err(ReadError::Closed),
        }
        match handshake::parse_request(&buffer[..filled], WS_PATH, limit) {
            Ok(Some((handshake::Request::Page(page), _)))
                if shard.config.echo_endpoint && page.path == ECHO_PATH =>
            {
                match handshake::parse_request(&buffer[..filled], ECHO_PATH, limit) {
                    Ok(Some((handshake::Request::Upgrade(upgrade), length))) => {
                        buffer.truncate(filled);
                        buffer.drain(..length);
                        return Ok((Endpoint::Echo, upgrade, buffer));
                    }
                    Ok(_) => return Err(ReadError::Refused(HandshakeError::UpgradeRequired)),
                    Err(error) => return Err(ReadError::Refused(error)),
                }
            }
            Ok(Some((handshake::Request::Page(page), _))) => {
                bump(&shard.metrics().pages_served, 1);
                let answer = shard.web.respond(&page, crate::clock::unix_s());
                // A page ends the connection (and a TLS one with close_notify).
                if link.write_all(stream, &answer).await {
                    link.close_notify();
                    link.write_all(stream, &[]).await;
                }
                return Err(ReadError::Page);
            }
            Ok(Some((handshake::Request::Upgrade(upgrade), length))) => {
                buffer.truncate(filled);
                buffer.drain(..length);
                buffer.shrink_to_fit();
                return Ok((Endpoint::Chat, upgrade, buffer));
            }
            Ok(None) if filled == limit => {
                return Err(ReadError::Refused(HandshakeError::TooLarge))
            }
            Ok(None) => {}
            Err(error) => return Err(ReadError::Refused(error)),
        }
    }
}

/// Whether `claims`' device may connect: refused when an operator revoked
/// it (or all of its user's devices) after its token was issued. Asked of
/// storage before the upgrade, so a revoked device never sees `hello`.
async fn revocation(shard: &Shard, claims: &chat_protocol::token::Claims) -> Result<(), Refusal> {
    let request = |req| Request::RevokedAt {
        req,
        user: claims.sub.clone(),
        device: claims.dev.clone(),
    };
    match shard.store.request(request, shard.storage_timeout()).await {
        Ok(Response::RevokedAt {
            at_unix_ms: Some(at),
            ..
        }) if claims.iat.saturating_mul(1_000) <= at => Err(Refusal::Revoked),
        Ok(Response::RevokedAt { .. }) => Ok(()),
        _ => Err(Refusal::StorageUnavailable),
    }
}

/// Serves the socket here if its user is homed here, else hands it over.
fn route_to_home(
    shard: &Rc<Shard>,
    stream: TcpStream,
    tls: Option<Box<rustls::ServerConnection>>,
    user_id: &str,
    device_id: &str,
    accept_key: String,
    early_bytes: Vec<u8>,
) {
    let home = ids::home_shard(user_id, shard.mesh.shard_count());
    if home == shard.id {
        adopt(
            shard,
            stream,
            tls,
            user_id,
            device_id,
            &accept_key,
            early_bytes,
        );
        return;
    }
    let socket = match sock::duplicate(stream.as_raw_fd()) {
        Ok(socket) => socket,
        Err(error) => {
            tracing::warn!(%error, "could not duplicate a socket for hand-off");
            Link::new(stream.as_raw_fd(), tls)
                .send_best_effort(&refusal_503("node out of file descriptors"));
            shard.node.release_connection();
            return;
        }
    };
    // This runtime closes its descriptor; the home shard owns the duplicate.
    drop(stream);
    let handoff = Box::new(Handoff {
        socket,
        user_id: user_id.to_owned(),
        device_id: device_id.to_owned(),
        accept_key,
        early_bytes,
        tls,
    });
    match shard
        .mesh
        .send(Sender::Shard(shard.id), home, ShardMessage::Adopt(handoff))
    {
        Ok(()) => bump(&shard.metrics().handoffs_sent, 1),
        Err(refused) => {
            shard.metrics().refused(Refusal::AtCapacity);
            if let ShardMessage::Adopt(handoff) = refused {
                Link::new(handoff.socket.as_raw_fd(), handoff.tls)
                    .send_best_effort(&refusal_503("home shard queue full"));
            }
            shard.node.release_connection();
        }
    }
}

/// Adopts a socket another shard handed over (its user is homed here).
pub fn adopt_handoff(shard: &Rc<Shard>, handoff: Handoff) {
    bump(&shard.metrics().handoffs_received, 1);
    let Handoff {
        socket,
        user_id,
        device_id,
        accept_key,
        early_bytes,
        tls,
    } = handoff;
    match TcpStream::from_std(socket) {
        Ok(socket) => adopt(
            shard,
            socket,
            tls,
            &user_id,
            &device_id,
            &accept_key,
            early_bytes,
        ),
        Err(error) => {
            tracing::warn!(%error, "could not adopt a handed-off socket");
            shard.node.release_connection();
        }
    }
}

/// Registers an authenticated socket whose user is homed here, answers the
/// upgrade, says hello and starts serving it.
pub fn adopt(
    shard: &Rc<Shard>,
    socket: TcpStream,
    tls: Option<Box<rustls::ServerConnection>>,
    user_id: &str,
    device_id: &str,
    accept_key: &str,
    early_bytes: Vec<u8>,
) {
    let fd = socket.as_raw_fd();
    if shard.draining.get() {
        shard.metrics().refused(Refusal::Draining);
        Link::new(fd, tls).send_best_effort(&refusal_503("node is draining"));
        shard.node.release_connection();
        return;
    }
    let devices_max = shard.config.devices_per_user_max;
    if shard.users.borrow().other_devices(user_id, device_id) >= devices_max {
        shard.metrics().refused(Refusal::TooManyDevices);
        let body =
            format!("this user already has {devices_max} devices connected; close one first");
        Link::new(fd, tls).send_best_effort(&handshake::refusal(403, "Forbidden", &body));
        shard.node.release_connection();
        return;
    }
    let _ = socket.set_nodelay(true);
    if shard.config.socket_send_buffer_bytes > 0 {
        if let Err(error) = sock::set_send_buffer(fd, shard.config.socket_send_buffer_bytes) {
            tracing::debug!(%error, "SO_SNDBUF not set");
        }
    }
    let user_id = shard
        .users
        .borrow()
        .interned(user_id)
        .unwrap_or_else(|| Rc::from(user_id));
    let conn = {
        let mut conns = shard.conns.borrow_mut();
        let slot = conns.vacant_key();
        let frames = TokenBucket::full(shard.frames_limit(), shard.monotonic_ms());
        let conn = Rc::new(Conn::new(
            slot,
            user_id,
            device_id,
            shard.config.send_queue_bytes_max,
            frames,
            shard.monotonic_ms(),
        ));
        conns.insert(conn.clone());
        conn
    };
    let home = shard
        .backplane
        .as_ref()
        .and_then(|backplane| backplane.home_url(&conn.user_id));
    let hello = frames::encode_hello(&HelloFrame {
        kind: "hello",
        protocol: PROTOCOL_VERSION,
        user: &conn.user_id,
        device: &conn.device_id,
        heartbeat_interval_ms: shard.config.heartbeat_interval_ms,
        heartbeat_timeout_ms: shard.config.heartbeat_timeout_ms,
        body_bytes_max: shard.config.body_bytes_max,
        message_bytes_max: shard.config.message_bytes_max,
        home: home.as_deref(),
    });
    conn.enqueue(Bytes::from(handshake::switching_protocols(accept_key)));
    conn.enqueue(Bytes::from(ws::text_frame(&hello)));
    // Registered before the client can see `hello`, so anything sent to the
    // user after the client reads `hello` reaches this device: live, or
    // held while the connect-time sync runs (then de-duplicated against it).
    conn.begin_sync();
    shard.register(&conn);
    shard.note_device_seen(&conn);
    bump(&shard.metrics().handshakes_accepted, 1);
    monoio::spawn(socket::serve(shard.clone(), socket, tls, conn, early_bytes));
}
