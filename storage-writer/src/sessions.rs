//! Connected gateway shards, for `Durable` notices.
//!
//! Owns the map from ring path to the socket of the shard writing that ring.
//! A notice is one small write; a shard that stopped reading (its socket
//! buffer full) is dropped rather than allowed to stall the commit thread.
//! Never reads from the sockets (the session threads in `serve` do).

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chat_protocol::store_wire::Response;

/// A shard's socket, shared by its session thread (answers) and the commit thread (notices).
pub type SessionSocket = Arc<Mutex<UnixStream>>;

#[derive(Default)]
pub struct Sessions {
    by_ring: Mutex<HashMap<PathBuf, SessionSocket>>,
}

/// Longest a write to a shard may block before the shard is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

impl Sessions {
    pub fn register(&self, ring: PathBuf, socket: SessionSocket) {
        self.by_ring
            .lock()
            .expect("sessions lock")
            .insert(ring, socket);
    }

    pub fn unregister(&self, ring: &Path, socket: &SessionSocket) {
        let mut sessions = self.by_ring.lock().expect("sessions lock");
        if sessions.get(ring).is_some_and(|s| Arc::ptr_eq(s, socket)) {
            sessions.remove(ring);
        }
    }

    /// Closes every shard's session (on shutdown): they reconnect elsewhere.
    pub fn close_all(&self) {
        for socket in self
            .by_ring
            .lock()
            .expect("sessions lock")
            .drain()
            .map(|(_, s)| s)
        {
            let _ = socket
                .lock()
                .expect("socket lock")
                .shutdown(std::net::Shutdown::Both);
        }
    }

    /// Tells the shard writing `ring` that everything before `position` is durable.
    pub fn durable(&self, ring: &Path, position: u64) {
        self.notify_ring(ring, &Response::Durable { position });
    }

    /// Tells every shard that commits fail, and why (they refuse new sends
    /// and say so on `/readyz` once it lasts).
    pub fn stalled(&self, reason: &str) {
        let frame = Response::Stalled {
            reason: reason.to_owned(),
        }
        .encode();
        let sessions: Vec<(PathBuf, SessionSocket)> = self
            .by_ring
            .lock()
            .expect("sessions lock")
            .iter()
            .map(|(ring, socket)| (ring.clone(), socket.clone()))
            .collect();
        for (ring, socket) in sessions {
            self.notify(&ring, &socket, &frame);
        }
    }

    /// Tells the shard writing `ring` that its message `message_id` was not stored.
    pub fn refused(&self, ring: &Path, message_id: u64, reason: &str) {
        let reason = reason.to_owned();
        self.notify_ring(ring, &Response::Refused { message_id, reason });
    }

    /// Sends `notice` to the shard writing `ring`, if it is connected.
    fn notify_ring(&self, ring: &Path, notice: &Response) {
        let socket = self
            .by_ring
            .lock()
            .expect("sessions lock")
            .get(ring)
            .cloned();
        if let Some(socket) = socket {
            self.notify(ring, &socket, &notice.encode());
        }
    }

    fn notify(&self, ring: &Path, socket: &SessionSocket, frame: &[u8]) {
        if let Err(error) = send(socket, frame) {
            tracing::warn!(ring = %ring.display(), %error, "shard not reading; dropping its session");
            let _ = socket
                .lock()
                .expect("socket lock")
                .shutdown(std::net::Shutdown::Both);
            self.unregister(ring, socket);
        }
    }
}

pub fn send(socket: &SessionSocket, frame: &[u8]) -> std::io::Result<()> {
    socket.lock().expect("socket lock").write_all(frame)
}
