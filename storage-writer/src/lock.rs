//! The data directory's lock: at most one storage-writer uses a data directory.
//!
//! Owns taking an exclusive `flock` on a lock file, waiting (bounded) while a
//! previous writer finishes its last batch. The lock is released when the
//! returned file is dropped or the process dies, so a `kill -9` never leaves
//! it stale. Never deletes the lock file.

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

const RETRY: Duration = Duration::from_millis(50);

pub fn exclusive(path: &Path, wait: Duration) -> Result<File> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let deadline = Instant::now() + wait;
    let mut logged = false;
    loop {
        // An exclusive flock(2), released when the file is closed.
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) => {}
            Err(std::fs::TryLockError::Error(error)) => {
                return Err(error).with_context(|| format!("locking {}", path.display()));
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} is held by another storage-writer (waited {wait:?})",
            path.display()
        );
        if !logged {
            tracing::info!(lock = %path.display(), "waiting for the previous storage-writer to exit");
            logged = true;
        }
        std::thread::sleep(RETRY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_waits_then_fails_and_a_release_frees_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("storage-writer.lock");
        let first = exclusive(&path, Duration::ZERO).unwrap();
        let error = exclusive(&path, Duration::from_millis(120)).unwrap_err();
        assert!(
            error.to_string().contains("held by another storage-writer"),
            "{error}"
        );
        drop(first);
        exclusive(&path, Duration::ZERO).unwrap();
    }
}
