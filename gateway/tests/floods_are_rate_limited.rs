//! Rate limits: sends per user (across all of the user's devices) and text
//! frames per connection. Over a limit the client gets `rate_limited` with
//! `retry_after_ms` and the frame is not processed; a sustained flood closes
//! with 1008. Everyone else is unaffected.

use testkit::gateway as support;

use std::time::Duration;

use serde_json::json;
use support::Gateway;

fn send(id: &str) -> serde_json::Value {
    json!({"type": "send", "id": id, "to": "bob", "body": "x"})
}

#[test]
fn sends_past_the_user_limit_are_refused_with_retry_after_across_devices() {
    let gateway = Gateway::start(&["--sends-per-s", "2", "--sends-burst", "4"]);
    let mut phone = gateway.connect("alice", "phone");
    let mut laptop = gateway.connect("alice", "laptop");
    let mut bob = gateway.connect("bob", "phone");

    // The burst of 4 is shared: 2 from each device pass...
    for id in ["p1", "p2"] {
        phone.send(send(id));
        assert_eq!(phone.recv_type("sent")["id"], id);
    }
    for id in ["l1", "l2"] {
        laptop.send(send(id));
        assert_eq!(laptop.recv_type("sent")["id"], id);
    }
    // ...and the fifth, from either device, is refused, not delivered.
    phone.send(send("p3"));
    let refused = phone.recv_type("error");
    assert_eq!(
        (refused["code"].as_str(), refused["id"].as_str()),
        (Some("rate_limited"), Some("p3"))
    );
    let retry_after_ms = refused["retry_after_ms"].as_u64().expect("retry_after_ms");
    assert!(
        (1..=500).contains(&retry_after_ms),
        "at 2/s the next send is due within 500 ms: {retry_after_ms}"
    );
    for _ in 0..4 {
        assert_eq!(bob.recv()["type"], "message");
    }
    bob.expect_silence(Duration::from_millis(200));

    // After the advertised wait, the same id goes through (it was not remembered).
    std::thread::sleep(Duration::from_millis(retry_after_ms + 20));
    phone.send(send("p3"));
    assert_eq!(phone.recv_type("sent")["id"], "p3");
    assert_eq!(bob.recv()["body"], "x");
    assert!(gateway.metric("gateway_errors_total", &["code=\"rate_limited\""]) >= 1);
}

#[test]
fn a_frame_flood_is_refused_then_closed_with_1008_and_others_are_served() {
    let gateway = Gateway::start(&[
        "--frames-per-s",
        "5",
        "--frames-burst",
        "5",
        "--protocol-errors-max",
        "3",
    ]);
    let mut flooder = gateway.connect("mallory", "phone");
    let mut bystander = gateway.connect("alice", "phone");
    for _ in 0..20 {
        flooder.send(json!({"type": "ping"}));
    }
    for _ in 0..5 {
        assert_eq!(flooder.recv()["type"], "pong");
    }
    for _ in 0..3 {
        let refused = flooder.recv();
        assert_eq!(refused["code"], "rate_limited");
        assert!(refused["retry_after_ms"].as_u64().unwrap() >= 1);
    }
    assert_eq!(flooder.expect_close(20), Some(1008));
    bystander.ping();
}
