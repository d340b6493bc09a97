//! The storage-writer as tests run it: built when stale, started on a data
//! directory, killed with `kill -9` or when dropped.
//!
//! Owns finding (and, for `cargo test -p gateway` alone, building) the
//! writer binary and `Writer`, a writer process a test controls (the gateway
//! started with `--storage-writer external`). Every wait is bounded by `WAIT`.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{repo, WAIT};

/// The storage-writer binary the gateway spawns (next to the gateway binary).
pub fn storage_writer_binary() -> std::path::PathBuf {
    crate::workspace_binary("storage-writer")
}

/// `cargo test -p gateway` alone neither builds nor rebuilds the other
/// package's binary, and a stale writer would speak an old read-path format:
/// build it when it is missing or older than its sources (`cargo test
/// --workspace` has already built it, so then this only compares times).
pub fn ensure_storage_writer_built() {
    static BUILT: std::sync::Once = std::sync::Once::new();
    BUILT.call_once(|| {
        let built = std::fs::metadata(storage_writer_binary()).and_then(|m| m.modified());
        let sources = ["storage-writer", "protocol", "ring"]
            .iter()
            .filter_map(|crate_dir| newest_modification(&repo().join(crate_dir)))
            .max();
        if let (Ok(built), Some(sources)) = (built, sources) {
            if built >= sources {
                return;
            }
        }
        let release = crate::profile_dir().ends_with("release");
        let status = Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", "storage-writer"])
            .args(release.then_some("--release"))
            .current_dir(repo())
            .status()
            .unwrap();
        assert!(status.success(), "building storage-writer");
    });
}

/// A storage-writer run by the test (the gateway started with
/// `--storage-writer external`), so the test can kill and restart it.
pub struct Writer {
    child: Child,
}

impl Writer {
    /// Starts the writer on `data_dir` (rings in `data_dir/rings`) and waits
    /// until its socket accepts connections.
    pub fn start(data_dir: &std::path::Path, extra: &[&str]) -> Writer {
        Writer::start_at(data_dir, data_dir, extra)
    }

    /// Starts the writer on the rings of the gateway whose data directory is
    /// `gateway_dir`, with its own store in `data_dir` (a small file system,
    /// to fill it).
    pub fn start_at(
        gateway_dir: &std::path::Path,
        data_dir: &std::path::Path,
        extra: &[&str],
    ) -> Writer {
        ensure_storage_writer_built();
        let rings = gateway_dir.join("rings");
        let socket = rings.join("writer.sock");
        let _ = std::fs::remove_file(&socket);
        let child = Command::new(storage_writer_binary())
            .arg("--ring-dir")
            .arg(&rings)
            .arg("--socket")
            .arg(&socket)
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("storage-writer starts");
        let mut writer = Writer { child };
        let deadline = Instant::now() + WAIT;
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if let Some(status) = writer.child.try_wait().unwrap() {
                panic!("storage-writer exited during start-up: {status}");
            }
            assert!(Instant::now() < deadline, "storage-writer not ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        writer
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The newest modification time of any file under `dir` (bounded depth).
fn newest_modification(dir: &std::path::Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    let mut stack = vec![(dir.to_path_buf(), 0)];
    while let Some((path, depth)) = stack.pop() {
        for entry in std::fs::read_dir(&path).ok()?.flatten() {
            let metadata = entry.metadata().ok()?;
            if metadata.is_dir() && depth < 4 {
                stack.push((entry.path(), depth + 1));
            } else if metadata.is_file() {
                newest = newest.max(metadata.modified().ok());
            }
        }
    }
    newest
}
