//! Each bench scenario, run briefly against a real gateway that bench starts
//! itself, produces reports whose numbers add up. No assertion is about speed.
//! Needs the gateway binary built (`cargo test --workspace` builds it).

use std::path::PathBuf;
use std::process::Command;

const SECRET: &str = "bench-test-secret-0123456789abcdef0123";

/// target/debug/gateway, next to this test's own directory (target/debug/deps).
fn gateway_binary() -> PathBuf {
    let deps = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let binary = deps.parent().unwrap().join("gateway");
    assert!(
        binary.exists(),
        "{} missing: run `cargo test --workspace` (it builds the gateway)",
        binary.display()
    );
    binary
}

/// Runs bench with a gateway it starts itself (2 shards); returns stdout.
fn bench(args: &[&str]) -> String {
    let gateway = gateway_binary();
    let spawn = [
        "--spawn-gateway",
        gateway.to_str().unwrap(),
        "--gateway-arg=--shards",
        "--gateway-arg=2",
    ];
    bench_as_is(&[args, &spawn[..]].concat())
}

/// Runs bench with exactly `args`; returns stdout, or fails with its output.
fn bench_as_is(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(args)
        .env("GATEWAY_AUTH_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "bench failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The JSON report a scenario wrote to `path`.
fn report_at(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn connect_holds_every_connection_and_reports_memory() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("connect.json");
    let table = bench(&[
        "connect",
        "--connections",
        "60",
        "--rate",
        "600",
        "--hold-s",
        "1",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(
        table.contains("60 of 60 connections held, 0 errors"),
        "{table}"
    );
    let report = report_at(&json);
    assert_eq!(report["connections_held"], 60);
    assert_eq!(report["errors"], 0);
    assert!(report["gateway_after"]["rss_bytes"].as_u64().unwrap() > 0);
    assert!(report["user_space_bytes_per_connection"].is_number());
}

#[test]
fn connect_spreads_over_worker_and_gateway_processes_and_sums_them() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("connect-multi.json");
    bench(&[
        "connect",
        "--connections",
        "301",
        "--rate",
        "1500",
        "--hold-s",
        "1",
        "--processes",
        "3",
        "--gateway-processes",
        "2",
        "--json",
        json.to_str().unwrap(),
    ]);
    let report = report_at(&json);
    assert_eq!(
        report["connections_held"], 301,
        "the workers' shares add up: {report}"
    );
    assert_eq!(report["errors"], 0);
    assert_eq!(report["gateway_processes"], 2);
    assert_eq!(report["load_generator_processes"], 3);
    assert!(report["user_space_bytes_per_connection"].is_number());
}

#[test]
fn one_to_one_counts_add_up_and_files_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("o2o.json");
    let prefix = dir.path().join("o2o");
    let svg = dir.path().join("o2o.svg");
    let table = bench(&[
        "one-to-one",
        "--users",
        "20",
        "--rate",
        "200",
        "--duration-s",
        "2",
        "--warmup-s",
        "1",
        "--json",
        json.to_str().unwrap(),
        "--hgrm-prefix",
        prefix.to_str().unwrap(),
        "--svg",
        svg.to_str().unwrap(),
    ]);
    assert!(
        table.contains("delivery") && table.contains("p99"),
        "{table}"
    );
    let report = report_at(&json);
    let number = |path: &[&str]| {
        path.iter()
            .fold(&report, |value, key| &value[*key])
            .as_u64()
            .unwrap_or_else(|| panic!("{path:?} in {report}"))
    };
    // 200/s for 3 s: every send is delivered to its one recipient device and acknowledged once.
    assert_eq!(number(&["sent"]), 600);
    assert_eq!(number(&["delivered_total"]), 600);
    assert_eq!(number(&["acked_total"]), 600);
    // Only sends intended inside the 2 s measured window are in the histograms.
    for latency in ["delivery", "ack", "ack_from_write"] {
        let count = number(&[latency, "count"]);
        assert!((399..=401).contains(&count), "{latency} count {count}");
        let (p50, p99, max) = (
            number(&[latency, "p50_us"]),
            number(&[latency, "p99_us"]),
            number(&[latency, "max_us"]),
        );
        assert!(
            p50 >= 1 && p50 <= p99 && p99 <= max,
            "{latency}: {p50} {p99} {max}"
        );
    }
    // Each send is written at or after its intended time, so measured from
    // the write no `sent` takes longer, at any percentile.
    for percentile in ["p50_us", "p99_us", "max_us"] {
        let (from_write, from_intended) = (
            number(&["ack_from_write", percentile]),
            number(&["ack", percentile]),
        );
        assert!(
            from_write <= from_intended,
            "{percentile}: {from_write} from the write, {from_intended} from the intended time"
        );
    }
    assert!(report["errors"].as_object().unwrap().is_empty(), "{report}");
    assert!(report["server_cpu_s"].as_f64().unwrap() >= 0.0);
    assert!(report["environment"]["kernel"]
        .as_str()
        .is_some_and(|k| !k.is_empty()));
    let hgrm = std::fs::read_to_string(format!("{}-delivery.hgrm", prefix.display())).unwrap();
    assert!(hgrm.contains("Total count"), "{hgrm}");
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert_eq!(plot.matches("<polyline").count(), 2);
}

#[test]
fn compare_runs_the_gateway_and_nats_server_with_the_same_schedule() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("compare.json");
    let table = bench(&[
        "one-to-one",
        "--compare",
        "--users",
        "20",
        "--rate",
        "100",
        "--duration-s",
        "2",
        "--warmup-s",
        "1",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(
        table.contains("compare (gateway relative to nats-server"),
        "{table}"
    );
    let report = report_at(&json);
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(
        (runs[0]["peer"].as_str(), runs[1]["peer"].as_str()),
        (Some("gateway"), Some("nats-ws"))
    );
    for run in runs {
        assert_eq!(run["sent"], 300, "{run}");
        assert_eq!(
            run["delivered_total"], 300,
            "every message reached its subscriber: {run}"
        );
    }
    assert_eq!(runs[0]["acked_total"], 300);
    assert_eq!(
        runs[1]["acked_total"], 0,
        "NATS core has no acknowledgement"
    );
    assert!(
        report["ratios"]["delivered_per_server_cpu_s_gateway_over_nats"].is_number()
            || report["ratios"]["delivered_per_server_cpu_s_gateway_over_nats"].is_null()
    );
    assert!(report["ratios"]["p50_nats_over_gateway"].as_f64().unwrap() > 0.0);
}

#[test]
fn reconnect_storm_brings_every_client_back() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("storm.json");
    let table = bench(&[
        "reconnect-storm",
        "--connections",
        "200",
        "--threads",
        "4",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(table.contains("200 of 200 clients back"), "{table}");
    let report = report_at(&json);
    assert_eq!(report["reconnected"], 200);
    assert!(report["errors"].as_object().unwrap().is_empty(), "{report}");
    assert_eq!(report["reconnect_latency"]["count"], 200);
    assert!(report["reconnects_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn one_to_one_spread_over_worker_processes_merges_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("o2o-multi.json");
    bench(&[
        "one-to-one",
        "--users",
        "30",
        "--rate",
        "150",
        "--duration-s",
        "2",
        "--warmup-s",
        "1",
        "--processes",
        "3",
        "--json",
        json.to_str().unwrap(),
    ]);
    let report = report_at(&json);
    assert_eq!(
        report["connections_held"], 30,
        "each worker connected its share"
    );
    // 3 workers x 50/s x 3 s: every send delivered to its one device and acknowledged once.
    assert_eq!(report["sent"], 450, "{report}");
    assert_eq!(report["delivered_total"], 450, "{report}");
    assert_eq!(report["acked_total"], 450, "{report}");
    for latency in ["delivery", "ack", "ack_from_write"] {
        let count = report[latency]["count"].as_u64().unwrap();
        assert!(
            (298..=302).contains(&count),
            "{latency}: sends intended in the 2 s window, merged: {count}"
        );
    }
}

#[test]
fn one_to_one_across_gateway_processes_joined_by_the_backplane_delivers_everything() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("o2o-backplane.json");
    bench(&[
        "one-to-one",
        "--gateway-processes",
        "2",
        "--backplane",
        "--users",
        "40",
        "--rate",
        "200",
        "--duration-s",
        "2",
        "--warmup-s",
        "1",
        "--json",
        json.to_str().unwrap(),
    ]);
    let report = report_at(&json);
    // The kernel spreads the 40 users over both processes, so about half the
    // pairs cross them: every message still arrives, once, and is acknowledged.
    assert_eq!(report["sent"], 600);
    assert_eq!(report["delivered_total"], 600, "{report}");
    assert_eq!(report["acked_total"], 600);
    assert!(report["errors"].as_object().unwrap().is_empty(), "{report}");
}

#[test]
fn writer_commits_every_record_and_reports_batches() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("writer.json");
    let writer = gateway_binary().parent().unwrap().join("storage-writer");
    let store = dir.path().join("w");
    bench_as_is(&[
        "writer",
        "--records",
        "2000",
        "--acks",
        "--rate",
        "2000",
        "--writer",
        writer.to_str().unwrap(),
        "--dir",
        store.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    let report = report_at(&json);
    assert_eq!(report["records"], 4000, "messages and their acks");
    assert_eq!(report["append_to_durable"]["count"], 4000);
    let statistics = report["writer_statistics"].as_str().unwrap();
    assert!(statistics.contains("records=4000"), "{statistics}");
}

#[test]
fn group_reaches_every_online_member_and_offline_members_sync_it() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("group.json");
    let svg = dir.path().join("group.svg");
    let prefix = dir.path().join("group");
    let table = bench(&[
        "group",
        "--groups",
        "2",
        "--size",
        "20",
        "--rate",
        "20",
        "--duration-s",
        "1",
        "--warmup-s",
        "1",
        "--offline-fraction",
        "0.25",
        "--json",
        json.to_str().unwrap(),
        "--svg",
        svg.to_str().unwrap(),
        "--hgrm-prefix",
        prefix.to_str().unwrap(),
    ]);
    assert!(table.contains("15 online, 5 offline"), "{table}");
    let report = report_at(&json);
    let sent = report["sent"].as_u64().unwrap();
    assert!(sent > 0);
    assert_eq!(report["acknowledged"], sent);
    // Every online member but the sender got every message; none were doubled.
    assert_eq!(report["delivered"], sent * 14);
    assert_eq!(report["expected_deliveries"], sent * 14);
    assert_eq!(report["offline_messages_missing"], 0);
    assert_eq!(
        report["offline_sync_us"]["count"], 10,
        "2 groups x 5 offline"
    );
    // The measured window holds only its own sends; fan-out is never faster
    // than the first delivery it completes.
    let fanout = &report["fanout_complete_us"];
    assert!(fanout["count"].as_u64().unwrap() <= sent);
    assert!(
        fanout["p50_us"].as_u64().unwrap() >= report["delivery_us"]["p50_us"].as_u64().unwrap()
    );
    assert!(report["errors"].as_object().unwrap().is_empty(), "{report}");
    for suffix in ["delivery", "fanout", "ack"] {
        let hgrm = std::fs::read_to_string(format!("{}-{suffix}.hgrm", prefix.display())).unwrap();
        assert!(hgrm.contains("Percentile"), "{suffix}: {hgrm}");
    }
    assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));
}

#[test]
fn offline_sync_drains_every_backlog_complete_and_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("offline.json");
    let table = bench(&[
        "offline-sync",
        "--users",
        "20",
        "--messages",
        "10",
        "--send-rate",
        "400",
        "--threads",
        "2",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(!table.is_empty());
    let report = report_at(&json);
    assert_eq!(report["sent"], 200);
    assert_eq!(report["acknowledged"], 200);
    assert_eq!(report["check"]["messages"], 200);
    for field in ["missing", "duplicates", "out_of_order"] {
        assert_eq!(report["check"][field], 0, "{field}: {report}");
    }
    assert_eq!(report["connect_to_synced"]["count"], 20);
}

#[test]
fn cross_node_measures_both_paths_in_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("cross.json");
    let gateway = gateway_binary();
    bench_as_is(&[
        "cross-node",
        "--gateway",
        gateway.to_str().unwrap(),
        "--pairs",
        "5",
        "--rate",
        "100",
        "--duration-s",
        "1",
        "--warmup-s",
        "1",
        "--json",
        json.to_str().unwrap(),
    ]);
    let report = report_at(&json);
    let sent = report["sent"].as_u64().unwrap();
    let same = report["same_node"]["count"].as_u64().unwrap();
    let cross = report["cross_node"]["count"].as_u64().unwrap();
    // Alternating groups: both measured, none more than was sent.
    assert!(same > 0 && cross > 0, "{report}");
    assert!(same + cross <= sent, "{report}");
    assert!(
        report["cross_node"]["max_us"].as_u64().unwrap()
            >= report["cross_node"]["p50_us"].as_u64().unwrap()
    );
}

#[test]
fn fleet_simulates_the_real_routing_and_its_figures_add_up() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("fleet.json");
    let fleet = |extra: &[&str]| {
        let mut args = vec![
            "fleet",
            "--nodes",
            "50",
            "--users",
            "100000",
            "--messages",
            "100000",
            "--rate",
            "100000",
            "--json",
        ];
        args.push(json.to_str().unwrap());
        args.extend(extra);
        bench_as_is(&args)
    };
    let table = fleet(&[]);
    assert!(table.contains("users per node"), "{table}");
    let report = report_at(&json);
    let users = &report["users_per_node"];
    assert_eq!(users["mean"], 2000.0);
    let (max, min) = (
        users["max"].as_u64().unwrap(),
        users["min"].as_u64().unwrap(),
    );
    assert!(min <= 2000 && (2000..2400).contains(&max), "{users}");
    // One node of 50 holds about 2%: Maglev moves a few times that at most.
    for moved in ["one_leaves", "one_joins"] {
        let share = report["moved_share"][moved].as_f64().unwrap();
        assert!(share > 0.01 && share < 0.2, "{moved}: {share}");
    }
    assert_eq!(report["nats_subscriptions"]["per_node_routing"], 200);
    assert_eq!(report["nats_subscriptions"]["per_user_routing"], 100000);
    // Devices on a random node: 49 in 50 are away from home, so a message
    // is a publish to the home and, nearly always, a forward.
    assert_eq!(report["away_share"], 0.98);
    let publishes = report["publishes_per_message"].as_f64().unwrap();
    assert!((1.9..1.98).contains(&publishes), "{publishes}");
    let exceptions = &report["exceptions_per_home"];
    let mean = exceptions["mean"].as_f64().unwrap();
    assert!((1900.0..2000.0).contains(&mean), "{exceptions}");
    let per_subject = &report["per_node_subject_msgs_per_s"];
    let subject_mean = per_subject["mean"].as_f64().unwrap();
    assert!(
        (subject_mean - publishes * 2000.0).abs() < 1.0,
        "{per_subject}"
    );
    assert!(per_subject["max"].as_f64().unwrap() >= subject_mean);
    assert_eq!(report["heartbeats_per_node_per_s"], 49.0);

    // Every client at home: one publish per message, unless the sender is
    // on the recipient's home (1 in 50), and no exceptions.
    fleet(&["--away-share", "0"]);
    let report = report_at(&json);
    assert_eq!(report["exceptions_per_home"]["max"], 0);
    let publishes = report["publishes_per_message"].as_f64().unwrap();
    assert!((0.97..0.99).contains(&publishes), "{publishes}");
}

#[test]
fn push_pushes_every_offline_recipient_once_then_holds_one_pending_each() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("push.json");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../clients/js/node_modules/web-push-testing/src/bin/server.js");
    bench(&[
        "push",
        "--users",
        "20",
        "--rate",
        "40",
        "--senders",
        "2",
        "--service-script",
        script.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    let report = report_at(&json);
    assert_eq!(report["sent"], 20, "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    assert_eq!(report["pending"], 20, "{report}");
    assert!(
        report["latency_p99_ms_at_most"].as_f64().unwrap()
            >= report["latency_p50_ms_at_most"].as_f64().unwrap()
    );
}
