//! The load generator's WebSocket client: a blocking upgrade, then masked text
//! frames out and server frames in over caller-owned buffers.
//!
//! Owns only what a load client needs (no fragmentation, text and close
//! frames); header parsing and formatting come from tungstenite. Never
//! allocates per frame on the receive path.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// A TCP connection from `source` to `target`, Nagle off, reads bounded.
fn connect_socket(target: SocketAddr, source: IpAddr) -> anyhow::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::new(source, 0).into())?;
    socket.connect_timeout(&target.into(), Duration::from_secs(5))?;
    let stream: TcpStream = socket.into();
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(stream)
}

/// Sends the upgrade request over `stream` and reads the 101. Returns any
/// bytes after the response.
fn request_upgrade(
    stream: &mut impl ReadWrite,
    host: &str,
    path: &str,
    bearer: Option<&str>,
) -> anyhow::Result<Vec<u8>> {
    let authorization = bearer
        .map(|token| format!("Authorization: Bearer {token}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{authorization}\r\n"
    )?;
    stream.flush()?;
    let mut buffer = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let read = stream.read(&mut chunk)?;
        anyhow::ensure!(read > 0, "closed during handshake");
        buffer.extend_from_slice(&chunk[..read]);
        anyhow::ensure!(buffer.len() < 64 * 1024, "handshake response too large");
        let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buffer[..end]);
        anyhow::ensure!(
            head.starts_with("HTTP/1.1 101"),
            "refused: {}",
            head.lines().next().unwrap_or("")
        );
        return Ok(buffer[end + 4..].to_vec());
    }
}

/// A blocking byte stream: a socket or a TLS session over one.
pub trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// Upgrades a connection from `source` to `target` at `path` (with a bearer
/// token if given). Returns the socket and any bytes after the 101 response.
pub fn upgrade(
    target: SocketAddr,
    source: IpAddr,
    path: &str,
    bearer: Option<&str>,
) -> anyhow::Result<(TcpStream, Vec<u8>)> {
    let mut stream = connect_socket(target, source)?;
    let rest = request_upgrade(&mut stream, &target.to_string(), path, bearer)?;
    Ok((stream, rest))
}

/// Reads from `stream` (after `buffer`) through the server's `hello`;
/// returns the bytes that followed it.
fn read_hello(stream: &mut impl Read, mut buffer: Vec<u8>) -> anyhow::Result<Vec<u8>> {
    let mut chunk = [0u8; 1024];
    loop {
        if let Some((ServerFrame::Text(text), used)) = decode(&buffer) {
            anyhow::ensure!(
                text.starts_with(br#"{"type":"hello""#),
                "first frame is not hello"
            );
            return Ok(buffer[used..].to_vec());
        }
        let read = stream.read(&mut chunk)?;
        anyhow::ensure!(read > 0, "closed before hello");
        buffer.extend_from_slice(&chunk[..read]);
        anyhow::ensure!(buffer.len() < 64 * 1024, "no hello in the first 64 KiB");
    }
}

/// Opens a WebSocket to the gateway and reads through its `hello`.
/// Returns the socket and any bytes that followed `hello`.
pub fn open(
    target: SocketAddr,
    source: IpAddr,
    token: &str,
) -> anyhow::Result<(TcpStream, Vec<u8>)> {
    let (mut stream, buffer) = upgrade(target, source, "/ws", Some(token))?;
    let rest = read_hello(&mut stream, buffer)?;
    Ok((stream, rest))
}

/// A `wss://` connection: the TLS session over its socket.
pub type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// `open` over TLS: the handshake with `config` for `server_name`, then the
/// upgrade and `hello` inside it.
pub fn open_tls(
    target: SocketAddr,
    source: IpAddr,
    token: &str,
    config: std::sync::Arc<rustls::ClientConfig>,
    server_name: &str,
) -> anyhow::Result<TlsStream> {
    let name = rustls::pki_types::ServerName::try_from(server_name.to_owned())?;
    let session = rustls::ClientConnection::new(config, name)?;
    let mut stream = rustls::StreamOwned::new(session, connect_socket(target, source)?);
    let buffer = request_upgrade(&mut stream, server_name, "/ws", Some(token))?;
    read_hello(&mut stream, buffer)?;
    Ok(stream)
}

/// A client configuration trusting the CA certificates in `ca_pem`.
pub fn tls_client_config(
    ca_pem: &std::path::Path,
) -> anyhow::Result<std::sync::Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca_pem)? {
        roots.add(cert?)?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// Appends a masked text frame (clients must mask, RFC 6455 §5.3).
pub fn encode_text(payload: &[u8], out: &mut Vec<u8>) {
    encode(OpCode::Data(Data::Text), payload, out);
}

/// Appends a masked binary frame (the NATS WebSocket protocol uses these).
pub fn encode_binary(payload: &[u8], out: &mut Vec<u8>) {
    encode(OpCode::Data(Data::Binary), payload, out);
}

fn encode(opcode: OpCode, payload: &[u8], out: &mut Vec<u8>) {
    let mask = fastrand::u32(..).to_ne_bytes();
    chat_protocol::ws::encode_masked_frame(opcode, payload, mask, out);
}

#[derive(Debug, PartialEq, Eq)]
pub enum ServerFrame<'a> {
    Text(&'a [u8]),
    Binary(&'a [u8]),
    Close(Option<u16>),
    Other,
}

/// The first complete server frame in `input` and the bytes it used.
pub fn decode(input: &[u8]) -> Option<(ServerFrame<'_>, usize)> {
    let mut cursor = std::io::Cursor::new(input);
    let (header, length) = FrameHeader::parse(&mut cursor).ok()??;
    let start = cursor.position() as usize;
    let end = start + length as usize;
    if input.len() < end {
        return None;
    }
    let payload = &input[start..end];
    let frame = match header.opcode {
        OpCode::Data(Data::Text) => ServerFrame::Text(payload),
        OpCode::Data(Data::Binary) => ServerFrame::Binary(payload),
        OpCode::Control(Control::Close) => ServerFrame::Close(
            (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]])),
        ),
        _ => ServerFrame::Other,
    };
    Some((frame, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_frames_decode_only_when_complete() {
        let mut frame = vec![0x81, 5];
        frame.extend_from_slice(b"hello");
        assert_eq!(decode(&frame[..4]), None);
        assert_eq!(decode(&frame), Some((ServerFrame::Text(b"hello"), 7)));
        assert_eq!(
            decode(&[0x88, 2, 0x03, 0xf4]),
            Some((ServerFrame::Close(Some(1012)), 4))
        );
    }

    #[test]
    fn client_frames_are_masked_and_round_trip() {
        let mut out = Vec::new();
        encode_text(b"abc", &mut out);
        assert_eq!(out[0], 0x81);
        assert_eq!(out[1], 0x80 | 3);
        let mask = &out[2..6];
        let unmasked: Vec<u8> = out[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i & 3])
            .collect();
        assert_eq!(unmasked, b"abc");
    }
}
