//! At its connection limit the node answers 503 instead of failing in accept,
//! and takes connections again once some close.

use testkit::gateway as support;

use std::time::{Duration, Instant};

use support::Gateway;

#[test]
fn connections_past_the_limit_get_503() {
    let gateway = Gateway::start(&["--connections-max", "2"]);
    let first = gateway.connect("alice", "phone");
    let _second = gateway.connect("bob", "phone");
    assert_eq!(
        gateway
            .connect_with_token(&support::token("carol", "phone"))
            .err(),
        Some(503)
    );
    assert_eq!(
        gateway.metric(
            "gateway_handshakes_refused_total",
            &["reason=\"at_capacity\""]
        ),
        1
    );

    first.close();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match gateway.connect_with_token(&support::token("carol", "phone")) {
            Ok(mut client) => {
                assert_eq!(client.recv()["user"], "carol");
                break;
            }
            Err(status) => {
                assert_eq!(status, 503);
                assert!(Instant::now() < deadline, "slot never freed");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}
