//! The HAProxy example of docs/operations.md (`docs/examples/haproxy.cfg`),
//! run as shipped in front of a two-node fleet: it spreads WebSocket clients
//! over the nodes, messages cross, and when a node drains (SIGTERM) its
//! clients come back through the proxy to the other node and miss nothing.

use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use testkit::fleet::{await_sent, bodies, receive, Fleet};
use testkit::gateway::{connect_at, Client, Gateway, Next};
use testkit::{free_port, repo, KillOnDrop};

fn haproxy(listen: SocketAddr, nodes: &[&Gateway]) -> KillOnDrop {
    let mut command = Command::new("haproxy");
    command
        .arg("-f")
        .arg(repo().join("docs/examples/haproxy.cfg"))
        // Foreground, no daemon; quiet unless something is wrong.
        .args(["-db", "-q"])
        .env("CHAT_LISTEN", listen.to_string())
        // This machine allows 20,000 open files per process.
        .env("CHAT_MAXCONN", "4000")
        .stdout(Stdio::null());
    for (index, node) in nodes.iter().enumerate() {
        command
            .env(format!("NODE{index}"), node.ws.to_string())
            .env(
                format!("NODE{index}_ADMIN_PORT"),
                node.admin.port().to_string(),
            );
    }
    let child = command
        .spawn()
        .expect("haproxy is installed (scripts/test installs it)");
    let proxy = KillOnDrop(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(listen).is_err() {
        assert!(Instant::now() < deadline, "haproxy did not start listening");
        std::thread::sleep(Duration::from_millis(20));
    }
    proxy
}

fn connections(node: &Gateway) -> u64 {
    node.metric("gateway_connections", &[])
}

#[test]
fn the_haproxy_example_spreads_clients_and_moves_them_off_a_draining_node() {
    let mut fleet = Fleet::start(2);
    let nodes: Vec<&Gateway> = fleet.nodes.iter().collect();
    fleet.wait_membership(&nodes, 2);
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _proxy = haproxy(listen, &nodes);
    // Health checks pass (two intervals) before the first client.
    std::thread::sleep(Duration::from_millis(2_500));

    let names: Vec<String> = (0..6).map(|i| format!("hp{i}")).collect();
    let mut clients: Vec<Client> = names
        .iter()
        .map(|name| connect_at(listen, name, "phone"))
        .collect();
    // Least connections: three on each node.
    assert_eq!(
        (connections(&fleet.nodes[0]), connections(&fleet.nodes[1])),
        (3, 3)
    );
    for (index, name) in names.iter().enumerate().skip(1) {
        clients[0].send_message(&format!("first{index}"), name, "through the proxy");
    }
    await_sent(&mut clients[0], 5, &mut Vec::new());
    for client in &mut clients[1..] {
        let mut seen = Vec::new();
        receive(client, 1, &mut seen);
        assert_eq!(bodies(&seen), ["through the proxy"]);
    }

    // Node 0 drains: its clients are told 1012, and reconnecting through
    // the proxy they land on node 1 (node 0's /readyz answers 503).
    fleet.nodes[0].signal("TERM");
    let mut moved = 0;
    for (index, name) in names.iter().enumerate() {
        let client = &mut clients[index];
        client.set_timeout(Duration::from_millis(200));
        let deadline = Instant::now() + Duration::from_secs(3);
        let closed = loop {
            match client.next_frame() {
                Next::Closed(code) => break code,
                Next::Gone(_) => break None,
                Next::Json(_) => {}
                Next::Silent if Instant::now() > deadline => break Some(0),
                Next::Silent => {}
            }
        };
        if closed == Some(0) {
            continue; // on node 1, still connected
        }
        assert_eq!(closed, Some(1012), "{name}: a drain says 1012");
        moved += 1;
        clients[index] = connect_at(listen, name, "phone");
    }
    assert_eq!(moved, 3);
    fleet.nodes[0].wait_exit(Duration::from_secs(10));
    assert_eq!(connections(&fleet.nodes[1]), 6, "every client on node 1");

    // Everyone is reachable on the remaining node.
    for (index, name) in names.iter().enumerate().skip(1) {
        clients[0].send(json!({"type": "send", "id": format!("after{index}"), "to": name, "body": "after the drain"}));
    }
    await_sent(&mut clients[0], 5, &mut Vec::new());
    for client in &mut clients[1..] {
        let mut seen = Vec::new();
        receive(client, 1, &mut seen);
        assert_eq!(bodies(&seen), ["after the drain"]);
    }
}
