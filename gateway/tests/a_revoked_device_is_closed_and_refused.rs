//! Revocation with the real processes: an operator revokes a device through
//! the admin API (or `gateway revoke`); its connection closes with 4003, its
//! token is refused at the upgrade from then on (also after a `kill -9` of
//! the node), its keys leave the key directory, a fresh token enrolls it
//! again; revoking every device of a user closes them on every node.

use serde_json::{json, Value};
use testkit::fleet::{node_id, Fleet};
use testkit::gateway::{
    admin_request as admin, connect_at, fresh_token, gateway_command, token, Gateway,
};

const ADMIN_TOKEN: &str = "admin-token-for-tests-0123456789abcdef";

#[test]
fn a_revoked_device_is_closed_refused_and_loses_its_keys_and_the_revocation_lasts() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().to_str().unwrap();
    let flags = ["--data-dir", dir, "--admin-token", ADMIN_TOKEN];
    let mut gateway = Gateway::start(&flags);
    let mut phone = gateway.connect("alice", "phone");
    let mut laptop = gateway.connect("alice", "laptop");
    // Tokens issued before any revocation.
    let issued_before: Vec<(&str, String)> = ["phone", "laptop", "tablet"]
        .into_iter()
        .map(|device| (device, token("alice", device)))
        .collect();
    phone.upload_keys();
    laptop.upload_keys();

    // Only the operator may revoke.
    let revoke_phone = "/revoke?user=alice&device=phone";
    assert_eq!(admin(gateway.admin, "POST", revoke_phone, None).0, 401);
    let wrong = "admin-token-for-tests-0123456789abcdeX";
    assert_eq!(
        admin(gateway.admin, "POST", revoke_phone, Some(wrong)).0,
        401
    );
    assert_eq!(
        admin(gateway.admin, "GET", revoke_phone, Some(ADMIN_TOKEN)).0,
        405
    );
    let bad = admin(
        gateway.admin,
        "POST",
        "/revoke?user=al%20ice",
        Some(ADMIN_TOKEN),
    );
    assert_eq!(bad.0, 400, "{}", bad.1);

    let (status, answer) = admin(gateway.admin, "POST", revoke_phone, Some(ADMIN_TOKEN));
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["keys_removed"], 1);
    assert_eq!(answer["closed_here"], 1);
    assert_eq!(phone.closed_within_wait(), Some(4003));
    // The other device is untouched, and the key directory lists only it.
    laptop.send(json!({"type": "devices", "user": "alice"}));
    assert_eq!(laptop.recv_type("devices")["devices"], json!(["laptop"]));
    // The phone's token no longer opens a connection.
    assert_eq!(
        gateway.connect_with_token(&issued_before[0].1).err(),
        Some(401)
    );
    assert_eq!(
        gateway.metric("gateway_handshakes_refused_total", &["reason=\"revoked\""]),
        1
    );

    // Enrolled again with a token issued after the revocation.
    let renewed = fresh_token("alice", "phone");
    let mut phone = gateway
        .connect_with_token(&renewed)
        .expect("a fresh token works");
    assert_eq!(phone.recv()["type"], "hello");

    // Every device, with the operator command.
    let admin = gateway.admin.to_string();
    let args = ["revoke", "--user", "alice", "--admin", &admin];
    let printed = gateway_command(&args, Some(ADMIN_TOKEN));
    let printed: Value = serde_json::from_str(&printed).unwrap();
    assert_eq!(printed["device"], Value::Null);
    assert_eq!(printed["closed_here"], 2);
    assert_eq!(laptop.closed_within_wait(), Some(4003));
    assert_eq!(phone.closed_within_wait(), Some(4003));

    // Durable: after a kill -9 the node still refuses the tokens issued
    // before, and takes one issued after.
    gateway.kill9();
    let gateway = Gateway::start(&flags);
    for (device, old) in &issued_before {
        assert_eq!(gateway.connect_with_token(old).err(), Some(401), "{device}");
    }
    let mut tablet = gateway
        .connect_with_token(&fresh_token("alice", "tablet"))
        .expect("a token issued after the revocation");
    assert_eq!(tablet.recv()["type"], "hello");
    let mut bob = gateway.connect("bob", "phone");
    bob.ping();
}

#[test]
fn the_revocation_api_is_off_without_an_admin_token() {
    let gateway = Gateway::start(&[]);
    let (status, body) = admin(
        gateway.admin,
        "POST",
        "/revoke?user=alice",
        Some(ADMIN_TOKEN),
    );
    assert_eq!(status, 403, "{body}");
    assert!(body["error"].as_str().unwrap().contains("admin_token"));
}

#[test]
fn revoking_a_user_closes_their_devices_on_every_node() {
    let fleet = Fleet::start_joined(2, &["--admin-token", ADMIN_TOKEN]);
    let mut on_a = fleet.nodes[0].connect("carol", "phone");
    let mut on_b = connect_at(fleet.nodes[1].ws, "carol", "laptop");
    let mut dave = fleet.nodes[1].connect("dave", "phone");
    let issued_before = token("carol", "laptop");
    assert_ne!(node_id(&fleet.nodes[0]), node_id(&fleet.nodes[1]));

    let (status, answer) = admin(
        fleet.nodes[0].admin,
        "POST",
        "/revoke?user=carol",
        Some(ADMIN_TOKEN),
    );
    assert_eq!(status, 200, "{answer}");
    assert_eq!(on_a.closed_within_wait(), Some(4003));
    assert_eq!(
        on_b.closed_within_wait(),
        Some(4003),
        "closed on the other node too"
    );
    for node in &fleet.nodes {
        assert_eq!(node.connect_with_token(&issued_before).err(), Some(401));
    }
    dave.ping();
}
