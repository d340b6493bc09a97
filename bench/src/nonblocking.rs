//! Writing to load-generator connections driven by one mio poll.
//!
//! Owns one rule, shared by every scenario with many connections per thread:
//! write at once when nothing is queued; queue what the socket did not take
//! and ask for writability; on writability flush, then go back to
//! readable-only. Never blocks, and never reorders bytes of one connection.

use std::io::{ErrorKind, Write};

use mio::net::TcpStream;
use mio::{Interest, Poll, Token};

/// Writes `bytes` to `stream`, or queues them in `output` behind what waits.
pub fn queue_write(
    stream: &mut TcpStream,
    output: &mut Vec<u8>,
    bytes: &[u8],
    poll: &Poll,
    token: Token,
) -> anyhow::Result<()> {
    if !output.is_empty() {
        output.extend_from_slice(bytes);
        return Ok(());
    }
    match stream.write(bytes) {
        Ok(written) if written == bytes.len() => return Ok(()),
        Ok(written) => output.extend_from_slice(&bytes[written..]),
        Err(error) if error.kind() == ErrorKind::WouldBlock => output.extend_from_slice(bytes),
        Err(error) => return Err(error.into()),
    }
    poll.registry()
        .reregister(stream, token, Interest::READABLE | Interest::WRITABLE)?;
    Ok(())
}

/// Writes what `output` holds; once empty, stops asking for writability.
pub fn flush(
    stream: &mut TcpStream,
    output: &mut Vec<u8>,
    poll: &Poll,
    token: Token,
) -> anyhow::Result<()> {
    while !output.is_empty() {
        match stream.write(output) {
            Ok(written) => {
                output.drain(..written);
            }
            Err(error) if error.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(error) => return Err(error.into()),
        }
    }
    poll.registry()
        .reregister(stream, token, Interest::READABLE)?;
    Ok(())
}
