//! One client connection's byte stream: the socket itself (`ws://`), or a
//! rustls session over it (`wss://`).
//!
//! Owns non-blocking reads and writes of application bytes, the TLS
//! handshake's steps, and what TLS keeps between them (records read but not
//! yet handed out, records encrypted but not yet written). The socket and
//! accept tasks call it instead of the raw socket calls, so one code path
//! serves both. Never frames WebSocket bytes and never waits: a call that
//! cannot go on returns `WouldBlock`, and the caller waits for readiness.

use std::io::{self, ErrorKind, IoSlice, Read, Write};
use std::os::fd::RawFd;

use rustls::ServerConnection;

use crate::sock;

/// A connection's stream. Holds the descriptor's number only: the task
/// that owns the socket keeps it open for as long as the link is used.
pub struct Link {
    fd: RawFd,
    tls: Option<Box<ServerConnection>>,
}

/// The socket as `Read`/`Write` for rustls, with the gateway's syscalls.
struct Fd(RawFd);

impl Read for Fd {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        sock::recv(self.0, buf)
    }
}

impl Write for Fd {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        sock::send_vectored(self.0, &[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        sock::send_vectored(self.0, bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Where a TLS handshake stands after a step.
pub enum Handshake {
    /// Finished: application bytes may flow.
    Done,
    /// Needs more bytes from the client (wait until readable).
    WantsRead,
    /// Has bytes to write that the socket would not take (wait until writable).
    WantsWrite,
}

impl Link {
    pub fn plain(fd: RawFd) -> Self {
        Self { fd, tls: None }
    }

    pub fn new(fd: RawFd, tls: Option<Box<ServerConnection>>) -> Self {
        Self { fd, tls }
    }

    /// Gives up the TLS session (to move it to another shard with the socket).
    pub fn into_session(self) -> Option<Box<ServerConnection>> {
        self.tls
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// One step of the TLS handshake: writes what is pending, reads what
    /// arrived, processes it. An error is a failed handshake (rustls has
    /// queued the alert; it is written best-effort before returning).
    pub fn handshake_step(&mut self) -> io::Result<Handshake> {
        let Some(tls) = self.tls.as_mut() else {
            return Ok(Handshake::Done);
        };
        loop {
            if !write_pending(self.fd, tls)? {
                return Ok(Handshake::WantsWrite);
            }
            if !tls.is_handshaking() {
                return Ok(Handshake::Done);
            }
            match tls.read_tls(&mut Fd(self.fd)) {
                Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
                Ok(_) => process(self.fd, tls)?,
                Err(error) if error.kind() == ErrorKind::WouldBlock => {
                    return Ok(Handshake::WantsRead)
                }
                Err(error) if error.kind() == ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
    }

    /// Reads application bytes into `buf`. `Ok(0)` is the end of the
    /// stream; `WouldBlock` means wait until readable.
    pub fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = self.tls.as_mut() else {
            return sock::recv(self.fd, buf);
        };
        // Fills `buf` as a plain read would: decrypted bytes first, then
        // records read from the socket, until it is full or the socket empty.
        let mut filled = 0;
        loop {
            match tls.reader().read(&mut buf[filled..]) {
                Ok(0) => return Ok(filled),
                Ok(read) => {
                    filled += read;
                    if filled == buf.len() {
                        return Ok(filled);
                    }
                    continue;
                }
                Err(error) if error.kind() == ErrorKind::WouldBlock => {}
                // The client closed TCP without close_notify: the end all the same.
                Err(error) if error.kind() == ErrorKind::UnexpectedEof => return Ok(filled),
                Err(error) => return Err(error),
            }
            match tls.read_tls(&mut Fd(self.fd)) {
                Ok(0) => return Ok(filled),
                Ok(_) => process(self.fd, tls)?,
                Err(error) if filled > 0 && error.kind() == ErrorKind::WouldBlock => {
                    return Ok(filled)
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Whether decrypted bytes wait in the session: the socket may never
    /// become readable again for them, so the reader must not wait for it.
    pub fn has_buffered_input(&mut self) -> bool {
        self.tls.as_mut().is_some_and(|tls| {
            tls.process_new_packets()
                .is_ok_and(|state| state.plaintext_bytes_to_read() > 0)
        })
    }

    /// Writes application bytes; returns how many were taken. On TLS they
    /// are taken once encrypted, and what the socket would not take is
    /// written first on the next call (`WouldBlock` until it is).
    pub fn send_vectored(&mut self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        let Some(tls) = self.tls.as_mut() else {
            return sock::send_vectored(self.fd, slices);
        };
        if !write_pending(self.fd, tls)? {
            return Err(ErrorKind::WouldBlock.into());
        }
        let taken = tls.writer().write_vectored(slices)?;
        write_pending(self.fd, tls)?;
        Ok(taken)
    }

    /// Whether encrypted bytes wait for the socket (TLS only).
    pub fn wants_write(&self) -> bool {
        self.tls.as_ref().is_some_and(|tls| tls.wants_write())
    }

    /// Writes what waits; true when nothing is left.
    pub fn write_pending(&mut self) -> io::Result<bool> {
        match self.tls.as_mut() {
            Some(tls) => write_pending(self.fd, tls),
            None => Ok(true),
        }
    }

    /// Queues TLS's close_notify after everything already written (no-op on
    /// plain sockets); `write_pending` sends it.
    pub fn close_notify(&mut self) {
        if let Some(tls) = self.tls.as_mut() {
            tls.send_close_notify();
        }
    }

    /// Writes `bytes` whole and everything TLS holds, waiting for room on
    /// `stream` (this link's socket); false when the client went away. The
    /// caller bounds the time.
    pub async fn write_all(&mut self, stream: &monoio::net::TcpStream, bytes: &[u8]) -> bool {
        let mut written = 0;
        loop {
            let result = if written < bytes.len() {
                self.send_vectored(&[IoSlice::new(&bytes[written..])])
            } else {
                match self.write_pending() {
                    Ok(true) => return true,
                    Ok(false) => Err(ErrorKind::WouldBlock.into()),
                    Err(error) => Err(error),
                }
            };
            match result {
                Ok(0) => return false,
                Ok(count) => written += count,
                Err(error) if error.kind() == ErrorKind::WouldBlock => {
                    if stream.writable(false).await.is_err() {
                        return false;
                    }
                }
                Err(error) if error.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }

    /// One attempt to write a short answer (a refusal), never waiting.
    pub fn send_best_effort(&mut self, bytes: &[u8]) {
        match self.tls.as_mut() {
            None => sock::send_best_effort(self.fd, bytes),
            Some(tls) => {
                if !tls.is_handshaking() && tls.writer().write_all(bytes).is_ok() {
                    tls.send_close_notify();
                    let _ = write_pending(self.fd, tls);
                }
            }
        }
    }
}

/// Processes records read; on a protocol error writes the alert rustls
/// queued (best effort) and fails.
fn process(fd: RawFd, tls: &mut ServerConnection) -> io::Result<()> {
    match tls.process_new_packets() {
        Ok(_) => Ok(()),
        Err(error) => {
            let _ = write_pending(fd, tls);
            Err(io::Error::new(ErrorKind::InvalidData, error))
        }
    }
}

/// Writes encrypted bytes until none wait (true) or the socket is full (false).
fn write_pending(fd: RawFd, tls: &mut ServerConnection) -> io::Result<bool> {
    while tls.wants_write() {
        match tls.write_tls(&mut Fd(fd)) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(_) => {}
            Err(error) if error.kind() == ErrorKind::WouldBlock => return Ok(false),
            Err(error) if error.kind() == ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(true)
}
