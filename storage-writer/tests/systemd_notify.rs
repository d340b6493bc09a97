//! Under systemd (Type=notify) the storage-writer says READY=1 once its
//! socket listens, and STOPPING=1 on SIGTERM, then exits 0 after the batch
//! in hand. Tested with a fake NOTIFY_SOCKET.

use std::os::unix::net::{UnixDatagram, UnixStream};
use std::process::Command;
use std::time::{Duration, Instant};

use testkit::next_datagram;

#[test]
fn ready_once_listening_then_stopping_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let socket = dir.path().join("rings/writer.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_storage-writer"))
        .arg("--ring-dir")
        .arg(dir.path().join("rings"))
        .arg("--socket")
        .arg(&socket)
        .arg("--data-dir")
        .arg(dir.path())
        .env("NOTIFY_SOCKET", &notify_path)
        .spawn()
        .unwrap();

    let ready = next_datagram(&notify);
    assert!(ready.lines().any(|line| line == "READY=1"), "{ready:?}");
    assert!(
        UnixStream::connect(&socket).is_ok(),
        "ready means listening"
    );

    testkit::signal(child.id(), "TERM");
    let mut stopping = false;
    for _ in 0..10 {
        if next_datagram(&notify)
            .lines()
            .any(|line| line == "STOPPING=1")
        {
            stopping = true;
            break;
        }
    }
    assert!(stopping, "STOPPING=1 on SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "clean exit: {status}");
            break;
        }
        assert!(Instant::now() < deadline, "exits after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}
