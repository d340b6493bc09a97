//! The device-retention scenario with the real processes, shared by the
//! embedded store's test and the ScyllaDB live test: a device that left and
//! is not seen for the writer's `--device-retention-ms` loses its keys (and
//! its cursor and push target) from storage, so senders stop encrypting for
//! it; a device that stays connected is seen again every
//! `device_seen_interval_ms` and keeps them. Never used outside tests.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::gateway::{http_get, metric_in, writer_args, Client, Gateway};
use crate::WAIT;

/// The device retention, short enough for a test and several device-seen
/// intervals long.
const RETENTION_MS: u64 = 4_000;

fn devices_of(asker: &mut Client, user: &str) -> serde_json::Value {
    asker.send(json!({"type": "devices", "user": user}));
    asker.recv_type("devices")["devices"].clone()
}

/// A device that left loses its keys once past the retention (and a
/// cleanup pass); one connected all along outlives another whole retention;
/// the writer counts the expiry. `backend` are more gateway flags (another
/// storage backend).
pub fn a_device_gone_past_the_retention_loses_its_keys(backend: &[&str]) {
    let retention = RETENTION_MS.to_string();
    let writer_metrics = format!("127.0.0.1:{}", crate::free_port());
    let mut flags = writer_args(&[
        "--metrics-listen",
        &writer_metrics,
        "--device-retention-ms",
        &retention,
        "--cleanup-interval-s",
        "1",
    ]);
    // `devices` shares the key directory's allowance: bob polls.
    for flag in [
        "--device-seen-interval-ms",
        "1000",
        "--prekey-fetches-per-s",
        "100",
        "--prekey-fetches-burst",
        "100",
    ] {
        flags.push(flag.to_owned());
    }
    let mut flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    flags.extend_from_slice(backend);
    let gateway = Gateway::start(&flags);
    let mut phone = gateway.connect("alice", "phone");
    phone.upload_keys();
    let mut laptop = gateway.connect("alice", "laptop");
    laptop.upload_keys();
    let mut bob = gateway.connect("bob", "phone");
    assert_eq!(devices_of(&mut bob, "alice"), json!(["laptop", "phone"]));
    phone.close();

    // The phone left; past the retention (and a cleanup pass) it is gone.
    let deadline = Instant::now() + Duration::from_millis(RETENTION_MS) + WAIT;
    loop {
        let devices = devices_of(&mut bob, "alice");
        if devices == json!(["laptop"]) {
            break;
        }
        assert_eq!(devices, json!(["laptop", "phone"]), "only the phone goes");
        assert!(Instant::now() < deadline, "the phone's keys stayed");
        std::thread::sleep(Duration::from_millis(250));
    }
    // The laptop, connected all along, outlives another whole retention.
    std::thread::sleep(Duration::from_millis(RETENTION_MS + 1_500));
    assert_eq!(devices_of(&mut bob, "alice"), json!(["laptop"]));
    laptop.ping();
    let address = writer_metrics.parse().unwrap();
    let (status, body) = http_get(address, "/metrics").expect("the writer's metrics");
    assert_eq!(status, 200);
    let expired = metric_in(
        &body,
        "storage_writer_expired_total",
        &["table=\"devices\""],
    );
    assert!(expired >= 1, "{expired}");

    // The phone comes back: a new device to the directory, which uploads
    // its keys again.
    let mut phone = gateway.connect("alice", "phone");
    phone.upload_keys();
    assert_eq!(devices_of(&mut bob, "alice"), json!(["laptop", "phone"]));
}
