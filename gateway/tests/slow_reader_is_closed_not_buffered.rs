//! A client that stops reading is closed with 4001 once its bounded send queue
//! fills; the node's memory does not grow and everyone else is still served.

use testkit::gateway as support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::{Gateway, WAIT};

#[test]
fn a_slow_reader_is_closed_with_4001_and_the_sender_is_unaffected() {
    let gateway = Gateway::start(&[
        "--send-queue-bytes-max",
        "131072",
        "--socket-send-buffer-bytes",
        "4096",
        "--close-grace-ms",
        "10000",
    ]);
    // The slow reader's socket has a small receive buffer, and it never reads.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&gateway.ws.into()).unwrap();
    let mut slow = gateway
        .upgrade("/ws", Some(&support::token("slow", "phone")), socket.into())
        .unwrap();
    assert_eq!(slow.recv()["type"], "hello");

    let mut sender = gateway.connect("sender", "phone");
    let body = "b".repeat(30 * 1024);
    let deadline = Instant::now() + WAIT;
    let mut sent = 0;
    // Bounded: at most 200 sends (6 MB) or 10 s, stopping once the node reports the close.
    while gateway.metric("gateway_closes_total", &["code=\"4001\""]) == 0 {
        assert!(
            sent < 200 && Instant::now() < deadline,
            "slow reader never closed after {sent} sends"
        );
        for _ in 0..5 {
            sender.send(
                json!({"type": "send", "id": format!("s{sent}"), "to": "slow", "body": body}),
            );
            assert_eq!(sender.recv()["type"], "sent");
            sent += 1;
        }
    }
    // The queue bound (128 KiB) plus kernel buffers is far less than what was sent.
    assert!(
        sent >= 4,
        "the close came from a full queue, after {sent} sends"
    );

    // The sender is served as before.
    sender.ping();
    // The slow reader, reading at last, finds what fit and then the 4001 close.
    slow.set_timeout(Duration::from_secs(5));
    assert_eq!(slow.expect_close(300), Some(4001));
}
