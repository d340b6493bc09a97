//! The ScyllaDB backend behind a real gateway and storage-writer. ScyllaDB
//! cannot be installed on our CI machines, so this test is `#[ignore]`d: run
//! it where `SCYLLA_URI` names a live node, with
//! `SCYLLA_URI=127.0.0.1:9042 cargo test -p gateway --test scylla_backend -- --ignored`.
//! It builds the writer with the `scylla` feature and checks what the
//! PostgreSQL test checks (`support::messages_survive_a_node_replacement`),
//! and the device expiry the embedded store's test checks
//! (`testkit::retention`).

use testkit::gateway as support;

use std::process::Command;

use support::repo;

/// Gateway flags for a storage-writer built with the `scylla` feature on a
/// keyspace of its own (named with `name`), at the live node `SCYLLA_URI`.
fn scylla_flags(name: &str) -> Vec<String> {
    let uri = std::env::var("SCYLLA_URI")
        .expect("SCYLLA_URI must name a live ScyllaDB node (host:port) for this test");
    let target = repo().join("target/scylla");
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "-p",
            "storage-writer",
            "--features",
            "scylla",
            "--target-dir",
        ])
        .arg(&target)
        .current_dir(repo())
        .status()
        .unwrap();
    assert!(status.success());
    let writer = target.join("debug/storage-writer");
    let keyspace = format!("chat_test_{name}_{}", std::process::id());
    vec![
        "--storage-writer-path".to_owned(),
        writer.display().to_string(),
        "--storage-writer-arg=--backend".into(),
        "--storage-writer-arg=scylla".into(),
        format!("--storage-writer-arg=--scylla-uri={uri}"),
        format!("--storage-writer-arg=--scylla-keyspace={keyspace}"),
        "--storage-writer-arg=--scylla-replication-factor=1".into(),
        "--storage-writer-arg=--scylla-consistency=one".into(),
    ]
}

#[test]
#[ignore = "needs a live ScyllaDB node (none installs on these machines): set SCYLLA_URI and pass --ignored"]
fn messages_live_in_scylla_across_a_gateway_kill() {
    let flags = scylla_flags("messages");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    support::messages_survive_a_node_replacement(&flags);
}

/// The device expiry through `devices_by_seen`'s time buckets (a second
/// wide at this retention), as `a_device_not_seen_for_the_retention_loses_its_keys`
/// checks it on the embedded store.
#[test]
#[ignore = "needs a live ScyllaDB node (none installs on these machines): set SCYLLA_URI and pass --ignored"]
fn devices_not_seen_expire_from_scylla() {
    let flags = scylla_flags("devices");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    testkit::retention::a_device_gone_past_the_retention_loses_its_keys(&flags);
}
