//! The ScyllaDB backend behind a real gateway and storage-writer. ScyllaDB
//! cannot be installed on our CI machines, so this test is `#[ignore]`d: run
//! it where `SCYLLA_URI` names a live node, with
//! `SCYLLA_URI=127.0.0.1:9042 cargo test -p gateway --test scylla_backend -- --ignored`.
//! It builds the writer with the `scylla` feature and checks what the
//! PostgreSQL test checks (`support::messages_survive_a_node_replacement`).

use testkit::gateway as support;

use std::process::Command;

use support::repo;

#[test]
#[ignore = "needs a live ScyllaDB node (none installs on these machines): set SCYLLA_URI and pass --ignored"]
fn messages_live_in_scylla_across_a_gateway_kill() {
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
    let keyspace = format!("chat_test_{}", std::process::id());
    let flags = [
        "--storage-writer-path".to_owned(),
        writer.display().to_string(),
        "--storage-writer-arg=--backend".into(),
        "--storage-writer-arg=scylla".into(),
        format!("--storage-writer-arg=--scylla-uri={uri}"),
        format!("--storage-writer-arg=--scylla-keyspace={keyspace}"),
        "--storage-writer-arg=--scylla-replication-factor=1".into(),
        "--storage-writer-arg=--scylla-consistency=one".into(),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    support::messages_survive_a_node_replacement(&flags);
}
