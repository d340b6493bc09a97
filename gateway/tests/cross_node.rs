//! Cross-node delivery with the real processes: three gateway nodes (each with
//! its own storage-writer) sharing one PostgreSQL, and one nats-server, all on
//! loopback. Users and devices are spread over the nodes on purpose.

use testkit::gateway as support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{Client, Next};
use testkit::fleet::{await_sent, bodies, receive, Fleet};

fn fleet() -> Fleet {
    Fleet::start(3)
}

#[test]
fn every_device_on_every_node_gets_each_message_once_and_in_order() {
    let fleet = fleet();
    let [a, b, c] = [&fleet.nodes[0], &fleet.nodes[1], &fleet.nodes[2]];
    let mut alice_phone = a.connect("alice", "phone");
    let mut alice_laptop = c.connect("alice", "laptop");
    let mut bob_phone = b.connect("bob", "phone");
    let mut bob_tablet = a.connect("bob", "tablet");

    for index in 0..20 {
        alice_phone.send_message(&format!("a{index}"), "bob", &format!("a{index}"));
        bob_phone.send_message(&format!("b{index}"), "alice", &format!("b{index}"));
    }
    let mut alice_phone_seen = Vec::new();
    let mut bob_phone_seen = Vec::new();
    await_sent(&mut alice_phone, 20, &mut alice_phone_seen);
    await_sent(&mut bob_phone, 20, &mut bob_phone_seen);
    let from_alice: Vec<String> = (0..20).map(|i| format!("a{i}")).collect();
    let from_bob: Vec<String> = (0..20).map(|i| format!("b{i}")).collect();

    for (name, client, expect_a, expect_b) in [
        (
            "bob's tablet (node A, with the sender)",
            &mut bob_tablet,
            true,
            true,
        ),
        ("alice's laptop (node C)", &mut alice_laptop, true, true),
    ] {
        let mut seen = Vec::new();
        let duplicates = receive(client, 40, &mut seen);
        assert_eq!(duplicates, 0, "{name}: duplicates");
        let got = bodies(&seen);
        let mine_a: Vec<&str> = got.iter().copied().filter(|b| b.starts_with('a')).collect();
        let mine_b: Vec<&str> = got.iter().copied().filter(|b| b.starts_with('b')).collect();
        assert_eq!(
            expect_a,
            mine_a == from_alice,
            "{name}: alice's messages in order: {got:?}"
        );
        assert_eq!(
            expect_b,
            mine_b == from_bob,
            "{name}: bob's messages in order: {got:?}"
        );
    }
    // Each phone gets only the other user's messages (never its own).
    assert_eq!(receive(&mut bob_phone, 20, &mut bob_phone_seen), 0);
    assert_eq!(bodies(&bob_phone_seen), from_alice);
    assert_eq!(receive(&mut alice_phone, 20, &mut alice_phone_seen), 0);
    assert_eq!(bodies(&alice_phone_seen), from_bob);
    bob_phone.expect_silence(Duration::from_millis(300));
    // Every one of the 40 messages had a recipient on another node: at
    // least one envelope each left its node (how many depends on where the
    // users' homes are, which depends on the leased node ids).
    let published: u64 = fleet
        .nodes
        .iter()
        .map(|node| node.metric("gateway_backplane_published_total", &[]))
        .sum();
    assert!(published >= 40, "{published} envelopes published");

    // Typing crosses nodes too (at once, not after a durable write).
    alice_phone.send(json!({"type": "typing", "to": "bob"}));
    let typing = bob_phone.recv_type("typing");
    assert_eq!(typing["from"], "alice");
}

#[test]
fn a_nats_outage_loses_nothing_acknowledged() {
    let mut fleet = fleet();
    let mut alice = fleet.nodes[0].connect("alice", "phone");
    let mut bob = fleet.nodes[1].connect("bob", "phone");
    let mut seen = Vec::new();

    for index in 0..10 {
        alice.send_message(&format!("m{index}"), "bob", &format!("m{index}"));
    }
    await_sent(&mut alice, 10, &mut Vec::new());
    receive(&mut bob, 10, &mut seen);
    assert_eq!(seen.len(), 10, "live before the outage");

    fleet.nats.servers[0].stop();
    fleet.nodes[1].wait_metric("gateway_backplane_connected", &[], 0);
    for index in 10..20 {
        alice.send_message(&format!("m{index}"), "bob", &format!("m{index}"));
    }
    // Storage is up: every send is acknowledged during the outage.
    await_sent(&mut alice, 10, &mut Vec::new());

    fleet.nats.servers[0].restart();
    // The reconnect makes bob's node resync him: the ten he missed arrive.
    receive(&mut bob, 20, &mut seen);
    let mut expected: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    let mut got: Vec<String> = bodies(&seen).into_iter().map(str::to_owned).collect();
    expected.sort();
    got.sort();
    assert_eq!(got, expected, "nothing acknowledged is lost");
    assert!(fleet.nodes[1].metric("gateway_backplane_reconnects_total", &[]) >= 1);
}

#[test]
fn users_of_a_killed_node_reconnect_elsewhere_and_lose_nothing() {
    let mut fleet = fleet();
    let mut alice = fleet.nodes[0].connect("alice", "phone");
    let mut bob = fleet.nodes[1].connect("bob", "phone");
    let mut seen = Vec::new();
    let mut sent: HashMap<String, String> = HashMap::new();

    for index in 0..10 {
        alice.send_message(&format!("m{index}"), "bob", &format!("m{index}"));
    }
    sent.extend(await_sent(&mut alice, 10, &mut Vec::new()));
    receive(&mut bob, 10, &mut seen);

    // Bob's node dies; alice keeps sending; bob comes back on node C.
    fleet.nodes[1].kill9();
    for index in 10..20 {
        alice.send_message(&format!("m{index}"), "bob", &format!("m{index}"));
    }
    sent.extend(await_sent(&mut alice, 10, &mut Vec::new()));
    let mut bob = fleet.nodes[2].connect("bob", "phone");
    for message in &bob.synced {
        let id = message["message_id"].as_str().unwrap().to_owned();
        if !seen.iter().any(|(s, _)| *s == id) {
            seen.push((id, message["body"].as_str().unwrap().to_owned()));
        }
    }
    receive(&mut bob, 20, &mut seen);

    // Alice's node dies mid-stream: she retries what has no `sent` on node C.
    for index in 20..30 {
        alice.send_message(&format!("m{index}"), "bob", &format!("m{index}"));
    }
    std::thread::sleep(Duration::from_millis(20));
    fleet.nodes[0].kill9();
    alice.set_timeout(Duration::from_millis(300));
    while let Next::Json(frame) = alice.next_frame() {
        if frame["type"] == "sent" {
            sent.insert(
                frame["id"].as_str().unwrap().to_owned(),
                frame["message_id"].as_str().unwrap().to_owned(),
            );
        }
    }
    let mut alice = fleet.nodes[2].connect("alice", "phone");
    let missing: Vec<String> = (20..30)
        .map(|i| format!("m{i}"))
        .filter(|id| !sent.contains_key(id))
        .collect();
    for id in &missing {
        alice.send_message(id, "bob", id);
    }
    sent.extend(await_sent(&mut alice, missing.len(), &mut Vec::new()));
    assert_eq!(
        sent.len(),
        30,
        "every send acknowledged, some after a retry"
    );
    receive(&mut bob, 30, &mut seen);
    let mut got: Vec<String> = bodies(&seen).into_iter().map(str::to_owned).collect();
    got.sort();
    got.dedup();
    let mut expected: Vec<String> = (0..30).map(|i| format!("m{i}")).collect();
    expected.sort();
    assert_eq!(got, expected, "bob has every acknowledged message");
    // Acknowledged ids are the ones bob got.
    for (id, body) in &seen {
        let _: Value = json!(body);
        assert!(
            sent.values().any(|m| m == id),
            "{body} arrived with an id alice never saw"
        );
    }
}

#[test]
fn groups_receipts_and_presence_work_across_nodes() {
    let fleet = fleet();
    // Six members spread over three nodes; ann creates the group on node 1.
    let names = ["ann", "ben", "cat", "dan", "eve", "fay"];
    let mut clients: Vec<Client> = names
        .iter()
        .enumerate()
        .map(|(i, name)| fleet.nodes[i % 3].connect(name, "phone"))
        .collect();
    let group = clients[0].create_group("cg", &names[1..5]);
    for client in &mut clients[1..5] {
        assert_eq!(client.recv_type("message")["event"]["action"], "created");
    }
    // Ben (node 2) becomes an admin, to change the group from there below.
    clients[0]
        .send(json!({"type": "group_promote", "id": "up-ben", "group": group, "members": ["ben"]}));
    clients[0].recv_type("sent");
    for client in &mut clients[1..5] {
        assert_eq!(client.recv_type("message")["event"]["action"], "promoted");
    }

    // One send reaches every member on every node, once.
    clients[0].send(json!({"type": "send", "id": "g1", "group": group, "body": "across"}));
    for (client, name) in clients[1..5].iter_mut().zip(&names[1..5]) {
        let mut seen = Vec::new();
        assert_eq!(receive(client, 1, &mut seen), 0, "{name}: no duplicate");
        assert_eq!(bodies(&seen), ["across"], "{name}");
    }

    // Cat (node 3) sends, so node 3 caches the member list.
    clients[2].send(json!({"type": "send", "id": "warm", "group": group, "body": "warm"}));
    clients[2].recv_type("sent");
    let mut seen = Vec::new();
    receive(&mut clients[0], 1, &mut seen);
    assert_eq!(bodies(&seen), ["warm"]);

    // Fay is added on node 2 (ben's node). Node 3's cached list is told to
    // go (well before `group_cache_ms`): a send from node 3 right after
    // reaches fay, who is on node 3 too.
    clients[1]
        .send(json!({"type": "group_add", "id": "add-fay", "group": group, "members": ["fay"]}));
    clients[1].recv_type("sent");
    assert_eq!(clients[5].recv_type("message")["event"]["action"], "added");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut attempt = 0;
    let seen_by_fay = loop {
        // dan is on node 1, eve on node 2, cat on node 3 (the sender here).
        attempt += 1;
        let body = format!("after add {attempt}");
        clients[2].send(
            json!({"type": "send", "id": format!("c{attempt}"), "group": group, "body": body}),
        );
        clients[2].recv_type("sent");
        let mut seen = Vec::new();
        receive(&mut clients[5], 1, &mut seen);
        if bodies(&seen) == [body.as_str()] {
            break attempt;
        }
        assert!(
            Instant::now() < deadline,
            "fay never got a message sent after her addition"
        );
    };
    assert_eq!(
        seen_by_fay, 1,
        "the change notice reached node 3 before its next send"
    );

    // Read receipts cross nodes: eve (node 2) reads ann's (node 1) message.
    let message_id = fleet_history_last(&mut clients[4], &group, "across");
    clients[4].send(
        json!({"type": "read", "conversation": format!("grp:{group}"),
                           "up_to": message_id, "from": "ann"}),
    );
    let receipt = clients[0].recv_type("receipts");
    assert_eq!(receipt["receipts"][0]["user"], "eve");
    assert_eq!(receipt["receipts"][0]["status"], "read");

    // Presence of a member on another node (they share the group).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        clients[0].send(json!({"type": "presence", "users": ["cat"]}));
        let answer = clients[0].recv_type("presence");
        if answer["users"][0]["online"] == true {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cat never showed online: {answer}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }

    // Per-device ciphertexts cross nodes: each of cat's devices (node 3 and
    // node 1) gets only its own from ann (node 1).
    let mut cat_laptop = fleet.nodes[0].connect("cat", "laptop");
    for (client, tag) in [(&mut clients[2], "phone"), (&mut cat_laptop, "laptop")] {
        client.send(
            json!({"type": "keys_upload", "identity_key": format!("i{tag}"),
                           "signed_prekey": "s", "signed_prekey_signature": "g"}),
        );
        client.recv_type("keys_uploaded");
    }
    clients[0].send(json!({"type": "send", "id": "pd", "to": "cat",
                           "bodies": {"phone": "for-phone", "laptop": "for-laptop"}}));
    clients[0].recv_type("sent");
    assert_eq!(clients[2].recv_type("message")["body"], "for-phone");
    assert_eq!(cat_laptop.recv_type("message")["body"], "for-laptop");

    // Presence is per node: cat's laptop leaving node 1 does not make cat
    // offline while the phone is on node 3; the phone leaving does.
    let cat_presence = |ann: &mut Client| {
        ann.send(json!({"type": "presence", "users": ["cat"]}));
        ann.recv_type("presence")["users"][0].clone()
    };
    cat_laptop.close();
    std::thread::sleep(Duration::from_millis(1_200)); // three intervals
    assert_eq!(cat_presence(&mut clients[0])["online"], true);
    let cat_phone = clients.remove(2);
    cat_phone.close();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let cat = cat_presence(&mut clients[0]);
        if cat["online"] == false {
            assert!(cat["last_seen"].is_u64(), "{cat}");
            break;
        }
        assert!(Instant::now() < deadline, "cat never went offline: {cat}");
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(fleet);
}

/// The id of the message with `body` in the group's history.
fn fleet_history_last(client: &mut Client, group: &str, body: &str) -> String {
    let history = client.history(&format!("grp:{group}"), None, 50);
    history
        .iter()
        .find(|m| m["body"] == body)
        .and_then(|m| m["message_id"].as_str())
        .expect("the message is in history")
        .to_owned()
}

#[test]
fn a_delete_for_everyone_crosses_nodes_and_history_shows_the_tombstone() {
    let fleet = Fleet::start(2);
    let [a, b] = [&fleet.nodes[0], &fleet.nodes[1]];
    let mut alice = a.connect("alice", "phone");
    let mut alice_laptop = b.connect("alice", "laptop");
    let mut bob = b.connect("bob", "phone");
    alice.send_message("x1", "bob", "regret");
    let target = alice.recv_type("sent")["message_id"].clone();
    let message = |client: &mut Client| loop {
        let frame = client.recv();
        if frame["type"] == "message" {
            return frame;
        }
    };
    assert_eq!(message(&mut bob)["body"], "regret");
    assert_eq!(message(&mut alice_laptop)["body"], "regret");
    // Bob, on the other node, may not delete alice's message.
    bob.send(json!({"type": "send", "id": "xb", "to": "alice", "delete": target}));
    assert_eq!(bob.recv_type("error")["code"], "forbidden");
    alice.send(json!({"type": "send", "id": "x2", "to": "bob", "delete": target}));
    let deletion = alice.recv_type("sent")["message_id"].clone();
    for device in [&mut bob, &mut alice_laptop] {
        let notice = message(device);
        assert_eq!(
            (&notice["message_id"], &notice["deletes"]),
            (&deletion, &target),
            "{notice}"
        );
    }
    // Read on the other node, from the shared database.
    let history = bob.history("dm:alice:bob", None, 10);
    assert_eq!(history.len(), 2, "{history:?}");
    assert_eq!(history[1]["deleted"], true, "{history:?}");
    assert!(!history.iter().any(|m| m.to_string().contains("regret")));
}
