//! Storage outages under load, with the real processes: the embedded
//! store's file system fills up (a small tmpfs mounted by the test), and
//! PostgreSQL stops for 30 s. In both, once nothing has become durable for
//! `storage_stall_ms_max`, senders get `unavailable` with `retry_after_ms`
//! and `/readyz` says why; nothing acknowledged is lost or stored twice, and
//! service resumes by itself when space or the database comes back.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::gateway::{Client, Gateway, Next};
use testkit::postgres::Postgres;

/// The most sends one phase makes, and how long it may take.
const SENDS_MAX: usize = 3_000;
const PHASE_LIMIT: Duration = Duration::from_secs(60);
/// Bodies big enough to fill a small disk quickly.
const BODY_BYTES: usize = 2_000;

/// A tmpfs mounted for the test, unmounted when dropped.
struct SmallDisk {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(megabytes: u32) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::create_dir(&path).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "tmpfs"])
            .arg(&path)
            .status()
            .expect("mount runs");
        assert!(
            status.success(),
            "mounting a tmpfs needs root (CI runs as root; see MACHINE-NOTES)"
        );
        SmallDisk { path, _dir: dir }
    }

    /// Writes a filler file until the file system says it is full.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let filler = self.path.join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        for _ in 0..100_000 {
            if file.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = file.sync_all();
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// A sender that keeps every send until it is acknowledged, and resends
/// what was refused with the same id (as the client library does).
struct Sender {
    client: Client,
    bodies: BTreeMap<String, String>,
    /// Client id → message id.
    acknowledged: BTreeMap<String, String>,
    unacknowledged: BTreeSet<String>,
    next: usize,
    refusals: Vec<Value>,
}

impl Sender {
    fn new(mut client: Client) -> Sender {
        client.set_timeout(Duration::from_millis(20));
        Sender {
            client,
            bodies: BTreeMap::new(),
            acknowledged: BTreeMap::new(),
            unacknowledged: BTreeSet::new(),
            next: 0,
            refusals: Vec::new(),
        }
    }

    fn send_new(&mut self) {
        let id = format!("s{:05}", self.next);
        self.next += 1;
        let body = format!("{id}-{}", "x".repeat(BODY_BYTES));
        self.client.send_message(&id, "bob", &body);
        self.bodies.insert(id.clone(), body);
        self.unacknowledged.insert(id);
    }

    fn resend_unacknowledged(&mut self) {
        let ids: Vec<String> = self.unacknowledged.iter().cloned().collect();
        for id in ids {
            let body = self.bodies[&id].clone();
            self.client.send_message(&id, "bob", &body);
        }
    }

    /// Reads what has arrived (until a read times out).
    fn read(&mut self) {
        loop {
            let frame = match self.client.next_frame() {
                Next::Json(frame) => frame,
                Next::Silent => return,
                ended => panic!("the node ended alice's connection: {ended:?}"),
            };
            match frame["type"].as_str() {
                Some("sent") => {
                    let id = frame["id"].as_str().unwrap().to_owned();
                    let message_id = frame["message_id"].as_str().unwrap().to_owned();
                    if let Some(first) = self.acknowledged.insert(id.clone(), message_id.clone()) {
                        assert_eq!(first, message_id, "{id} changed its message id");
                    }
                    self.unacknowledged.remove(&id);
                }
                Some("error") => self.refusals.push(frame),
                _ => {}
            }
        }
    }

    /// Sends new messages, one every few ms, until one is refused with
    /// `unavailable`; returns that refusal.
    fn send_until_unavailable(&mut self) -> Value {
        let started = Instant::now();
        for _ in 0..SENDS_MAX {
            assert!(started.elapsed() < PHASE_LIMIT, "never refused");
            self.send_new();
            self.read();
            if let Some(refusal) = self.refusals.iter().find(|f| f["code"] == "unavailable") {
                return refusal.clone();
            }
        }
        panic!("{SENDS_MAX} sends and none refused: {:?}", self.refusals);
    }

    /// Resends until every send is acknowledged.
    fn resend_until_all_acknowledged(&mut self) {
        let started = Instant::now();
        while !self.unacknowledged.is_empty() {
            assert!(
                started.elapsed() < PHASE_LIMIT,
                "{} sends never acknowledged once storage was back",
                self.unacknowledged.len()
            );
            self.refusals.clear();
            self.resend_unacknowledged();
            let round = Instant::now();
            while !self.unacknowledged.is_empty() && round.elapsed() < Duration::from_secs(2) {
                self.read();
            }
        }
    }
}

/// Every acknowledged send is in bob's history once, with its message id.
fn assert_stored_once(gateway: &Gateway, sender: &Sender) {
    let mut bob = gateway.connect("bob", "tablet");
    let mut stored: BTreeMap<String, String> = BTreeMap::new();
    for message in bob.whole_history("dm:alice:bob") {
        let body = message["body"].as_str().unwrap();
        let id = body.split('-').next().unwrap().to_owned();
        let message_id = message["message_id"].as_str().unwrap().to_owned();
        assert!(
            stored.insert(id.clone(), message_id).is_none(),
            "{id} stored twice"
        );
    }
    for (id, message_id) in &sender.acknowledged {
        assert_eq!(
            stored.get(id),
            Some(message_id),
            "{id} was acknowledged and is not stored"
        );
    }
}

fn readyz(gateway: &Gateway) -> (u16, String) {
    gateway
        .admin_get("/readyz")
        .expect("the admin endpoint answers")
}

/// Waits until `/readyz` answers 503 because nothing is made durable (it
/// may first say that the writer is restarting), and returns its body.
fn wait_not_ready(gateway: &Gateway) -> String {
    let started = Instant::now();
    loop {
        let (status, body) = readyz(gateway);
        if status == 503 && body.contains("nothing made durable") {
            return body;
        }
        assert!(
            started.elapsed() < PHASE_LIMIT,
            "/readyz never said: {status} {body}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A gateway that runs its storage-writer (and restarts it), with `extra`.
fn gateway(extra: &[&str]) -> Gateway {
    let mut flags = testkit::gateway::UNLIMITED_RATES.to_vec();
    flags.extend(["--storage-stall-ms-max", "1000", "--body-bytes-max", "4096"]);
    flags.extend_from_slice(extra);
    Gateway::start(&flags)
}

#[test]
fn a_full_disk_refuses_sends_says_why_and_resumes_when_space_is_back() {
    // The store on the small disk; the rings (shared memory the gateway
    // writes) elsewhere, as they would be on a real host.
    let disk = SmallDisk::mount(24);
    let rings = tempfile::tempdir().unwrap();
    let gateway = gateway(&[
        "--data-dir",
        disk.path.to_str().unwrap(),
        "--ring-dir",
        rings.path().to_str().unwrap(),
    ]);
    let mut sender = Sender::new(gateway.connect("alice", "phone"));
    let _bob = gateway.connect("bob", "phone");
    for _ in 0..20 {
        sender.send_new();
    }
    sender.resend_until_all_acknowledged();

    let filler = disk.fill();
    let refusal = sender.send_until_unavailable();
    assert!(
        refusal["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0),
        "unavailable says when to retry: {refusal}"
    );
    let body = wait_not_ready(&gateway);
    assert!(
        body.contains("No space left on device"),
        "/readyz says why: {body}"
    );

    std::fs::remove_file(filler).unwrap();
    sender.resend_until_all_acknowledged();
    gateway.wait_readyz(200);
    assert_stored_once(&gateway, &sender);
    assert!(gateway.metric("gateway_sends_refused_stalled_total", &[]) >= 1);
}

#[test]
fn postgresql_stopped_for_30_s_refuses_sends_says_why_and_resumes() {
    let mut database = Postgres::start();
    let flags = database.writer_flags();
    let mut flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let data = tempfile::tempdir().unwrap();
    flags.extend(["--data-dir", data.path().to_str().unwrap()]);
    let gateway = gateway(&flags);
    let mut sender = Sender::new(gateway.connect("alice", "phone"));
    let _bob = gateway.connect("bob", "phone");
    for _ in 0..20 {
        sender.send_new();
    }
    sender.resend_until_all_acknowledged();

    database.stop();
    let stopped = Instant::now();
    let refusal = sender.send_until_unavailable();
    assert!(
        refusal["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0),
        "unavailable says when to retry: {refusal}"
    );
    let body = wait_not_ready(&gateway);
    assert!(body.contains("connect"), "/readyz says why: {body}");
    // Senders keep trying, as clients do, for the rest of the 30 s.
    while stopped.elapsed() < Duration::from_secs(30) {
        sender.resend_unacknowledged();
        sender.send_new();
        let pause = Instant::now();
        while pause.elapsed() < Duration::from_millis(500) {
            sender.read();
        }
    }
    database.restart();
    sender.resend_until_all_acknowledged();
    gateway.wait_readyz(200);
    assert_stored_once(&gateway, &sender);
}
