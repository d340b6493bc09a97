//! Back-pressure by lag (`sent_wait_ms_max`, on by default): a storage-writer
//! slowed on purpose (one record per batch, and stopped with SIGSTOP for
//! 45 ms of every 50: a few hundred records/s) under 1,000 sends/s. Senders must hear
//! `overloaded` with `retry_after_ms` while the ring is still nearly empty
//! (refused by lag, not by ring bytes), and nothing that was accepted may be
//! lost or doubled: each accepted send is answered `sent` once, reaches its
//! receiver once, and is in history once; no refused one is stored.
//! Real processes and real WebSockets over loopback.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use testkit::gateway::{Gateway, Next, UNLIMITED_RATES};

const SENDS: usize = 1_500;

/// Stops and continues one process (ours: the writer our gateway spawned)
/// until dropped, which leaves it running.
struct Throttle {
    pid: i32,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Throttle {
    fn start(pid: u32, stopped: Duration, running: Duration) -> Self {
        let pid = pid as i32;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            // Bounded: at most two minutes of cycles.
            for _ in 0..(120_000 / (stopped + running).as_millis().max(1)) {
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                // SAFETY: kill(2) has no memory preconditions.
                unsafe { libc::kill(pid, libc::SIGSTOP) };
                std::thread::sleep(stopped);
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGCONT) };
                std::thread::sleep(running);
            }
        });
        Self {
            pid,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // SAFETY: kill(2) has no memory preconditions.
        unsafe { libc::kill(self.pid, libc::SIGCONT) };
    }
}

#[test]
fn senders_get_overloaded_by_lag_and_nothing_accepted_is_lost() {
    let mut flags = UNLIMITED_RATES.to_vec();
    flags.extend([
        "--shards",
        "1",
        "--sent-wait-ms-max",
        "50",
        "--storage-writer-arg=--batch-records-max",
        "--storage-writer-arg=1",
    ]);
    let gateway = Gateway::start(&flags);
    let mut alice = gateway.connect("alice", "phone");
    let mut bob = gateway.connect("bob", "phone");
    let writer = gateway.writer_pid().expect("the gateway spawned a writer");
    let throttle = Throttle::start(writer, Duration::from_millis(45), Duration::from_millis(5));
    // 1,000 sends/s for 1.5 s: several times what this writer commits, and
    // long enough to outlast the bound (a burst absorbed within 50 ms is not
    // refused: nothing has waited yet).
    for index in 0..SENDS {
        let id = format!("s{index}");
        alice.send_message(&id, "bob", &id);
        if index % 20 == 19 {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    // Every send is answered: `sent` (once durable) or `overloaded`.
    let mut sent: BTreeMap<String, String> = BTreeMap::new();
    let mut refused: BTreeSet<String> = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    alice.set_timeout(Duration::from_millis(500));
    while sent.len() + refused.len() < SENDS && Instant::now() < deadline {
        let Next::Json(frame) = alice.next_frame() else {
            continue;
        };
        let id = frame["id"].as_str().unwrap_or_default().to_owned();
        match frame["type"].as_str() {
            Some("sent") => {
                let message_id = frame["message_id"].as_str().unwrap().to_owned();
                assert!(sent.insert(id, message_id).is_none(), "one `sent` per send");
            }
            Some("error") => {
                assert_eq!(frame["code"], "overloaded", "{frame}");
                assert!(frame["retry_after_ms"].as_u64().is_some(), "{frame}");
                assert!(refused.insert(id), "one answer per send");
            }
            _ => {}
        }
    }
    drop(throttle);
    eprintln!("accepted {}, refused {}", sent.len(), refused.len());
    assert_eq!(
        sent.len() + refused.len(),
        SENDS,
        "every send answered in time"
    );
    assert!(sent.keys().all(|id| !refused.contains(id)));
    // The burst is several seconds of this writer's work: most of it must be
    // refused at once rather than queued for seconds.
    assert!(
        refused.len() >= SENDS / 5,
        "refused {} of {SENDS}",
        refused.len()
    );
    assert_eq!(
        gateway.metric("gateway_sends_refused_lagging_total", &[]),
        refused.len() as u64,
        "refused by lag"
    );
    assert_eq!(
        gateway.metric("gateway_ring_full_total", &[]),
        0,
        "not by a full ring"
    );

    // The receiver got each accepted message once, and no refused one.
    let mut delivered: BTreeMap<String, usize> = BTreeMap::new();
    bob.set_timeout(Duration::from_millis(1_000));
    while delivered.len() < sent.len() && Instant::now() < deadline {
        if let Next::Json(frame) = bob.next_frame() {
            if frame["type"] == "message" {
                *delivered
                    .entry(frame["body"].as_str().unwrap().to_owned())
                    .or_default() += 1;
            }
        }
    }
    bob.expect_silence(Duration::from_millis(300));
    assert!(delivered.values().all(|count| *count == 1), "no doubles");
    let delivered_ids: BTreeSet<&String> = delivered.keys().collect();
    let sent_ids: BTreeSet<&String> = sent.keys().collect();
    assert_eq!(delivered_ids, sent_ids, "each accepted send delivered");

    // History holds exactly the accepted sends, under their `sent` ids.
    let mut stored: BTreeMap<String, String> = BTreeMap::new();
    for message in alice.whole_history("dm:alice:bob") {
        let body = message["body"].as_str().unwrap().to_owned();
        let id = message["message_id"].as_str().unwrap().to_owned();
        assert!(stored.insert(body, id).is_none(), "stored once");
    }
    assert_eq!(stored, sent, "stored = acknowledged, with the same ids");

    // Once the backlog is durable, sends are accepted again.
    alice.send_message("after", "bob", "after");
    assert_eq!(alice.recv_type("sent")["id"], "after");
}
