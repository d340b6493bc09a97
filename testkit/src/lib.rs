//! Helpers only tests use, shared by every crate's tests so none is written twice.
//!
//! Owns starting real servers the tests need on loopback (PostgreSQL,
//! nats-server) and picking free ports. Never used by a shipped binary.

pub mod nats;
pub mod postgres;

use std::net::TcpListener;

/// A free loopback port (bound and released; the caller binds it next).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
