//! Child processes that bench starts: they die with it, and find free ports.
//!
//! Owns the two process-level helpers every server bench starts (gateways,
//! storage-writers, nats-server) uses, and the `pre_exec` hook's `unsafe`.
//! Never starts a process itself.

use std::net::TcpListener;
use std::process::Command;

/// Makes a server bench starts (a gateway, a writer, nats-server) get
/// SIGTERM when the spawning thread ends: a bench killed by a signal runs no
/// destructors, and must not leave servers running.
pub fn die_with_this_thread(command: &mut Command) {
    // SAFETY: between fork and exec only prctl, which is async-signal-safe,
    // is called; it touches no memory of the parent.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(command, || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A free loopback port (bound and released; the server binds it next).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
