//! The epoll fallback (for kernels without io_uring) serves the same protocol:
//! handshake, hand-off to the home shard, delivery, close codes.

mod support;

use serde_json::json;
use support::{users_on_different_shards, Gateway};

#[test]
fn delivery_across_shards_works_on_the_epoll_driver() {
    let gateway = Gateway::start(&["--io-driver", "epoll"]);
    let (user_a, user_b) = users_on_different_shards("e");
    let mut a_devices: Vec<_> = (0..4)
        .map(|d| gateway.connect(&user_a, &format!("d{d}")))
        .collect();
    let mut b_devices: Vec<_> = (0..4)
        .map(|d| gateway.connect(&user_b, &format!("d{d}")))
        .collect();
    assert_eq!(gateway.metric("gateway_connections", &["shard=\"0\""]), 4);
    assert_eq!(gateway.metric("gateway_connections", &["shard=\"1\""]), 4);

    for index in 0..20 {
        a_devices[0].send(json!({"type": "send", "id": format!("m{index}"), "to": user_b, "body": index.to_string()}));
        assert_eq!(a_devices[0].recv()["type"], "sent");
    }
    for device in b_devices.iter_mut().chain(a_devices[1..].iter_mut()) {
        for index in 0..20 {
            assert_eq!(device.recv()["body"], index.to_string());
        }
    }
    b_devices[0].send_text("{oops");
    assert_eq!(b_devices[0].recv()["code"], "malformed_json");
    b_devices[0].ping();
}
