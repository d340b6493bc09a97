//! The PostgreSQL backend behind a real gateway and storage-writer, against a
//! real PostgreSQL server started for the test: what is acknowledged is in
//! the database, so a node that restarts on an empty data directory still
//! syncs it, answers history from it and recognises a retried send; a
//! sync that fails while the database is away is tried again by the node.

use testkit::gateway as support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::postgres::Postgres;
use support::{Gateway, Next};

#[test]
fn messages_live_in_postgres_across_a_gateway_kill_on_a_fresh_data_dir() {
    let database = Postgres::start();
    let flags = database.writer_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    support::messages_survive_a_node_replacement(&flags);
}

#[test]
fn a_sync_that_storage_fails_is_tried_again_by_the_node() {
    let mut database = Postgres::start();
    let flags = database.writer_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let gateway = Gateway::start(&flags);
    let mut alice = gateway.connect("alice", "phone");
    let mut bob = gateway.connect("bob", "phone");
    for index in 0..10 {
        alice.send_message(&format!("m{index}"), "bob", &format!("m{index}"));
    }
    // Bob sees them live but acknowledges none: a sync offers them again.
    for _ in 0..10 {
        assert_eq!(bob.recv_type("message")["to"], "bob");
    }
    database.stop();
    bob.send(json!({"type": "sync"}));
    let error = bob.recv_type("error");
    assert_eq!(error["code"], "unavailable", "{error}");
    database.restart();
    // Bob does not ask again: the node's retry brings the ten and `synced`.
    // Bounded by the retry schedule: doubling from 0.5 s, at most 10 s apart.
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut again = 0;
    bob.set_timeout(Duration::from_millis(200));
    loop {
        assert!(Instant::now() < deadline, "the sync was not retried");
        match bob.next_frame() {
            Next::Json(frame) if frame["type"] == "message" => again += 1,
            Next::Json(frame) if frame["type"] == "synced" => break,
            Next::Json(_) | Next::Silent => {}
            other => panic!("connection ended: {other:?}"),
        }
    }
    assert_eq!(again, 10, "every unacknowledged message, once");
    assert!(gateway.metric("gateway_sync_retries_total", &[]) >= 1);
}
