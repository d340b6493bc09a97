//! A nanosecond-precise wake-up for the worker's epoll: a timerfd armed at the
//! next send's intended time (epoll's own timeout is whole milliseconds, which
//! would make the load generator, not the gateway, the source of lateness).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

pub struct SendTimer {
    fd: OwnedFd,
    armed_for_ns: u64,
}

impl SendTimer {
    pub fn new() -> io::Result<Self> {
        // SAFETY: timerfd_create takes integer flags and returns a new fd or -1.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self {
            fd,
            armed_for_ns: 0,
        })
    }

    /// Fires at `at_ns` (CLOCK_MONOTONIC, absolute). Re-arming for the same time is free.
    pub fn arm(&mut self, at_ns: u64) -> io::Result<()> {
        if at_ns == self.armed_for_ns {
            return Ok(());
        }
        let at = libc::timespec {
            tv_sec: (at_ns / 1_000_000_000) as libc::time_t,
            tv_nsec: (at_ns % 1_000_000_000) as libc::c_long,
        };
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: at,
        };
        // SAFETY: `spec` is a live itimerspec; a null old-value pointer is allowed.
        let result = unsafe {
            libc::timerfd_settime(
                self.fd.as_raw_fd(),
                libc::TFD_TIMER_ABSTIME,
                &spec,
                std::ptr::null_mut(),
            )
        };
        if result < 0 {
            return Err(io::Error::last_os_error());
        }
        self.armed_for_ns = at_ns;
        Ok(())
    }

    /// Clears a fired timer so epoll stops reporting it.
    pub fn acknowledge(&mut self) {
        let mut expirations = 0u64;
        // SAFETY: reads 8 bytes into a live u64; EAGAIN (not fired) is harmless.
        unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut expirations as *mut u64).cast(),
                8,
            )
        };
        self.armed_for_ns = 0;
    }

    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }
}
