//! Under systemd (Type=notify) the gateway says READY=1 once every shard
//! listens, pings WATCHDOG=1 while its shards make progress, and says
//! STOPPING=1 when a drain starts. Tested with a fake NOTIFY_SOCKET.

use testkit::gateway as support;
use testkit::next_datagram;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn ready_then_watchdog_pings_then_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(support::WAIT)).unwrap();

    let ws = format!("127.0.0.1:{}", support::free_port());
    let admin = format!("127.0.0.1:{}", support::free_port());
    // systemd sets WATCHDOG_PID to the main process; `exec` keeps the shell's pid.
    let child = Command::new("sh")
        .args(["-c", "WATCHDOG_PID=$$ exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_gateway"))
        .args([
            "--listen",
            &ws,
            "--admin-listen",
            &admin,
            "--shards",
            "2",
            "--drain-window-ms",
            "200",
        ])
        .args(["--data-dir", dir.path().to_str().unwrap()])
        .env("GATEWAY_AUTH_SECRET", support::SECRET)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "400000")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = support::KillOnDrop(child);
    let child = &mut child.0;

    let first = next_datagram(&socket);
    assert!(
        first.lines().any(|line| line == "READY=1"),
        "first notification is READY=1: {first:?}"
    );
    // The admin listener answers by the time READY=1 is sent.
    let client = std::net::TcpStream::connect(&admin);
    assert!(client.is_ok(), "ready means listening");

    let deadline = Instant::now() + Duration::from_secs(5);
    let mut pings = 0;
    while pings < 3 {
        assert!(Instant::now() < deadline, "watchdog pings every 200 ms");
        if next_datagram(&socket)
            .lines()
            .any(|line| line == "WATCHDOG=1")
        {
            pings += 1;
        }
    }

    testkit::signal(child.id(), "TERM");
    let mut stopping = false;
    for _ in 0..20 {
        if next_datagram(&socket)
            .lines()
            .any(|line| line == "STOPPING=1")
        {
            stopping = true;
            break;
        }
    }
    assert!(stopping, "STOPPING=1 on drain");
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "drained node exits");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(child.wait().unwrap().success());
}
