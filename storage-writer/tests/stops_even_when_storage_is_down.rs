//! A writer whose database is gone keeps retrying its batch, but SIGTERM
//! still stops it: the batch was never acknowledged and stays in the ring
//! (the durable watermark does not move), so the next writer commits it.
//! Runs the real binary against a real PostgreSQL that is then stopped.

use std::process::Command;
use std::time::{Duration, Instant};

use chat_protocol::records::MessageRecord;
use chat_ring::{attach_producer, RingOptions};
use testkit::KillOnDrop;

/// Kills the writer if the test fails before it exits (no orphan).
#[test]
fn sigterm_stops_a_writer_that_cannot_commit_and_the_record_stays_in_the_ring() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("rings")).unwrap();
    let options = RingOptions {
        capacity_bytes: 64 * 1024,
        shard_id: 0,
    };
    let mut producer = attach_producer(&dir.path().join("rings/shard-0.ring"), options).unwrap();
    let database = testkit::postgres::Postgres::start();
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_storage-writer"))
            .arg("--ring-dir")
            .arg(dir.path().join("rings"))
            .arg("--socket")
            .arg(dir.path().join("rings/writer.sock"))
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--backend", "postgres", "--postgres-url", &database.url()])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Ready (schema applied) once its socket listens.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !dir.path().join("rings/writer.sock").exists() {
        assert!(Instant::now() < deadline, "the writer never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(database);
    let record = MessageRecord {
        message_id: 1 << 30,
        ts: 1,
        conversation: "dm:alice:bob",
        from: "alice",
        from_device: "phone",
        to: "bob",
        client_msg_id: "c1",
        body: "x",
        media: None,
        event: None,
        recipients: Vec::new(),
        bodies: Vec::new(),
    };
    let end = producer.try_append(&record.encode()).unwrap();
    producer.wake_consumer();
    std::thread::sleep(Duration::from_millis(1_500)); // a few failed attempts

    testkit::signal(child.0.id(), "TERM");
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "SIGTERM did not stop a writer that cannot commit"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut text = String::new();
    std::io::Read::read_to_string(child.0.stderr.as_mut().unwrap(), &mut text).unwrap();
    assert!(status.success(), "{status}: {text}");
    assert!(
        text.contains("stays in the rings for the next writer"),
        "{text}"
    );
    assert!(
        producer.durable() < end,
        "an uncommitted record was marked durable"
    );
}
