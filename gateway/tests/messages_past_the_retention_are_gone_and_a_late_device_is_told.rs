//! Hot retention, end to end: with `--message-retention-ms` cut to 8 s, a
//! device that was away longer syncs only what retention still keeps, and
//! its `synced` frame says how many messages it missed for good
//! (`expired`); history stops at the same floor. The storage-writer is
//! killed with SIGKILL by pid, again and again while its cleanup (every
//! second) removes the old rows: nothing retention still covers is lost,
//! and after the cleanup has caught up the device is still told exactly
//! what it missed.

use std::time::{Duration, Instant};

use testkit::gateway::{writer_args, Gateway};

const RETENTION_MS: u64 = 8_000;

fn bodies(frames: &[serde_json::Value]) -> Vec<String> {
    frames
        .iter()
        .map(|frame| frame["body"].as_str().unwrap().to_owned())
        .collect()
}

/// Connects bob's laptop and returns (what it synced, its `synced` frame).
fn sync_bob(gateway: &Gateway) -> (Vec<serde_json::Value>, serde_json::Value) {
    let mut bob = gateway.connect_unsynced("bob", "laptop");
    let mut synced = Vec::new();
    loop {
        let frame = bob.recv();
        match frame["type"].as_str() {
            Some("message") => synced.push(frame),
            Some("synced") => return (synced, frame),
            _ => panic!("unexpected frame during the sync: {frame}"),
        }
    }
}

#[test]
fn a_device_away_past_the_retention_is_told_what_it_missed_and_keeps_the_rest() {
    let retention = RETENTION_MS.to_string();
    let writer_metrics = format!("127.0.0.1:{}", testkit::free_port());
    let flags = writer_args(&[
        "--metrics-listen",
        &writer_metrics,
        "--message-retention-ms",
        &retention,
        "--cleanup-interval-s",
        "1",
    ]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let gateway = Gateway::start(&flags);
    let mut alice = gateway.connect("alice", "phone");
    for index in 0..5 {
        alice.send_message(&format!("old-{index}"), "bob", &format!("old {index}"));
        alice.recv_type("sent");
    }
    // Past the retention: the old messages leave history at once.
    std::thread::sleep(Duration::from_millis(RETENTION_MS + 500));
    assert!(
        alice.history("dm:alice:bob", None, 50).is_empty(),
        "history stops at the retention floor"
    );
    for index in 0..2 {
        alice.send_message(&format!("new-{index}"), "bob", &format!("new {index}"));
        alice.recv_type("sent");
    }

    // The writer dies by SIGKILL three times, at moments spread over its
    // first cleanup passes (one a second from its start).
    let mut killed = None;
    for delay_ms in [1_100, 1_400, 1_700] {
        let deadline = Instant::now() + Duration::from_secs(30);
        let pid = loop {
            if let Some(pid) = gateway.writer_pid().filter(|pid| Some(*pid) != killed) {
                break pid;
            }
            assert!(Instant::now() < deadline, "the writer did not come back");
            std::thread::sleep(Duration::from_millis(50));
        };
        std::thread::sleep(Duration::from_millis(delay_ms));
        testkit::signal(pid, "KILL");
        killed = Some(pid);
    }
    gateway.wait_readyz(200);

    let (synced, done) = sync_bob(&gateway);
    assert_eq!(
        bodies(&synced),
        ["new 0", "new 1"],
        "what retention covers is kept"
    );
    assert_eq!(done["count"], 2, "{done}");
    assert_eq!(done["expired"], 5, "bob is told he missed five: {done}");

    // Once the cleanup has removed the rows (every second), the device
    // that never acknowledged them is still told, and history agrees.
    gateway.wait_metric("gateway_connections", &[], 0);
    std::thread::sleep(Duration::from_millis(2_500));
    let (synced, done) = sync_bob(&gateway);
    assert_eq!(bodies(&synced), ["new 0", "new 1"]);
    assert_eq!(done["expired"], 5, "{done}");
    let history = alice.history("dm:alice:bob", None, 50);
    assert_eq!(bodies(&history), ["new 1", "new 0"], "newest first");
    // The rows are gone from the store, not only hidden: the writer running
    // now has finished a pass that left nothing older than the floor.
    let (status, metrics) =
        testkit::gateway::http_get(writer_metrics.parse().unwrap(), "/metrics").expect("metrics");
    assert_eq!(status, 200);
    let caught_up = testkit::gateway::metric_in(
        &metrics,
        "storage_writer_cleanup_caught_up_unix_seconds",
        &[],
    );
    assert!(
        caught_up > 0,
        "a cleanup pass removed everything old:\n{metrics}"
    );
}
