//! Every io mode serves the same protocol: the epoll fallback (kernels without
//! io_uring), and io_uring with each task-run mode (`coop`, the default, is what
//! every other test runs): handshake, hand-off to the home shard, delivery, errors.

use testkit::gateway as support;

use serde_json::json;
use support::{users_on_different_shards, Gateway};

#[test]
fn delivery_across_shards_works_on_the_epoll_driver() {
    delivery_across_shards_works(&["--io-driver", "epoll"]);
}

#[test]
fn delivery_across_shards_works_on_io_uring_with_kernel_task_run() {
    delivery_across_shards_works(&["--io-driver", "io-uring", "--io-uring-task-run", "kernel"]);
}

#[test]
fn delivery_across_shards_works_on_io_uring_with_deferred_task_run() {
    delivery_across_shards_works(&["--io-driver", "io-uring", "--io-uring-task-run", "defer"]);
}

fn delivery_across_shards_works(flags: &[&str]) {
    let gateway = Gateway::start(flags);
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
