//! Heartbeats: a connection silent for `heartbeat_timeout_ms` is closed with
//! 4000; one that pings (JSON `ping` or a WebSocket ping) stays open.

use testkit::gateway as support;

use std::time::{Duration, Instant};

use support::Gateway;

const TIMEOUT_FLAGS: [&str; 4] = [
    "--heartbeat-interval-ms",
    "200",
    "--heartbeat-timeout-ms",
    "600",
];

#[test]
fn a_silent_client_is_closed_with_4000() {
    let gateway = Gateway::start(&TIMEOUT_FLAGS);
    let mut silent = gateway.connect("alice", "phone");
    let started = Instant::now();
    assert_eq!(silent.expect_close(5), Some(4000));
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "not before the timeout"
    );
    assert_eq!(
        gateway.metric("gateway_closes_total", &["code=\"4000\""]),
        1
    );
}

#[test]
fn a_client_that_pings_stays_open() {
    let gateway = Gateway::start(&TIMEOUT_FLAGS);
    let mut json_pinger = gateway.connect("alice", "phone");
    let mut ws_pinger = gateway.connect("bob", "phone");
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(150));
        json_pinger.ping();
        ws_pinger
            .socket
            .send(tungstenite::Message::Ping(b"hb".to_vec().into()))
            .unwrap();
        ws_pinger.socket.flush().unwrap();
    }
    // 1.5 s of traffic, 2.5x the timeout: both still served.
    json_pinger.ping();
    ws_pinger.ping();
    assert_eq!(
        gateway.metric("gateway_closes_total", &["code=\"4000\""]),
        0
    );
}
