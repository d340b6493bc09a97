//! A ring the writer cannot trust is refused at attach, with a message that
//! names the file and what is wrong, and a corrupt record stops the drain of
//! that ring instead of being read as data. Runs the real binary.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use chat_ring::{attach_producer, RingOptions};

fn run_writer(dir: &Path) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_storage-writer"))
        .arg("--ring-dir")
        .arg(dir.join("rings"))
        .arg("--socket")
        .arg(dir.join("rings/writer.sock"))
        .arg("--data-dir")
        .arg(dir)
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

/// Attaches as the producer. A test running beside this one that spawns a
/// process holds a copy of every open descriptor between its fork and exec,
/// and with it the role lock this test just dropped: try again briefly.
fn producer(path: &Path, options: RingOptions) -> chat_ring::Producer {
    for _ in 0..200 {
        match attach_producer(path, options) {
            Ok(producer) => return producer,
            Err(chat_ring::RingError::Locked { .. }) => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(error) => panic!("{error}"),
        }
    }
    panic!("the producer lock of {} stayed held", path.display());
}

fn valid_ring(dir: &Path) -> std::path::PathBuf {
    std::fs::create_dir_all(dir.join("rings")).unwrap();
    let path = dir.join("rings/shard-0.ring");
    let options = RingOptions {
        capacity_bytes: 64 * 1024,
        shard_id: 0,
    };
    drop(producer(&path, options));
    path
}

#[test]
fn a_file_that_is_not_a_ring_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("rings")).unwrap();
    std::fs::write(dir.path().join("rings/shard-0.ring"), vec![0xAB; 8192]).unwrap();
    let (ok, text) = run_writer(dir.path());
    assert!(!ok);
    assert!(
        text.contains("shard-0.ring") && text.contains("not a chat ring"),
        "{text}"
    );
}

#[test]
fn a_ring_of_another_layout_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = valid_ring(dir.path());
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8] = bytes[8].wrapping_add(1); // the layout version follows the magic
    std::fs::write(&path, bytes).unwrap();
    let (ok, text) = run_writer(dir.path());
    assert!(!ok);
    assert!(text.contains("layout version"), "{text}");
}

#[test]
fn a_truncated_ring_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = valid_ring(dir.path());
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(4096 + 100).unwrap();
    let (ok, text) = run_writer(dir.path());
    assert!(!ok);
    assert!(text.contains("bytes, the header needs"), "{text}");
}

#[test]
fn a_corrupt_record_stops_that_ring_and_says_where() {
    let dir = tempfile::tempdir().unwrap();
    let path = valid_ring(dir.path());
    {
        let options = RingOptions {
            capacity_bytes: 64 * 1024,
            shard_id: 0,
        };
        let mut producer = producer(&path, options);
        producer.try_append(b"this is not a record").unwrap();
        // Flip a payload byte: the checksum no longer matches.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[4096 + 8] ^= 0xFF;
        std::fs::write(&path, bytes).unwrap();
    }
    let child = Command::new(env!("CARGO_BIN_EXE_storage-writer"))
        .arg("--ring-dir")
        .arg(dir.path().join("rings"))
        .arg("--socket")
        .arg(dir.path().join("rings/writer.sock"))
        .arg("--data-dir")
        .arg(dir.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let output = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(
        text.contains("record checksum mismatch") && text.contains("stopped draining"),
        "{text}"
    );
}
