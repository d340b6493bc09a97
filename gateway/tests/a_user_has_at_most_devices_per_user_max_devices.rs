//! A user may have at most `devices_per_user_max` distinct devices connected
//! to a node: the next device is refused at the upgrade with 403 (a send
//! would otherwise fan out to any number of them), a device reconnecting
//! with its own id is not a new device, and a slot frees when a device leaves.

use testkit::gateway::{token, Gateway};

#[test]
fn the_next_device_is_refused_with_403_and_a_reconnect_is_not_a_new_device() {
    let gateway = Gateway::start(&["--devices-per-user-max", "3"]);
    let mut devices: Vec<_> = (0..3)
        .map(|index| gateway.connect("alice", &format!("device{index}")))
        .collect();
    assert_eq!(
        gateway.connect_with_token(&token("alice", "device3")).err(),
        Some(403),
        "a fourth device"
    );
    assert_eq!(
        gateway.metric(
            "gateway_handshakes_refused_total",
            &["reason=\"too_many_devices\""]
        ),
        1
    );
    // The same device again (a second tab of it, or a reconnect before the
    // old socket timed out) is still one device.
    let again = gateway.connect("alice", "device0");
    // Another user is not affected.
    let mut bob = gateway.connect("bob", "phone");
    bob.send_message("c1", "alice", "hi");
    bob.recv_type("sent");
    for device in &mut devices {
        assert_eq!(device.recv_type("message")["body"], "hi");
    }
    drop(again);
    // One leaves: its slot is free.
    devices.pop().unwrap().close();
    std::thread::sleep(std::time::Duration::from_millis(300));
    gateway.connect("alice", "device3");
}
