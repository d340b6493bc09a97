//! Running the storage-writer as a child of the gateway (`storage_writer = "spawn"`).
//!
//! Owns finding the binary, starting it with the node's ring directory and
//! data directory, restarting it with back-off if it dies, and stopping it
//! (SIGTERM, then SIGKILL after a grace period) once the shards have drained.
//! The child gets SIGTERM if the gateway dies, so a `kill -9` of the gateway
//! leaves no orphan. Never talks to the writer: shards do, over its socket.
//! Under systemd the writer is its own unit and this module is not used.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::config::Config;
use crate::shard::WRITER_SOCKET;

const RESTART_BACKOFF_MIN: Duration = Duration::from_millis(100);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long a stopping writer may take to finish its batch.
const STOP_GRACE: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(50);

pub struct WriterChild {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// The binary to run: configured, or `storage-writer` next to this one.
fn binary(config: &Config) -> anyhow::Result<PathBuf> {
    let path = if config.storage_writer_path.as_os_str().is_empty() {
        std::env::current_exe()?
            .parent()
            .context("the gateway binary has no directory")?
            .join("storage-writer")
    } else {
        config.storage_writer_path.clone()
    };
    anyhow::ensure!(
        path.exists(),
        "storage-writer not found at {} (build it with `cargo build -p storage-writer`, set storage_writer_path, or run it yourself with storage_writer = \"external\")",
        path.display()
    );
    Ok(path)
}

pub fn spawn(config: &Config) -> anyhow::Result<WriterChild> {
    let path = binary(config)?;
    let mut command = Command::new(&path);
    command
        .arg("--ring-dir")
        .arg(&config.ring_dir)
        .arg("--socket")
        .arg(config.ring_dir.join(WRITER_SOCKET))
        .arg("--data-dir")
        .arg(&config.data_dir)
        .arg("--group-members-max")
        .arg(config.group_members_max.to_string())
        .arg("--idempotency-window-ms")
        .arg(config.idempotency_window_ms.to_string())
        .args(&config.storage_writer_args)
        // systemd's notifications are the gateway's, not its child's.
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID");
    // The child is told when the thread that forked it (the supervisor
    // below, alive as long as the gateway) goes away.
    crate::sys::die_with_spawning_thread(&mut command);
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("storage-writer".into())
            .spawn(move || supervise(command, &stop))?
    };
    tracing::info!(binary = %path.display(), "started the storage-writer");
    Ok(WriterChild { stop, thread })
}

fn supervise(mut command: Command, stop: &AtomicBool) {
    let mut backoff = RESTART_BACKOFF_MIN;
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(error) => {
                tracing::error!(%error, "could not start the storage-writer");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(RESTART_BACKOFF_MAX);
                continue;
            }
        };
        loop {
            if stop.load(Ordering::Relaxed) {
                terminate(&mut child);
                return;
            }
            match child.try_wait() {
                Ok(Some(status)) => {
                    if started.elapsed() > Duration::from_secs(30) {
                        backoff = RESTART_BACKOFF_MIN;
                    }
                    tracing::error!(%status, restart_in = ?backoff, "the storage-writer exited; acknowledgements wait until it is back");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(RESTART_BACKOFF_MAX);
                    break;
                }
                Ok(None) => std::thread::sleep(POLL),
                Err(error) => {
                    tracing::error!(%error, "lost track of the storage-writer");
                    terminate(&mut child);
                    break;
                }
            }
        }
    }
}

/// SIGTERM, then SIGKILL if the writer has not finished within the grace period.
fn terminate(child: &mut Child) {
    crate::sys::terminate(child);
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(POLL);
    }
    tracing::warn!("the storage-writer did not stop in time; killing it");
    let _ = child.kill();
    let _ = child.wait();
}

impl WriterChild {
    /// Stops the writer after it finishes the batch in hand.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}
