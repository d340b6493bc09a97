//! `dashboards/chat-gateway.json` (a Grafana dashboard) queries only metric
//! families a real node exports (the gateway on its admin `/metrics`, its
//! storage-writer on `--metrics-listen`), and charts every one of them, so a
//! metric added without a panel (or a panel left behind by a renamed metric)
//! fails here. The alert rules (`dashboards/alerts.yml`) pass `promtool
//! check rules` and name only exported families. The gateway runs in a fleet
//! (real nats-server) so the backplane's families are exported too, and its
//! writer has Web Push configured so the push families are.

use std::collections::BTreeSet;

use serde_json::Value;
use testkit::gateway::{repo, Gateway};
use testkit::nats::NatsServer;

/// Every `expr` of every panel's targets.
fn expressions(dashboard: &Value) -> Vec<String> {
    let mut found = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        assert!(
            panel["title"].as_str().is_some_and(|t| !t.is_empty()),
            "{panel}"
        );
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "{}",
            panel["title"]
        );
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{} has no query", panel["title"]);
        for target in targets {
            found.push(target["expr"].as_str().expect("expr").to_owned());
        }
    }
    found
}

/// The metric family an identifier in an expression belongs to.
fn family(identifier: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|suffix| identifier.strip_suffix(suffix))
        .unwrap_or(identifier)
}

/// The families a Prometheus text answer declares (`# TYPE` lines).
fn declared(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .map(|rest| rest.split(' ').next().unwrap().to_owned())
        .collect()
}

/// The metric families a real node (in a fleet, its writer with Web Push
/// configured) exports: the gateway's and its storage-writer's.
fn exported_families() -> BTreeSet<String> {
    let nats = NatsServer::start();
    let vapid = testkit::webpush::VapidKey::generate();
    let writer_metrics: std::net::SocketAddr = format!("127.0.0.1:{}", testkit::free_port())
        .parse()
        .unwrap();
    let mut flags = vec!["--nats-url".to_owned(), nats.url()];
    flags.extend(testkit::gateway::writer_args(&[
        "--metrics-listen",
        &writer_metrics.to_string(),
        "--push-vapid-key",
        &vapid.path.display().to_string(),
    ]));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let gateway = Gateway::start(&flags);
    let (status, metrics) = gateway.admin_get("/metrics").expect("metrics answer");
    assert_eq!(status, 200);
    let mut exported = declared(&metrics);
    assert!(exported.len() > 40, "{exported:?}");
    // The gateway is ready once its writer answers, so its endpoint is up.
    let (status, writer) =
        testkit::gateway::http_get(writer_metrics, "/metrics").expect("writer metrics answer");
    assert_eq!(status, 200);
    let writer = declared(&writer);
    assert!(
        writer.contains("storage_writer_batch_commit_seconds")
            && writer.contains("storage_writer_push_latency_seconds"),
        "{writer:?}"
    );
    exported.extend(writer);
    exported
}

/// The node's families (`gateway_`, `storage_writer_`) an expression names.
fn families_in(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| word.starts_with("gateway_") || word.starts_with("storage_writer_"))
        .map(|word| family(word).to_owned())
        .collect()
}

#[test]
fn the_alert_rules_pass_promtool_and_name_only_exported_families() {
    let path = repo().join("dashboards/alerts.yml");
    let check = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&path)
        .output()
        .expect("promtool is installed (scripts/test installs Debian's prometheus)");
    assert!(
        check.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let text = std::fs::read_to_string(&path).unwrap();
    let named: BTreeSet<String> = text
        .lines()
        .filter_map(|line| line.trim().strip_prefix("expr:"))
        .flat_map(families_in)
        .collect();
    assert!(named.len() >= 8, "{named:?}");
    let exported = exported_families();
    let unknown: Vec<_> = named.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "alerts on families no node exports: {unknown:?}"
    );
}

#[test]
fn every_panel_queries_an_exported_family_and_every_family_has_a_panel() {
    let text = std::fs::read_to_string(repo().join("dashboards/chat-gateway.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert_eq!(dashboard["uid"], "chat-gateway");

    let charted: BTreeSet<String> = expressions(&dashboard)
        .iter()
        .flat_map(|expr| families_in(expr))
        .collect();
    let exported = exported_families();
    let unknown: Vec<_> = charted.difference(&exported).collect();
    assert!(unknown.is_empty(), "charted but not exported: {unknown:?}");
    let uncharted: Vec<_> = exported.difference(&charted).collect();
    assert!(
        uncharted.is_empty(),
        "exported but on no panel: {uncharted:?}"
    );
}
