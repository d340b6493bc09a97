//! Graceful drain: SIGTERM stops accepting, closes every connection with 1012
//! within the drain window, and the process exits 0 once they are gone.

use testkit::gateway as support;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::Gateway;

#[test]
fn sigterm_closes_everyone_with_1012_and_exits() {
    let mut gateway = Gateway::start(&["--drain-window-ms", "1500"]);
    let mut clients: Vec<_> = (0..6)
        .map(|index| gateway.connect(&format!("user{index}"), "phone"))
        .collect();

    let started = Instant::now();
    gateway.signal("TERM");
    // Not ready any more: load balancers stop sending new clients.
    let deadline = Instant::now() + Duration::from_secs(5);
    while gateway.admin_get("/readyz").map(|(status, _)| status) != Some(503) {
        assert!(Instant::now() < deadline, "readyz never turned 503");
        std::thread::sleep(Duration::from_millis(10));
    }
    // New connections are refused (listener closed, or 503 if one raced in).
    std::thread::sleep(Duration::from_millis(100));
    if let Ok(stream) = TcpStream::connect(gateway.ws) {
        let refused = gateway.upgrade("/ws", Some(&support::token("late", "phone")), stream);
        assert!(
            refused.is_err(),
            "a draining node accepts no new connection"
        );
    }

    for client in clients.iter_mut() {
        assert_eq!(client.expect_close(5), Some(1012));
    }
    let status = gateway.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "drained node exits 0, got {status}");
    assert!(started.elapsed() < Duration::from_secs(6));
}

#[test]
fn closes_are_spread_over_the_window() {
    let mut gateway = Gateway::start(&["--drain-window-ms", "2000"]);
    let mut clients: Vec<_> = (0..8)
        .map(|index| gateway.connect(&format!("spread{index}"), "phone"))
        .collect();
    let started = Instant::now();
    gateway.signal("TERM");
    // Each client's close arrives at its own time; record when.
    let handles: Vec<_> = clients
        .drain(..)
        .map(|mut client| {
            std::thread::spawn(move || {
                assert_eq!(client.expect_close(5), Some(1012));
                started.elapsed()
            })
        })
        .collect();
    let mut times: Vec<Duration> = handles
        .into_iter()
        .map(|handle| handle.join().unwrap())
        .collect();
    times.sort();
    assert!(times.last().unwrap() < &Duration::from_millis(4000));
    assert!(
        *times.last().unwrap() - times[0] >= Duration::from_millis(200),
        "8 closes at random moments in a 2 s window are not simultaneous: {times:?}"
    );
    assert!(gateway.wait_exit(Duration::from_secs(10)).success());
}

#[test]
fn a_second_signal_exits_at_once() {
    let mut gateway = Gateway::start(&["--drain-window-ms", "60000"]);
    let _client = gateway.connect("alice", "phone");
    gateway.signal("TERM");
    std::thread::sleep(Duration::from_millis(200));
    assert!(gateway.is_running(), "still draining");
    gateway.signal("INT");
    let status = gateway.wait_exit(Duration::from_secs(5));
    assert!(!status.success());
}
