//! The peer we compare against: nats-server's WebSocket listener, driven with
//! the NATS text protocol (one subject per user: `SUB`, `PUB`, `MSG`).
//!
//! Owns starting nats-server on loopback with its own config, the client's
//! connect-and-subscribe, `PUB` encoding and a streaming parser for what the
//! server sends. NATS core has no acknowledgement, so only delivery latency is
//! comparable. Every wait is bounded.

use std::io::Read;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::child::free_port;
use crate::wsclient::{self, ServerFrame};

/// Longest NATS control line accepted (INFO is the longest, about 1 KiB).
const CONTROL_LINE_BYTES_MAX: usize = 8 * 1024;

pub struct NatsServer {
    child: Child,
    pub websocket: SocketAddr,
    /// The NATS protocol listener (for gateways' backplanes).
    pub client: SocketAddr,
    directory: std::path::PathBuf,
}

impl NatsServer {
    /// Starts `binary` with a WebSocket listener on a free loopback port.
    pub fn start(binary: &str) -> anyhow::Result<Self> {
        let client_port = free_port()?;
        let websocket: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let directory = std::env::temp_dir().join(format!(
            "bench-nats-{}-{}",
            std::process::id(),
            websocket.port()
        ));
        std::fs::create_dir_all(&directory)?;
        let config = directory.join("nats.conf");
        std::fs::write(
            &config,
            format!(
                "listen: \"127.0.0.1:{client_port}\"\njetstream {{\n  store_dir: \"{}\"\n}}\nwebsocket {{\n  host: \"127.0.0.1\"\n  port: {}\n  no_tls: true\n}}\n",
                directory.join("jetstream").display(),
                websocket.port()
            ),
        )?;
        let mut command = Command::new(binary);
        crate::child::die_with_this_thread(&mut command);
        let child = command
            .args(["-c", config.to_str().context("config path")?])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {binary} (apt-get install nats-server)"))?;
        let mut server = NatsServer {
            child,
            websocket,
            client: format!("127.0.0.1:{client_port}").parse()?,
            directory,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect_timeout(&websocket, Duration::from_millis(200)).is_err() {
            if let Some(status) = server.child.try_wait()? {
                anyhow::bail!("nats-server exited during start-up: {status}");
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "nats-server not listening within 15 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.directory);
    }
}

/// An unmasked binary WebSocket frame (as a server sends) holding `payload`;
/// empty for an empty payload.
fn server_binary_frame(payload: &[u8]) -> Vec<u8> {
    if payload.is_empty() {
        return Vec::new();
    }
    let mut frame = vec![0x82];
    match payload.len() {
        len @ 0..=125 => frame.push(len as u8),
        len @ 126..=0xffff => {
            frame.push(126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            frame.push(127);
            frame.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(payload);
    frame
}

/// Connects, subscribes to `subject`, and waits for the server's PONG (so the
/// subscription is in place before any message is sent).
pub fn open(
    target: SocketAddr,
    source: IpAddr,
    subject: &str,
) -> anyhow::Result<(TcpStream, Vec<u8>)> {
    let (mut stream, mut frames) = wsclient::upgrade(target, source, "/", None)?;
    let mut hello = Vec::new();
    wsclient::encode_binary(
        format!("CONNECT {{\"verbose\":false,\"pedantic\":false,\"protocol\":1}}\r\nSUB {subject} 1\r\nPING\r\n").as_bytes(),
        &mut hello,
    );
    std::io::Write::write_all(&mut stream, &hello)?;
    let mut protocol = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let mut used = 0;
        while let Some((frame, length)) = wsclient::decode(&frames[used..]) {
            if let ServerFrame::Binary(payload) | ServerFrame::Text(payload) = frame {
                protocol.extend_from_slice(payload);
            }
            used += length;
        }
        frames.drain(..used);
        if let Some(end) = protocol.windows(6).position(|w| w == b"PONG\r\n") {
            protocol.drain(..end + 6);
            // Newer servers may follow with an async INFO or a PING: hand
            // those on as a server frame, before any frames still undecoded,
            // for the scenario's parser (which answers PING and skips INFO).
            let mut rest = server_binary_frame(&protocol);
            rest.extend_from_slice(&frames);
            return Ok((stream, rest));
        }
        anyhow::ensure!(
            !protocol.windows(4).any(|w| w == b"-ERR"),
            "nats refused: {}",
            String::from_utf8_lossy(&protocol)
        );
        let read = stream.read(&mut chunk)?;
        anyhow::ensure!(read > 0, "nats closed during connect");
        frames.extend_from_slice(&chunk[..read]);
        anyhow::ensure!(
            frames.len() + protocol.len() < 64 * 1024,
            "no PONG in the first 64 KiB"
        );
    }
}

/// Appends a `PUB` of `payload` to `subject` as one WebSocket frame.
pub fn encode_publish(subject: &str, payload: &[u8], out: &mut Vec<u8>) {
    let mut message = format!("PUB {subject} {}\r\n", payload.len()).into_bytes();
    message.extend_from_slice(payload);
    message.extend_from_slice(b"\r\n");
    wsclient::encode_binary(&message, out);
}

/// Something the server said.
#[derive(Debug, PartialEq, Eq)]
pub enum NatsEvent<'a> {
    Message(&'a [u8]),
    Ping,
    Error(&'a [u8]),
}

/// Parses complete protocol items at the start of `stream` and removes them.
/// An incomplete item stays for the next call; a control line longer than
/// `CONTROL_LINE_BYTES_MAX` is an error.
pub fn parse(stream: &mut Vec<u8>, mut on_event: impl FnMut(NatsEvent<'_>)) -> anyhow::Result<()> {
    let mut used = 0;
    loop {
        let rest = &stream[used..];
        let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") else {
            anyhow::ensure!(
                rest.len() <= CONTROL_LINE_BYTES_MAX,
                "nats control line too long"
            );
            break;
        };
        let line = &rest[..line_end];
        if let Some(arguments) = line.strip_prefix(b"MSG ") {
            let length: usize = std::str::from_utf8(arguments)?
                .split(' ')
                .next_back()
                .context("MSG without length")?
                .parse()?;
            let payload_start = line_end + 2;
            if rest.len() < payload_start + length + 2 {
                break;
            }
            on_event(NatsEvent::Message(
                &rest[payload_start..payload_start + length],
            ));
            used += payload_start + length + 2;
            continue;
        }
        if line == b"PING" {
            on_event(NatsEvent::Ping);
        } else if line.starts_with(b"-ERR") {
            on_event(NatsEvent::Error(line));
        }
        used += line_end + 2;
    }
    stream.drain(..used);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_split_anywhere_are_parsed_once_complete() {
        let wire = b"INFO {}\r\nMSG user.7 1 5\r\nhello\r\nPING\r\nMSG user.7 1 0\r\n\r\n".to_vec();
        for split in 0..wire.len() {
            let mut stream = wire[..split].to_vec();
            let mut events = Vec::new();
            parse(&mut stream, |event| events.push(format!("{event:?}"))).unwrap();
            stream.extend_from_slice(&wire[split..]);
            parse(&mut stream, |event| events.push(format!("{event:?}"))).unwrap();
            assert_eq!(
                events,
                ["Message([104, 101, 108, 108, 111])", "Ping", "Message([])"],
                "split at {split}"
            );
            assert!(stream.is_empty());
        }
    }

    #[test]
    fn a_publish_is_one_binary_frame() {
        let mut out = Vec::new();
        encode_publish("user.1", b"abc", &mut out);
        assert_eq!(out[0], 0x82);
        let mask = &out[2..6];
        let text: Vec<u8> = out[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i & 3])
            .collect();
        assert_eq!(text, b"PUB user.1 3\r\nabc\r\n");
    }
}
