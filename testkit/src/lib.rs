//! Helpers only tests use, shared by every crate's tests so none is written twice.
//!
//! Owns starting the real processes the tests need on loopback (the gateway
//! and its client in `gateway`, the storage-writer in `writer`, PostgreSQL,
//! nats-server, a fleet of nodes in `fleet`), picking free ports, killing what a test started, signals,
//! and reading a fake systemd notify socket; the chaos scenario (`chaos`),
//! which `bench chaos` runs for minutes; scenarios two backends' tests share
//! (`retention`, `gateway::messages_survive_a_node_replacement`). Never used by the gateway or the
//! storage-writer.

pub mod chaos;
pub mod fleet;
pub mod gateway;
pub mod nats;
pub mod postgres;
pub mod push_standins;
pub mod retention;
pub mod webpush;
pub mod writer;

use std::net::TcpListener;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

/// Longest any single wait in a test may take.
pub const WAIT: Duration = Duration::from_secs(10);

/// A free loopback port (bound and released; the caller binds it next).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Kills a child process when the test ends, pass or fail.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The repository root (scripts, tuning and systemd files live there).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit sits in the workspace root")
        .to_path_buf()
}

/// Runs a script from the repository with `args`, asserts it succeeded, and
/// returns what it printed.
pub fn run_script(script: &str, args: &[&str]) -> String {
    let output = Command::new(repo().join(script))
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{script} failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// A binary of this workspace, next to the running test (`target/<profile>/`:
/// a test runs from its `deps/` folder). Cargo builds a package's binaries
/// before its integration tests; see `writer::ensure_storage_writer_built`
/// for another package's.
pub fn workspace_binary(name: &str) -> PathBuf {
    profile_dir().join(name)
}

/// `target/<profile>`: tests run from its `deps`, `bench` from it.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("this binary's path");
    let dir = exe.parent().expect("a binary has a directory");
    if dir.ends_with("deps") {
        dir.parent()
            .expect("deps is in target/<profile>")
            .to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// Sends `signal` (a name: TERM, HUP, KILL, ...) to `pid`, a process the test started.
pub fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args(["-s", signal, &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -s {signal} {pid}");
}

/// The next message on a fake systemd `NOTIFY_SOCKET` (the socket's read
/// timeout bounds the wait).
pub fn next_datagram(socket: &UnixDatagram) -> String {
    let mut buffer = [0u8; 4096];
    let length = socket
        .recv(&mut buffer)
        .expect("a notification within the timeout");
    String::from_utf8_lossy(&buffer[..length]).into_owned()
}
