//! Account deletion with the real processes: a user deletes their own
//! account (`delete_account`, confirmed with their user id) or an operator
//! does (`POST /delete-account`, `gateway delete-account`). Every device of
//! theirs closes with 4004 (4003 on other nodes), their tokens are refused
//! from then on (also after a `kill -9`), their keys go, they leave their
//! groups (a `left` change the other members see live, on sync and in
//! history), what they sent stays in the other side's history (the documented
//! choice), and a later sign-in under the name finds an empty account. The
//! fleet's PostgreSQL is checked table by table after an operator's
//! deletion; the storage-writer's
//! `a_deleted_account_leaves_no_row_but_its_revocation` does the same on
//! fjall and PostgreSQL with every kind of row.

use serde_json::{json, Value};
use testkit::fleet::Fleet;
use testkit::gateway::{
    admin_request, connect_at, fresh_token, gateway_command, token, Client, Gateway,
};

const ADMIN_TOKEN: &str = "admin-token-for-tests-0123456789abcdef";

/// The members of `group` as `asker` reads them.
fn members_of(asker: &mut Client, group: &str) -> Value {
    asker.send(json!({"type": "group_members", "group": group}));
    asker.recv_type("group_members")["members"].clone()
}

/// Whether `message` is `user`'s `left` change.
fn is_left_by(message: &Value, user: &str) -> bool {
    message["event"]["action"] == "left" && message["event"]["members"] == json!([user])
}

/// Reads until the message with `body`; its conversation.
fn conversation_of(reader: &mut Client, body: &str) -> String {
    let message = reader.messages_until(body).pop().unwrap();
    message["conversation"].as_str().unwrap().to_owned()
}

/// The bodies of `conversation`'s history as `reader` reads it, oldest first.
fn bodies(reader: &mut Client, conversation: &str) -> Vec<String> {
    reader
        .whole_history(conversation)
        .iter()
        .map(|message| message["body"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn a_user_deletes_their_own_account_and_nothing_of_theirs_is_left_but_what_they_sent() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().to_str().unwrap();
    let flags = ["--data-dir", dir];
    let mut gateway = Gateway::start(&flags);
    let mut phone = gateway.connect("alice", "phone");
    let mut laptop = gateway.connect("alice", "laptop");
    let mut bob = gateway.connect("bob", "phone");
    let issued_before = token("alice", "tablet");
    phone.upload_keys();
    let group = phone.create_group("g1", &["bob", "carol"]);
    phone.send_message("m1", "bob", "hello bob");
    phone.recv_type("sent");
    let conversation = conversation_of(&mut bob, "hello bob");
    bob.send_message("m2", "alice", "hi alice");
    bob.recv_type("sent");
    phone.messages_until("hi alice");

    // Someone else's name does not confirm it: refused, nothing changes.
    phone.send(json!({"type": "delete_account", "user": "bob"}));
    let refused = phone.recv_type("error");
    assert_eq!(refused["code"], "invalid_field", "{refused}");
    phone.ping();
    bob.send(json!({"type": "devices", "user": "alice"}));
    assert_eq!(bob.recv_type("devices")["devices"], json!(["phone"]));

    phone.send(json!({"type": "delete_account", "user": "alice"}));
    let deleted = phone.recv_type("account_deleted");
    assert!(deleted["rows"].as_u64().unwrap() >= 8, "{deleted}");
    assert_eq!(phone.closed_within_wait(), Some(4004));
    assert_eq!(laptop.closed_within_wait(), Some(4004));
    assert_eq!(gateway.connect_with_token(&issued_before).err(), Some(401));

    // She left the group, and its members are told: bob live, carol (who
    // was offline) on sync, both in its history, where it is the last.
    let left = bob.recv_type("message");
    assert!(is_left_by(&left, "alice"), "{left}");
    assert_eq!(left["group"], group.as_str(), "{left}");
    let carol = gateway.connect("carol", "phone");
    let synced_events: Vec<&Value> = carol
        .synced
        .iter()
        .filter(|m| m["group"] == group.as_str())
        .collect();
    assert_eq!(
        synced_events.len(),
        2,
        "created and left: {:?}",
        carol.synced
    );
    assert!(is_left_by(synced_events[1], "alice"), "{:?}", carol.synced);
    let history = bob.whole_history(&format!("grp:{group}"));
    assert!(is_left_by(history.last().unwrap(), "alice"), "{history:?}");

    // Bob: alice's keys are gone, she is not a member, and what each sent
    // the other stays in his history.
    bob.send(json!({"type": "devices", "user": "alice"}));
    assert_eq!(bob.recv_type("devices")["devices"], json!([]));
    assert_eq!(members_of(&mut bob, &group), json!(["bob", "carol"]));
    assert_eq!(bodies(&mut bob, &conversation), ["hello bob", "hi alice"]);

    // Durable: after a kill -9 the old tokens stay refused, and a sign-in
    // under the name (a token issued after the deletion) is a new, empty
    // account that is in no group.
    gateway.kill9();
    let gateway = Gateway::start(&flags);
    assert_eq!(gateway.connect_with_token(&issued_before).err(), Some(401));
    let renewed = fresh_token("alice", "phone");
    let mut again = gateway.connect_with_token(&renewed).expect("a new token");
    assert_eq!(again.recv()["type"], "hello");
    again.send(json!({"type": "sync"}));
    let synced = again.recv_type("synced");
    assert_eq!(synced["count"], 0, "{synced}");
    again.send(json!({"type": "group_members", "group": group}));
    assert_eq!(again.recv_type("error")["code"], "forbidden");
    // The name's conversation with bob starts over for it: nothing the
    // deleted account said or heard there, only what comes after.
    assert!(bodies(&mut again, &conversation).is_empty());
    let mut bob = gateway.connect("bob", "phone");
    bob.send_message("m3", "alice", "welcome back");
    bob.recv_type("sent");
    again.messages_until("welcome back");
    assert_eq!(bodies(&mut again, &conversation), ["welcome back"]);
    assert_eq!(
        bodies(&mut bob, &conversation),
        ["hello bob", "hi alice", "welcome back"]
    );
}

#[test]
fn an_operator_deletes_an_account_on_every_node() {
    // (A fleet writes presence every 400 ms: a departure or an online row
    // written after the deletion shows in the check at the end.)
    let fleet = Fleet::start_joined(2, &["--admin-token", ADMIN_TOKEN]);
    let mut on_a = fleet.nodes[0].connect("carol", "phone");
    let mut on_b = connect_at(fleet.nodes[1].ws, "carol", "laptop");
    let mut dave = fleet.nodes[1].connect("dave", "phone");
    let issued_before = token("carol", "tablet");
    let group = on_a.create_group("g1", &["dave"]);
    on_a.send_message("c1", "dave", "from carol");
    on_a.recv_type("sent");
    let conversation = conversation_of(&mut dave, "from carol");

    // An account goes whole: naming a device is refused.
    let (status, body) = admin_request(
        fleet.nodes[0].admin,
        "POST",
        "/delete-account?user=carol&device=phone",
        Some(ADMIN_TOKEN),
    );
    assert_eq!(status, 400, "{body}");
    on_a.ping();

    // With the operator command, on the node without the user's home.
    let admin = fleet.nodes[1].admin.to_string();
    let args = ["delete-account", "--user", "carol", "--admin", &admin];
    let printed = gateway_command(&args, Some(ADMIN_TOKEN));
    let printed: Value = serde_json::from_str(&printed).unwrap();
    assert_eq!(printed["account_deleted"], true, "{printed}");
    assert!(printed["rows_removed"].as_u64().unwrap() >= 3, "{printed}");
    // The node that stored it closes with 4004, the other with 4003.
    assert_eq!(on_b.closed_within_wait(), Some(4004));
    assert_eq!(on_a.closed_within_wait(), Some(4003));
    // Dave, on the other node, hears that she left their group.
    let left = dave.recv_type("message");
    assert!(is_left_by(&left, "carol"), "{left}");
    assert_eq!(left["group"], group.as_str(), "{left}");
    for node in &fleet.nodes {
        assert_eq!(node.connect_with_token(&issued_before).err(), Some(401));
    }
    // What carol sent stays in dave's history.
    assert_eq!(bodies(&mut dave, &conversation), ["from carol"]);
    // In the fleet's database, table by table (every table with a user_id
    // column), after several presence writes: only the revocation of every
    // device and the deletion's time.
    std::thread::sleep(std::time::Duration::from_millis(1_500));
    assert_eq!(
        fleet.database.rows_naming("carol"),
        [("revocations".to_owned(), 2)]
    );
    assert!(!fleet.database.rows_naming("dave").is_empty());
}
