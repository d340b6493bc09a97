//! What can go wrong with a ring: opening or reading it, or no room in it.
//!
//! Owns the error types every other module returns. Never decides what a
//! caller does about them.

/// Why a ring could not be opened or read. The message names the file and
/// what is wrong, so an operator can tell a misconfiguration from corruption.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a chat ring (magic {found:#018x})")]
    BadMagic { path: String, found: u64 },
    #[error("{path}: layout version {found}, this build reads version {expected}")]
    WrongVersion {
        path: String,
        found: u32,
        expected: u32,
    },
    #[error("{path}: header says {what} is {found}, expected {expected}")]
    Mismatch {
        path: String,
        what: &'static str,
        found: u64,
        expected: u64,
    },
    #[error("{path}: file is {found} bytes, the header needs {expected}")]
    Truncated {
        path: String,
        found: u64,
        expected: u64,
    },
    #[error("{path}: already attached by another {role} (lock held)")]
    Locked { path: String, role: &'static str },
    #[error("ring corrupt at position {position}: {reason}")]
    Corrupt { position: u64, reason: &'static str },
    #[error("invalid ring options: {0}")]
    Options(&'static str),
}

/// The ring has no room for this record until the consumer makes more durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("ring full: {needed} bytes needed, {free} free")]
pub struct RingFull {
    pub needed: u64,
    pub free: u64,
}
