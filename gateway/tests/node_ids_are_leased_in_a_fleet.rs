//! In a fleet (a NATS URL is configured) each node leases its node id (part
//! of every message id) from NATS JetStream: nodes started together never
//! share one, a node that cannot renew its lease refuses sends until it can,
//! and a node killed with `kill -9` leaves its id to expire while a new
//! node gets another. Real gateways, a real nats-server with JetStream.

use std::time::{Duration, Instant};

use chat_protocol::snowflake;
use testkit::gateway::{Gateway, WAIT};
use testkit::nats::NatsServer;

fn fleet_flags(nats: &NatsServer, extra: &[&str]) -> Vec<String> {
    let mut flags = vec![
        "--nats-url".to_owned(),
        nats.url(),
        "--shards".into(),
        "1".into(),
    ];
    flags.extend(extra.iter().map(|flag| flag.to_string()));
    flags
}

fn start(flags: &[String]) -> Gateway {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    Gateway::start(&flags)
}

/// The node id a fresh message of this gateway carries.
fn node_id_of_a_message(gateway: &Gateway, user: &str) -> u16 {
    let mut client = gateway.connect(user, "phone");
    client.send_message("c1", "someone", "hello");
    let sent = client.recv_type("sent");
    let id: u64 = sent["message_id"].as_str().unwrap().parse().unwrap();
    snowflake::decode(id).node_id
}

fn wait_for_metric(gateway: &Gateway, name: &str, value: u64, within: Duration) {
    let deadline = Instant::now() + within;
    while gateway.metric(name, &[]) != value {
        assert!(
            Instant::now() < deadline,
            "{name} did not become {value} within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn nodes_started_together_never_share_an_id() {
    let nats = NatsServer::start();
    let flags = fleet_flags(&nats, &[]);
    let gateways: Vec<Gateway> = std::thread::scope(|scope| {
        let starting: Vec<_> = (0..4).map(|_| scope.spawn(|| start(&flags))).collect();
        starting.into_iter().map(|s| s.join().unwrap()).collect()
    });
    let mut ids: Vec<u16> = gateways
        .iter()
        .enumerate()
        .map(|(index, gateway)| {
            let leased = gateway.metric("gateway_node_id", &[]) as u16;
            assert!(leased <= snowflake::NODE_ID_MAX);
            assert_eq!(
                node_id_of_a_message(gateway, &format!("sender{index}")),
                leased,
                "message ids carry the leased id"
            );
            leased
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 4, "four live nodes, four ids: {ids:?}");
}

#[test]
fn a_node_that_cannot_renew_its_lease_refuses_sends_until_it_can() {
    let mut nats = NatsServer::start();
    let gateway = start(&fleet_flags(&nats, &["--node-id-lease-ttl-ms", "3000"]));
    let leased = gateway.metric("gateway_node_id", &[]);
    let mut alice = gateway.connect("alice", "phone");
    alice.send_message("before", "bob", "one");
    alice.recv_type("sent");

    nats.stop();
    // Valid for two thirds of the TTL after the last refresh (every second).
    wait_for_metric(&gateway, "gateway_node_id_valid", 0, Duration::from_secs(5));
    alice.send_message("during", "bob", "two");
    let refused = alice.recv_type("error");
    assert_eq!(refused["code"], "unavailable", "{refused}");
    assert_eq!(refused["id"], "during");
    assert!(
        refused["message"].as_str().unwrap().contains("lease"),
        "{refused}"
    );
    assert!(refused["retry_after_ms"].as_u64().is_some());

    nats.restart();
    wait_for_metric(&gateway, "gateway_node_id_valid", 1, WAIT);
    assert_eq!(
        gateway.metric("gateway_node_id", &[]),
        leased,
        "the same id"
    );
    alice.send_message("during", "bob", "two");
    let sent = alice.recv_type("sent");
    assert_eq!(
        sent["id"], "during",
        "the refused send is accepted on retry"
    );
}

#[test]
fn a_node_killed_with_kill_9_keeps_its_id_until_it_expires_and_a_new_node_gets_another() {
    let nats = NatsServer::start();
    let flags = fleet_flags(&nats, &["--node-id-lease-ttl-ms", "30000"]);
    let mut first = start(&flags);
    let first_id = first.metric("gateway_node_id", &[]);
    first.kill9();
    let second = start(&flags);
    let second_id = second.metric("gateway_node_id", &[]);
    assert_ne!(
        first_id, second_id,
        "the dead node's id is held until its lease expires"
    );
    assert_eq!(u64::from(node_id_of_a_message(&second, "carol")), second_id);
    assert_eq!(second.metric("gateway_node_id_valid", &[]), 1);
}
