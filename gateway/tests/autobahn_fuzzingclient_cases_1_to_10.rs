//! RFC 6455 conformance: the Autobahn|Testsuite fuzzing client (cases 1 to
//! 10: framing, pings and pongs, reserved bits, opcodes, fragmentation,
//! UTF-8, close handling, limits) against the gateway's test-only echo
//! endpoint (`--echo-endpoint true`, off by default), which shares the chat
//! endpoint's framing code. Every case must be OK, NON-STRICT or
//! INFORMATIONAL. The suite is Python 2 code: `scripts/test` makes its
//! virtualenv in `target/tools/autobahn` (pyenv's Python 2.7 and the pins in
//! `tests/autobahn/requirements-py2.txt`). The summary of a run is checked in
//! at `docs/conformance/autobahn.md`.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use testkit::gateway::Gateway;

/// Bounds the whole run (about a minute with a debug build here).
const RUN_LIMIT: Duration = Duration::from_secs(900);

#[test]
fn every_case_1_to_10_is_ok_non_strict_or_informational() {
    let wstest = testkit::repo().join("target/tools/autobahn/bin/wstest");
    assert!(
        wstest.exists(),
        "{} is missing: scripts/test makes it (pyenv's Python 2.7 + tests/autobahn/requirements-py2.txt)",
        wstest.display()
    );
    // Case 9 sends messages of up to 16 MiB, echoed whole.
    let gateway = Gateway::start(&[
        "--echo-endpoint",
        "true",
        "--message-bytes-max",
        "16777216",
        "--send-queue-bytes-max",
        "33554432",
    ]);
    let dir = tempfile::tempdir().unwrap();
    let reports = dir.path().join("reports");
    let spec = dir.path().join("spec.json");
    let cases: Vec<String> = (1..=10).map(|case| format!("{case}.*")).collect();
    std::fs::write(
        &spec,
        serde_json::json!({
            "outdir": reports,
            "servers": [{"agent": "chat-gateway", "url": format!("ws://{}/echo", gateway.ws)}],
            "cases": cases,
            "exclude-cases": [],
            "exclude-agent-cases": {},
        })
        .to_string(),
    )
    .unwrap();
    let mut child = Command::new(&wstest)
        .args(["-m", "fuzzingclient", "-s"])
        .arg(&spec)
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("wstest runs");
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > RUN_LIMIT {
            let _ = child.kill();
            panic!("wstest did not finish within {RUN_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(status.success(), "wstest failed: {status}");

    let index: Value =
        serde_json::from_str(&std::fs::read_to_string(reports.join("index.json")).unwrap())
            .unwrap();
    let results = index["chat-gateway"]
        .as_object()
        .expect("results for our agent");
    assert!(results.len() >= 300, "ran {} cases", results.len());
    let mut tally: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut failed = Vec::new();
    for (case, result) in results {
        let behavior = result["behavior"].as_str().unwrap_or("?").to_owned();
        let close = result["behaviorClose"].as_str().unwrap_or("?").to_owned();
        let passes = matches!(behavior.as_str(), "OK" | "NON-STRICT" | "INFORMATIONAL")
            && matches!(close.as_str(), "OK" | "INFORMATIONAL");
        if !passes {
            failed.push(format!("{case}: {behavior} / {close}"));
        }
        *tally.entry((behavior, close)).or_default() += 1;
    }
    eprintln!("autobahn cases 1-10: {tally:?}");
    assert!(failed.is_empty(), "cases that failed: {failed:#?}");
    // The node is still healthy after all of it.
    assert_eq!(
        gateway.admin_get("/healthz").map(|(status, _)| status),
        Some(200)
    );
}

#[test]
fn the_echo_endpoint_is_off_by_default() {
    let gateway = Gateway::start(&[]);
    let stream = std::net::TcpStream::connect(gateway.ws).unwrap();
    let refused = testkit::gateway::upgrade_at(gateway.ws, "/echo", None, stream).err();
    assert_eq!(refused, Some(404), "no echo endpoint unless asked for");
}
