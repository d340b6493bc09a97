//! Routing at fleet scale with the real processes: gateway nodes sharing one
//! PostgreSQL and one nats-server (with its monitoring endpoint), on
//! loopback. Each node subscribes per node, never per user; a user's home is
//! computed from the live membership; a node serving a user homed elsewhere
//! registers there; nodes join and die under a stream and nothing
//! acknowledged is lost.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backplane_bridge::routing::HomeTable;
use testkit::fleet::{
    await_sent, bodies, node_id, note, public_url, receive, Fleet, MEMBERSHIP_HEARTBEAT_MS,
};
use testkit::gateway::{connect_at, connect_unsynced_at, Client, Gateway, Next};

/// Each node's subscriptions on nats-server, by the node's connection
/// name, without async-nats's request inbox (made at the node's first
/// registration, one per connection whatever the users), and how many
/// request inboxes each holds.
fn node_subscriptions(fleet: &Fleet) -> BTreeMap<String, (Vec<String>, usize)> {
    let mut subscriptions = fleet.nats.servers[0].subscriptions_by_client();
    subscriptions
        .retain(|name, _| name.starts_with("chat-gateway-node-") && !name.ends_with("-lease"));
    subscriptions
        .into_iter()
        .map(|(name, mut list)| {
            let inboxes = list.iter().filter(|s| s.starts_with("_INBOX.")).count();
            list.retain(|s| !s.starts_with("_INBOX."));
            list.sort();
            (name, (list, inboxes))
        })
        .collect()
}

#[test]
fn subscriptions_per_node_stay_the_same_with_10_and_with_5000_users() {
    let fleet = Fleet::start(3);
    let nodes: Vec<&Gateway> = fleet.nodes.iter().collect();
    fleet.wait_membership(&nodes, 3);

    let mut clients: Vec<Client> = (0..10)
        .map(|i| fleet.nodes[i % 3].connect(&format!("few{i}"), "phone"))
        .collect();
    let with_10 = node_subscriptions(&fleet);
    assert_eq!(
        with_10.len(),
        3,
        "one backplane connection per node: {with_10:?}"
    );
    for (name, (subjects, inboxes)) in &with_10 {
        assert_eq!(subjects.len(), 3, "{name} holds {subjects:?}");
        assert!(*inboxes <= 1, "{name}: {inboxes} request inboxes");
        let id = name.trim_start_matches("chat-gateway-node-");
        assert!(
            subjects.contains(&format!("chat.n.{id}")),
            "{name}: its own subject"
        );
        assert!(
            !subjects.iter().any(|s| s.contains(".u.")),
            "{name}: a per-user subject"
        );
    }

    // 4,990 more users, spread over the nodes.
    let addresses: Vec<SocketAddr> = fleet.nodes.iter().map(|node| node.ws).collect();
    for i in 10..5_000 {
        clients.push(connect_unsynced_at(
            addresses[i % 3],
            &format!("many{i}"),
            "phone",
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let total: u64 = fleet
            .nodes
            .iter()
            .map(|node| node.metric("gateway_connections", &[]))
            .sum();
        if total == 5_000 {
            break;
        }
        assert!(Instant::now() < deadline, "{total} of 5,000 connected");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The users homed elsewhere are registered at their homes meanwhile.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let held: u64 = fleet
            .nodes
            .iter()
            .map(|node| node.metric("gateway_backplane_exceptions_held", &[]))
            .sum();
        let here: u64 = fleet
            .nodes
            .iter()
            .map(|node| node.metric("gateway_backplane_exceptions_here", &[]))
            .sum();
        // About two thirds of users land on a node that is not their home.
        if held == here && held > 2_500 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "registrations: held {held}, here {here}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let with_5000 = node_subscriptions(&fleet);
    assert_eq!(with_5000.len(), 3);
    for (name, (subjects, inboxes)) in &with_5000 {
        let before = with_10.get(name).map(|(subjects, _)| subjects);
        assert_eq!(
            Some(subjects),
            before,
            "{name}: the same subjects with 500x the users"
        );
        // The request inbox appears with a node's first registration.
        assert_eq!(
            *inboxes, 1,
            "{name}: one request inbox for all registrations"
        );
    }
    for node in &fleet.nodes {
        assert_eq!(node.metric("gateway_backplane_subscriptions", &[]), 4);
    }
    drop(clients);
}

/// A user homed on `home` in a table of `ids`, named `prefix<n>`.
fn user_homed_on(ids: &[u16], home: u16, prefix: &str) -> String {
    let table = HomeTable::new(ids).unwrap();
    (0..)
        .map(|n| format!("{prefix}{n}"))
        .find(|user| table.home(user) == home)
        .unwrap()
}

#[test]
fn a_user_with_devices_on_two_nodes_neither_its_home_gets_everything_live_on_both() {
    let fleet = Fleet::start(3);
    let nodes: Vec<&Gateway> = fleet.nodes.iter().collect();
    fleet.wait_membership(&nodes, 3);
    let ids: Vec<u16> = fleet.nodes.iter().map(node_id).collect();
    // Node 0 is bob's home; bob's devices are on nodes 1 and 2. Alice sends
    // from node 1 (the home must not forward back to it) and from the home.
    let bob = user_homed_on(&ids, ids[0], "bob");
    let alice = user_homed_on(&ids, ids[2], "alice");
    let mut bob_phone = fleet.nodes[1].connect(&bob, "phone");
    let mut bob_laptop = fleet.nodes[2].connect(&bob, "laptop");
    let mut alice_on_1 = fleet.nodes[1].connect(&alice, "phone");
    let mut alice_on_0 = fleet.nodes[0].connect(&alice, "tablet");
    // Each `hello` away from home names the home's advertised address.
    for client in [&bob_phone, &bob_laptop] {
        assert_eq!(client.hello["home"], public_url(0), "{}", client.hello);
    }
    assert_eq!(alice_on_0.hello["home"], public_url(2));
    let alice_at_home = fleet.nodes[2].connect(&alice, "watch");
    assert!(
        alice_at_home.hello.get("home").is_none(),
        "{}",
        alice_at_home.hello
    );
    fleet.nodes[0].wait_metric("gateway_backplane_exceptions_held", &[], 2);
    let forwarded_before = fleet.nodes[0].metric("gateway_backplane_forwarded_total", &[]);

    for index in 0..20 {
        let (client, tag) = if index % 2 == 0 {
            (&mut alice_on_1, "n1")
        } else {
            (&mut alice_on_0, "n0")
        };
        client.send_message(&format!("m{index}"), &bob, &format!("{tag}-{index}"));
        await_sent(client, 1, &mut Vec::new());
    }
    // Order holds per sending device (its own messages, in its order); two
    // devices of one sender on two nodes reach a third node in the order
    // their nodes deliver, which ids (and history) then settle.
    let in_order = |tag: &str| -> Vec<String> {
        (0..20)
            .filter(|i| (i % 2 == 0) == (tag == "n1"))
            .map(|i| format!("{tag}-{i}"))
            .collect()
    };
    for (name, device) in [
        ("phone (node 1)", &mut bob_phone),
        ("laptop (node 2)", &mut bob_laptop),
    ] {
        let mut seen = Vec::new();
        let duplicates = receive(device, 20, &mut seen);
        assert_eq!(duplicates, 0, "bob's {name}: a duplicate");
        for tag in ["n1", "n0"] {
            let from: Vec<&str> = bodies(&seen)
                .into_iter()
                .filter(|body| body.starts_with(tag))
                .collect();
            assert_eq!(
                from,
                in_order(tag),
                "bob's {name}: all from {tag}, in order"
            );
        }
        device.expect_silence(Duration::from_millis(300));
    }
    // The home forwarded each message to the registered nodes other than
    // the sender's: once per message from node 1 (to node 2), twice per
    // message sent on the home itself (to nodes 1 and 2).
    let forwarded =
        fleet.nodes[0].metric("gateway_backplane_forwarded_total", &[]) - forwarded_before;
    assert_eq!(forwarded, 10 + 10 * 2, "forwards by the home");

    // The home keeps no registration once bob's devices leave.
    bob_phone.close();
    bob_laptop.close();
    let deadline = Instant::now() + Duration::from_secs(10);
    while fleet.nodes[0].metric("gateway_backplane_exceptions_held", &[]) != 0 {
        assert!(
            Instant::now() < deadline,
            "bob's registrations were never removed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One receiving device in its own thread: reads (and acknowledges) until
/// told how many messages to expect and it has them, reconnecting to
/// `fallback` when its node dies.
struct Receiver {
    user: String,
    expected: Arc<AtomicUsize>,
    thread: std::thread::JoinHandle<Received>,
}

/// What a receiver got: (message id, body) in order of first arrival, how
/// many arrived again, how often it reconnected.
type Received = (Vec<(String, String)>, usize, u32);

fn spawn_receiver(
    user: String,
    at: SocketAddr,
    fallback: SocketAddr,
    give_up: Arc<AtomicBool>,
) -> Receiver {
    let expected = Arc::new(AtomicUsize::new(usize::MAX));
    let wanted = expected.clone();
    let name = user.clone();
    let thread = std::thread::spawn(move || {
        let mut client = connect_at(at, &name, "phone");
        let mut seen = Vec::new();
        let mut duplicates = 0;
        let mut reconnects = 0;
        client.set_timeout(Duration::from_millis(100));
        while seen.len() < wanted.load(SeqCst) && !give_up.load(SeqCst) {
            match client.next_frame() {
                Next::Json(frame) if frame["type"] == "message" => {
                    if note(&mut client, &frame, &mut seen) {
                        duplicates += 1;
                    }
                }
                Next::Json(_) | Next::Silent => {}
                Next::Closed(_) | Next::Gone(_) => {
                    reconnects += 1;
                    client = connect_at(fallback, &name, "phone");
                    for frame in std::mem::take(&mut client.synced) {
                        if frame["type"] == "message" && note(&mut client, &frame, &mut seen) {
                            duplicates += 1;
                        }
                    }
                    client.set_timeout(Duration::from_millis(100));
                }
            }
        }
        (seen, duplicates, reconnects)
    });
    Receiver {
        user,
        expected,
        thread,
    }
}

#[test]
fn a_node_joining_and_one_killed_under_a_stream_lose_nothing_acknowledged() {
    let mut fleet = Fleet::start(3);
    let nodes: Vec<&Gateway> = fleet.nodes.iter().collect();
    fleet.wait_membership(&nodes, 3);
    let addresses: Vec<SocketAddr> = fleet.nodes.iter().map(|node| node.ws).collect();
    let give_up = Arc::new(AtomicBool::new(false));
    // 24 receivers over the three nodes; those on node 1 (killed later)
    // reconnect to node 2. The sender is on node 0, which stays.
    let receivers: Vec<Receiver> = (0..24)
        .map(|i| {
            let at = addresses[i % 3];
            spawn_receiver(format!("r{i}"), at, addresses[2], give_up.clone())
        })
        .collect();
    let mut sender = fleet.nodes[0].connect("streamer", "phone");
    for node in &fleet.nodes {
        node.wait_metric("gateway_connections", &[], 8);
    }

    // 600 messages at about 50/s: a node joins after 2 s, node 1 is killed
    // with `kill -9` after 5 s.
    let mut sent: BTreeMap<String, String> = BTreeMap::new();
    let mut to_user: HashMap<String, usize> = HashMap::new();
    let mut joined = None;
    let started = Instant::now();
    for index in 0..600 {
        if index == 100 {
            joined = Some(fleet.start_node(&[]));
        }
        if index == 250 {
            fleet.nodes[1].kill9();
        }
        let receiver = index % receivers.len();
        let id = format!("s{index}");
        sender.send_message(&id, &receivers[receiver].user, &id);
        to_user.insert(id, receiver);
        sent.extend(await_sent(&mut sender, 1, &mut Vec::new()));
        let due = started + Duration::from_millis(20 * (index as u64 + 1));
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
    }
    assert_eq!(sent.len(), 600, "every send acknowledged");
    let joined = joined.unwrap();
    let alive = [&fleet.nodes[0], &fleet.nodes[2], &joined];
    fleet.wait_membership(&alive, 3);
    let moved: u64 = alive
        .iter()
        .map(|node| node.metric("gateway_backplane_homes_moved_total", &[]))
        .sum();
    assert!(moved > 0, "the join and the death moved some homes");

    // After the changes settled, one more message each arrives live (no
    // sync runs any more: the membership is stable).
    let settle = Duration::from_millis(MEMBERSHIP_HEARTBEAT_MS * 4 + 500);
    std::thread::sleep(settle);
    for (index, receiver) in receivers.iter().enumerate() {
        let id = format!("after{index}");
        sender.send_message(&id, &receiver.user, &id);
        to_user.insert(id, index);
    }
    sent.extend(await_sent(&mut sender, receivers.len(), &mut Vec::new()));
    for (index, receiver) in receivers.iter().enumerate() {
        let count = to_user.values().filter(|r| **r == index).count();
        receiver.expected.store(count, SeqCst);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while receivers.iter().any(|r| !r.thread.is_finished()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    give_up.store(true, SeqCst);

    let mut duplicates_total = 0;
    let mut reconnects_total = 0;
    for (index, receiver) in receivers.into_iter().enumerate() {
        let (seen, duplicates, reconnects) = receiver.thread.join().unwrap();
        duplicates_total += duplicates;
        reconnects_total += reconnects;
        let mut expected: Vec<&str> = to_user
            .iter()
            .filter(|(_, r)| **r == index)
            .map(|(id, _)| id.as_str())
            .collect();
        expected.sort();
        let mut got: Vec<&str> = bodies(&seen);
        got.sort();
        assert_eq!(
            got, expected,
            "r{index}: every acknowledged message, once per id"
        );
        for (message_id, body) in &seen {
            assert_eq!(
                sent.get(body),
                Some(message_id),
                "r{index}: {body} under its acknowledged id"
            );
        }
    }
    assert_eq!(
        reconnects_total, 8,
        "the killed node's receivers reconnected once each"
    );
    eprintln!("repeat deliveries of an id (clients drop them): {duplicates_total}");
    drop(joined);
}
