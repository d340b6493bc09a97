//! Non-blocking socket reads and writes on a raw fd, for connections whose
//! readiness is awaited through monoio.
//!
//! Owns the gateway's socket `unsafe` (with `sys.rs`, the only files where
//! the crate allows it): `recv`/`sendmsg` with MSG_DONTWAIT.
//! The connection task waits for readiness (`readable`/`writable`) and then
//! reads into the shard's shared buffer, so an idle connection parks no buffer.
//! MSG_DONTWAIT makes every call non-blocking whatever mode the fd is in
//! (io_uring's accepted sockets are blocking). Never closes or owns an fd.

use std::io::{self, IoSlice};
use std::os::fd::RawFd;

/// Reads what is available into `buffer`. `Ok(0)` is end of stream;
/// `ErrorKind::WouldBlock` means nothing is available now.
pub fn recv(fd: RawFd, buffer: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buffer` is a valid, exclusively borrowed region of `buffer.len()`
    // bytes for the whole call; the kernel writes at most that many. `fd` is
    // owned by the caller's live TcpStream, so it is open and not reused.
    let read = unsafe {
        libc::recv(
            fd,
            buffer.as_mut_ptr().cast(),
            buffer.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if read < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(read as usize)
}

/// The first byte waiting on the socket, left there (MSG_PEEK): how the TLS
/// listener tells a TLS client from a plain one. `Ok(None)` is end of stream.
pub fn peek_byte(fd: RawFd) -> io::Result<Option<u8>> {
    let mut byte = 0u8;
    // SAFETY: `byte` is a valid, exclusively borrowed 1-byte region for the
    // call; `fd` is owned by the caller's live TcpStream.
    let read = unsafe {
        libc::recv(
            fd,
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_DONTWAIT | libc::MSG_PEEK,
        )
    };
    match read {
        r if r < 0 => Err(io::Error::last_os_error()),
        0 => Ok(None),
        _ => Ok(Some(byte)),
    }
}

/// Writes as much of `slices` as the socket takes now, without SIGPIPE.
pub fn send_vectored(fd: RawFd, slices: &[IoSlice<'_>]) -> io::Result<usize> {
    // SAFETY: a zeroed msghdr is a valid empty header; we then point it at
    // `slices`, whose layout matches `iovec` (documented for IoSlice on Unix)
    // and which outlives the call. The kernel only reads from them.
    let sent = unsafe {
        let mut header: libc::msghdr = std::mem::zeroed();
        header.msg_iov = slices.as_ptr() as *mut libc::iovec;
        header.msg_iovlen = slices.len() as _;
        libc::sendmsg(fd, &header, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sent as usize)
}

/// Writes as much of `bytes` as fits now; for short refusals on a socket that
/// is about to close.
pub fn send_best_effort(fd: RawFd, bytes: &[u8]) {
    let _ = send_vectored(fd, &[IoSlice::new(bytes)]);
}

/// Half-closes the socket for writing (sends FIN after queued data).
pub fn shutdown_write(fd: RawFd) {
    // SAFETY: shutdown only reads its integer arguments; `fd` belongs to the
    // caller's live stream. An error (already closed by the peer) is harmless.
    unsafe {
        libc::shutdown(fd, libc::SHUT_WR);
    }
}

/// Sets SO_SNDBUF; the kernel doubles the value for bookkeeping.
pub fn set_send_buffer(fd: RawFd, bytes: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: `value` is a live c_int and we pass its exact size; `fd` is open.
    let result = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A second, independently owned descriptor for the same socket, so a socket
/// can move to another shard's runtime while the first runtime closes its own.
pub fn duplicate(fd: RawFd) -> io::Result<std::net::TcpStream> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: dup only reads its argument; `fd` is open (the caller's live stream).
    let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if copy < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `copy` is a fresh descriptor that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(copy) };
    Ok(std::net::TcpStream::from(owned))
}
