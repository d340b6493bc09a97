//! The gateway's process-level system calls: opting out of transparent huge
//! pages, a child that dies with its spawner, SIGTERM to a child.
//!
//! Owns, with `sock.rs` (the socket calls), every `unsafe` block of the
//! gateway: the crate denies `unsafe_code` and allows it in these two files
//! only. Each block says why it is sound. Never keeps state.

use std::process::{Child, Command};

/// Asks the kernel not to back this process's memory with transparent huge
/// pages (see `main::tune_allocator` for the measured reason). Failure (an
/// old kernel) only costs memory, so it is ignored.
pub fn disable_transparent_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and changes a
    // flag of this process; it cannot affect memory safety.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// Makes the child `command` starts get SIGTERM when the thread that spawns
/// it ends (PR_SET_PDEATHSIG), so a gateway killed with `kill -9` leaves no
/// storage-writer behind.
pub fn die_with_spawning_thread(command: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and makes one
    // async-signal-safe system call (prctl); it touches no locks or memory
    // shared with the parent.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(command, || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Sends SIGTERM to `child` (std's `Child::kill` only sends SIGKILL).
pub fn terminate(child: &Child) {
    // SAFETY: kill(2) on our own child's pid, which has not been reaped yet
    // (so it cannot have been reused); no memory is involved.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
}
