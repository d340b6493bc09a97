//! Group chat against the real binary: a membership change is a message in
//! the group seen in order by every member's devices; one send reaches
//! every member once (offline members on sync); only members send, read
//! history, list members or type; the size limit holds.

use testkit::gateway as support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::json;
use support::{Client, Gateway, Writer};

/// Members of the large group (the default and documented maximum).
const LARGE: usize = 1024;

#[test]
fn a_1024_member_group_message_reaches_every_device_once_and_offline_members_on_sync() {
    let gateway = Gateway::start(&[]);
    let names: Vec<String> = (0..LARGE).map(|i| format!("member{i:04}")).collect();
    // Half the members are online (one device each), half are not.
    let mut online: Vec<Client> = names[..LARGE / 2]
        .iter()
        .map(|name| gateway.connect(name, "phone"))
        .collect();
    let others: Vec<&str> = names[1..].iter().map(String::as_str).collect();
    let group = online[0].create_group("create-1", &others);
    let conversation = format!("grp:{group}");

    let started = Instant::now();
    online[0].send(json!({"type": "send", "id": "m1", "group": group, "body": "to all"}));
    online[0].send(json!({"type": "send", "id": "m2", "group": group, "body": "end"}));
    // The creator's device gets `sent` for both, never its own messages.
    assert_eq!(online[0].recv_type("sent")["id"], "m1");
    assert_eq!(online[0].recv_type("sent")["id"], "m2");
    let mut seen_by: HashMap<&str, usize> = HashMap::new();
    for (client, name) in online.iter_mut().zip(&names).skip(1) {
        let messages = client.messages_until("end");
        // The creation event, then the message, then "end": once each, in order.
        let bodies: Vec<&str> = messages
            .iter()
            .map(|m| m["body"].as_str().unwrap())
            .collect();
        assert_eq!(bodies, ["", "to all", "end"], "{name}");
        assert_eq!(messages[0]["event"]["action"], "created");
        assert_eq!(
            messages[0]["event"]["members"].as_array().unwrap().len(),
            LARGE
        );
        for message in &messages {
            assert_eq!(message["conversation"], conversation.as_str());
            assert_eq!(message["group"], group.as_str());
        }
        *seen_by.entry("online").or_default() += 1;
    }
    let online_delivery = started.elapsed();
    assert_eq!(seen_by["online"], LARGE / 2 - 1);

    // The offline half connects: each syncs the same three, once.
    let started = Instant::now();
    for name in &names[LARGE / 2..] {
        let client = gateway.connect(name, "phone");
        let bodies: Vec<&str> = client
            .synced
            .iter()
            .map(|m| m["body"].as_str().unwrap())
            .collect();
        assert_eq!(bodies, ["", "to all", "end"], "{name}");
    }
    eprintln!(
        "1024-member group: {} online got it in {:?}; {} offline synced in {:?}",
        LARGE / 2 - 1,
        online_delivery,
        LARGE / 2,
        started.elapsed()
    );
    assert_eq!(gateway.metric("gateway_group_messages_total", &[]), 2);
}

#[test]
fn only_members_send_read_list_and_type_and_changes_arrive_in_order() {
    let gateway = Gateway::start(&["--group-members-max", "4"]);
    let mut alice = gateway.connect("alice", "phone");
    let mut alice_laptop = gateway.connect("alice", "laptop");
    let mut bob = gateway.connect("bob", "phone");
    let mut carol = gateway.connect("carol", "phone");
    let mut mallory = gateway.connect("mallory", "phone");

    let group = alice.create_group("g-create", &["bob"]);
    let created = bob.recv_type("message");
    assert_eq!(created["event"]["action"], "created");
    assert_eq!(created["event"]["members"], json!(["alice", "bob"]));
    // The creator's other device sees the change too.
    assert_eq!(
        alice_laptop.recv_type("message")["event"]["action"],
        "created"
    );

    // A stranger may not send, read, list or type.
    mallory.send(json!({"type": "send", "id": "x1", "group": group, "body": "hi"}));
    let refused = mallory.recv();
    assert_eq!(
        (refused["code"].as_str(), refused["id"].as_str()),
        (Some("forbidden"), Some("x1"))
    );
    mallory.send(json!({"type": "history", "conversation": format!("grp:{group}")}));
    assert_eq!(mallory.recv()["code"], "forbidden");
    mallory.send(json!({"type": "group_members", "group": group}));
    assert_eq!(mallory.recv()["code"], "forbidden");
    mallory.send(json!({"type": "typing", "group": group}));
    assert_eq!(mallory.recv()["code"], "forbidden");
    mallory.send(json!({"type": "group_add", "id": "x2", "group": group, "members": ["mallory"]}));
    assert_eq!(mallory.recv()["code"], "forbidden");

    // Typing reaches the other members only, and is not stored.
    alice.send(json!({"type": "typing", "group": group}));
    let typing = bob.recv();
    assert_eq!(
        (typing["type"].as_str(), typing["from"].as_str()),
        (Some("typing"), Some("alice"))
    );
    assert_eq!(typing["conversation"], format!("grp:{group}"));
    alice_laptop.expect_silence(Duration::from_millis(150));
    carol.expect_silence(Duration::from_millis(150));

    // Only admins (the creator, and whom an admin promotes) change the group.
    bob.send(json!({"type": "group_add", "id": "early", "group": group, "members": ["carol"]}));
    let refused = bob.recv_type("error");
    assert_eq!(
        (refused["code"].as_str(), refused["id"].as_str()),
        (Some("forbidden"), Some("early"))
    );
    assert!(refused["message"].as_str().unwrap().contains("admins"));
    bob.send(json!({"type": "group_remove", "id": "coup", "group": group, "members": ["alice"]}));
    assert_eq!(bob.recv_type("error")["code"], "forbidden");
    alice
        .send(json!({"type": "group_promote", "id": "up-bob", "group": group, "members": ["bob"]}));
    assert_eq!(alice.recv_type("sent")["id"], "up-bob");
    let promoted = bob.recv_type("message");
    assert_eq!(promoted["event"]["action"], "promoted");
    assert_eq!(promoted["event"]["members"], json!(["bob"]));

    // Bob adds carol: everyone (carol too) sees it, then carol gets messages.
    bob.send(json!({"type": "group_add", "id": "add-carol", "group": group, "members": ["carol"]}));
    assert_eq!(bob.recv_type("sent")["group"], group.as_str());
    for client in [&mut alice, &mut carol] {
        let added = client.recv_type("message");
        assert_eq!(added["event"]["action"], "added");
        assert_eq!(added["event"]["members"], json!(["carol"]));
        assert_eq!(added["from"], "bob");
    }
    alice.send(json!({"type": "group_members", "group": group}));
    assert_eq!(
        alice.recv_type("group_members")["members"],
        json!(["alice", "bob", "carol"])
    );

    // The limit (4 here) holds: adding two more is refused, nothing changes.
    alice.send(
        json!({"type": "group_add", "id": "too-many", "group": group, "members": ["dave", "erin"]}),
    );
    let full = alice.recv_type("error");
    assert_eq!(
        (full["code"].as_str(), full["id"].as_str()),
        (Some("group_full"), Some("too-many"))
    );

    // Alice removes bob: bob sees his removal, and nothing sent after it.
    alice.send(json!({"type": "group_remove", "id": "rm-bob", "group": group, "members": ["bob"]}));
    assert_eq!(alice.recv_type("sent")["id"], "rm-bob");
    let removed = bob.recv_type("message");
    assert_eq!(removed["event"]["action"], "removed");
    alice.send(json!({"type": "send", "id": "after", "group": group, "body": "without bob"}));
    assert_eq!(
        carol.messages_until("without bob").len(),
        2,
        "removal, then the message"
    );
    bob.expect_silence(Duration::from_millis(200));
    bob.send(json!({"type": "send", "id": "b1", "group": group, "body": "still here?"}));
    assert_eq!(bob.recv()["code"], "forbidden");

    // Carol leaves; a retried change keeps its first answer.
    carol.send(json!({"type": "group_leave", "id": "bye", "group": group}));
    let first = carol.recv_type("sent");
    carol.send(json!({"type": "group_leave", "id": "bye", "group": group}));
    let again = carol.recv_type("sent");
    assert_eq!(first["message_id"], again["message_id"]);
    assert_eq!(alice.recv_type("message")["event"]["action"], "left");

    // History (members only) holds every change and message in order.
    let history = alice.history(&format!("grp:{group}"), None, 50);
    let actions: Vec<String> = history.iter().rev().map(action_or_body).collect();
    assert_eq!(
        actions,
        [
            "created",
            "promoted",
            "added",
            "removed",
            "without bob",
            "left"
        ]
    );
}

#[test]
fn only_admins_post_in_a_restricted_group_until_it_is_opened() {
    let gateway = Gateway::start(&[]);
    let mut alice = gateway.connect("alice", "phone");
    let mut bob = gateway.connect("bob", "phone");
    let group = alice.create_group("g-news", &["bob"]);
    assert_eq!(bob.recv_type("message")["event"]["action"], "created");

    // Only an admin restricts posting; everyone sees that it happened.
    bob.send(json!({"type": "group_restrict", "id": "r0", "group": group}));
    assert_eq!(bob.recv_type("error")["code"], "forbidden");
    alice.send(json!({"type": "group_restrict", "id": "r1", "group": group}));
    assert_eq!(alice.recv_type("sent")["id"], "r1");
    let restricted = bob.recv_type("message");
    assert_eq!(restricted["event"]["action"], "restricted");
    assert_eq!(restricted["event"]["members"], json!([]));
    alice.send(json!({"type": "group_restrict", "id": "r2", "group": group}));
    assert_eq!(alice.recv_type("error")["code"], "invalid_field");

    // Bob (a member, not an admin) may not post; alice may.
    bob.send(json!({"type": "send", "id": "b1", "group": group, "body": "may I?"}));
    let refused = bob.recv_type("error");
    assert_eq!(
        (refused["code"].as_str(), refused["id"].as_str()),
        (Some("forbidden"), Some("b1"))
    );
    assert!(refused["message"].as_str().unwrap().contains("admins"));
    alice.send(json!({"type": "send", "id": "a1", "group": group, "body": "announcement"}));
    assert_eq!(alice.recv_type("sent")["id"], "a1");
    assert_eq!(bob.recv_type("message")["body"], "announcement");

    // Promoted, bob posts; opened again, carol (added later) posts too.
    alice.send(json!({"type": "group_promote", "id": "p1", "group": group, "members": ["bob"]}));
    assert_eq!(alice.recv_type("sent")["id"], "p1");
    assert_eq!(bob.recv_type("message")["event"]["action"], "promoted");
    bob.send(json!({"type": "send", "id": "b2", "group": group, "body": "now I may"}));
    assert_eq!(bob.recv_type("sent")["id"], "b2");
    alice.send(json!({"type": "group_add", "id": "add-c", "group": group, "members": ["carol"]}));
    assert_eq!(alice.recv_type("sent")["id"], "add-c");
    let mut carol = gateway.connect("carol", "phone");
    carol.send(json!({"type": "send", "id": "c1", "group": group, "body": "me too?"}));
    assert_eq!(carol.recv_type("error")["code"], "forbidden");
    bob.send(json!({"type": "group_open", "id": "o1", "group": group}));
    assert_eq!(bob.recv_type("sent")["id"], "o1");
    carol.send(json!({"type": "send", "id": "c2", "group": group, "body": "me too"}));
    assert_eq!(carol.recv_type("sent")["id"], "c2");

    // The changes are in the history, in order with the messages.
    let history = alice.history(&format!("grp:{group}"), None, 50);
    let actions: Vec<String> = history.iter().rev().map(action_or_body).collect();
    assert_eq!(
        actions,
        [
            "created",
            "restricted",
            "announcement",
            "promoted",
            "now I may",
            "added",
            "opened",
            "me too"
        ]
    );
}

#[test]
fn the_writer_refuses_a_change_past_its_bound_and_nobody_sees_it() {
    // The writer's bound (3) below the node's (10): what two nodes checking
    // against the same list at once would let through, made certain.
    let data = tempfile::tempdir().unwrap();
    let _writer = Writer::start(data.path(), &["--group-members-max", "3"]);
    let dir = data.path().to_str().unwrap();
    let gateway = Gateway::start(&[
        "--data-dir",
        dir,
        "--storage-writer",
        "external",
        "--group-members-max",
        "10",
    ]);
    let mut alice = gateway.connect("alice", "phone");
    let mut bob = gateway.connect("bob", "phone");
    let mut dave = gateway.connect("dave", "phone");
    let group = alice.create_group("g-bound", &["bob"]);
    assert_eq!(bob.recv_type("message")["event"]["action"], "created");
    alice.send(json!({"type": "group_add", "id": "add-c", "group": group, "members": ["carol"]}));
    assert_eq!(alice.recv_type("sent")["id"], "add-c");
    assert_eq!(bob.recv_type("message")["event"]["action"], "added");

    for _attempt in 0..2 {
        // A retry with the same id is a new change, refused again.
        alice
            .send(json!({"type": "group_add", "id": "add-d", "group": group, "members": ["dave"]}));
        let refused = alice.recv_type("error");
        assert_eq!(
            (refused["code"].as_str(), refused["id"].as_str()),
            (Some("group_full"), Some("add-d")),
            "{refused}"
        );
    }
    bob.expect_silence(Duration::from_millis(300));
    dave.expect_silence(Duration::from_millis(100));
    dave.send(json!({"type": "send", "id": "d1", "group": group, "body": "am I in?"}));
    assert_eq!(dave.recv_type("error")["code"], "forbidden");
    let history = alice.history(&format!("grp:{group}"), None, 50);
    let actions: Vec<String> = history.iter().rev().map(action_or_body).collect();
    assert_eq!(actions, ["created", "added"]);
}

#[test]
fn a_member_added_later_reads_only_from_when_they_joined() {
    let gateway = Gateway::start(&[]);
    let mut alice = gateway.connect("alice", "phone");
    let mut bob = gateway.connect("bob", "phone");
    let group = alice.create_group("g", &["bob"]);
    for body in ["before one", "before two"] {
        alice.send(
            json!({"type": "send", "id": body.replace(' ', "-"), "group": group, "body": body}),
        );
        alice.recv_type("sent");
    }
    bob.messages_until("before two");
    alice.send(
        json!({"type": "group_add", "id": "add-carol", "group": group, "members": ["carol"]}),
    );
    alice.recv_type("sent");
    alice.send(json!({"type": "send", "id": "after", "group": group, "body": "after carol"}));
    alice.recv_type("sent");

    // Carol's history starts at her joining; bob's shows everything.
    let mut carol = gateway.connect("carol", "phone");
    let conversation = format!("grp:{group}");
    let seen: Vec<String> = carol
        .history(&conversation, None, 50)
        .iter()
        .rev()
        .map(action_or_body)
        .collect();
    assert_eq!(
        seen,
        ["added", "after carol"],
        "nothing from before she joined"
    );
    // Her sync brought the same: what was sent while she was a member.
    let synced: Vec<&str> = carol
        .synced
        .iter()
        .filter_map(|m| m["body"].as_str())
        .filter(|b| !b.is_empty())
        .collect();
    assert_eq!(synced, ["after carol"]);
    assert_eq!(bob.history(&conversation, None, 50).len(), 5);
}

/// A history entry as a word: its event's action, or its body.
fn action_or_body(message: &serde_json::Value) -> String {
    message["event"]["action"]
        .as_str()
        .map(String::from)
        .unwrap_or_else(|| message["body"].as_str().unwrap().to_owned())
}
