//! The admin listener: /healthz, /readyz and Prometheus /metrics.

use testkit::gateway as support;

use support::Gateway;

#[test]
fn probes_and_metrics_answer() {
    let gateway = Gateway::start(&[]);
    assert_eq!(gateway.admin_get("/healthz").unwrap().0, 200);
    assert_eq!(gateway.admin_get("/readyz").unwrap().0, 200);
    assert_eq!(gateway.admin_get("/nope").unwrap().0, 404);

    let mut alice = gateway.connect("alice", "phone");
    alice.ping();
    let (status, body) = gateway.admin_get("/metrics").unwrap();
    assert_eq!(status, 200);
    for name in [
        "gateway_connections_max",
        "gateway_connections{shard=\"0\"}",
        "gateway_connections{shard=\"1\"}",
        "gateway_frames_in_total",
        "gateway_frames_out_total",
        "gateway_messages_routed_local_total",
        "gateway_messages_routed_cross_shard_total",
        "gateway_handoffs_sent_total",
        "gateway_cross_shard_queue_depth",
        "gateway_errors_total{shard=\"0\",code=\"overloaded\"}",
        "gateway_closes_total{shard=\"1\",code=\"1012\"}",
    ] {
        assert!(body.contains(name), "/metrics lacks {name}");
    }
    assert_eq!(gateway.metric("gateway_connections", &[]), 1);
    assert!(gateway.metric("gateway_frames_in_total", &[]) >= 1);
    assert!(
        gateway.metric("gateway_connections_max", &[]) > 1000,
        "derived from RLIMIT_NOFILE"
    );
}
