//! The storage rules, over the embedded backend and a real PostgreSQL
//! (row-by-row and set-based paths): replays are idempotent, inboxes are
//! gap-free, acknowledgements are cumulative per conversation and pass the
//! device's own sends, and sync pages skip what a device has.

use chat_protocol::records::{AckRecord, MessageRecord, Record};
use chat_protocol::store_wire::SyncFrom;

use super::embedded::{Embedded, Fsync};
use super::{apply, sync_page, Applied};
use crate::backend::Backend;

/// A backend and whatever keeps it alive (a directory, a server).
struct Fixture {
    backend: Box<dyn Backend>,
    _keep: Box<dyn std::any::Any>,
}

fn embedded() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Embedded::open(&dir.path().join("store"), 1 << 20, Fsync::None).unwrap();
    Fixture {
        backend: Box::new(crate::backend::EmbeddedBackend(store)),
        _keep: Box::new(dir),
    }
}

fn postgres() -> Fixture {
    let server = testkit::postgres::Postgres::start();
    let backend = super::postgres::PostgresBackend::connect(&server.url()).unwrap();
    Fixture {
        backend: Box::new(backend),
        _keep: Box::new(server),
    }
}

/// Runs `rule` on both backends.
macro_rules! on_every_backend {
    ($($rule:ident),* $(,)?) => {
        mod embedded_backend {
            $(#[test] fn $rule() { super::$rule(&super::embedded()); })*
        }
        mod postgres_backend {
            $(#[test] fn $rule() { super::$rule(&super::postgres()); })*
        }
    };
}

on_every_backend!(
    a_replayed_batch_stores_nothing_twice,
    the_senders_other_devices_sync_what_it_sent_and_the_sender_does_not,
    an_ack_is_cumulative_per_conversation_and_passes_own_sends,
    an_ack_for_an_unknown_message_is_reported_unresolved,
    acks_in_one_batch_with_their_messages_apply_in_order,
    a_replay_superseded_by_a_retry_elsewhere_is_not_stored,
);

fn message(id: u64, from: &str, device: &str, to: &str) -> Vec<u8> {
    message_with_client_id(id, from, device, to, &format!("c{id}"))
}

fn message_with_client_id(id: u64, from: &str, device: &str, to: &str, client: &str) -> Vec<u8> {
    let conversation = chat_protocol::ids::direct_conversation_id(from, to);
    MessageRecord {
        message_id: id,
        ts: id,
        conversation: &conversation,
        from,
        from_device: device,
        to,
        client_msg_id: client,
        body: "x",
        media: None,
    }
    .encode()
}

fn ack(user: &str, device: &str, id: u64) -> Vec<u8> {
    AckRecord {
        user,
        device,
        message_id: id,
    }
    .encode()
}

fn run(fixture: &Fixture, raws: &[Vec<u8>], maybe_applied: bool) -> Vec<usize> {
    let records: Vec<Applied<'_>> = raws
        .iter()
        .map(|raw| Applied {
            raw,
            record: Record::decode(raw).unwrap(),
            maybe_applied,
        })
        .collect();
    let mut unresolved = Vec::new();
    let mut writer = fixture.backend.writer().unwrap();
    writer
        .write_batch(&mut |tables| {
            unresolved = apply(tables, &records)?;
            Ok(())
        })
        .unwrap();
    unresolved
}

fn synced_ids(fixture: &Fixture, user: &str, device: &str) -> Vec<u64> {
    let mut reader = fixture.backend.reader().unwrap();
    let page = sync_page(&mut *reader, user, device, SyncFrom::Cursor, 100, 1 << 20).unwrap();
    page.entries
        .iter()
        .map(|e| {
            chat_protocol::records::decode_message(&e.record)
                .unwrap()
                .message_id
        })
        .collect()
}

fn a_replayed_batch_stores_nothing_twice(fixture: &Fixture) {
    let batch = vec![
        message(10, "alice", "phone", "bob"),
        message(11, "alice", "phone", "bob"),
    ];
    run(fixture, &batch, false);
    // A restarted writer re-reads what it had not committed.
    run(fixture, &batch, true);
    assert_eq!(synced_ids(fixture, "bob", "laptop"), [10, 11]);
    let mut reader = fixture.backend.reader().unwrap();
    let inbox = reader.inbox_after("bob", 0, 10).unwrap();
    assert_eq!(
        inbox.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [1, 2],
        "gap-free, once"
    );
    assert_eq!(reader.history("dm:alice:bob", None, 10).unwrap().len(), 2);
}

fn the_senders_other_devices_sync_what_it_sent_and_the_sender_does_not(fixture: &Fixture) {
    run(fixture, &[message(10, "alice", "phone", "bob")], false);
    assert_eq!(synced_ids(fixture, "alice", "laptop"), [10]);
    assert!(synced_ids(fixture, "alice", "phone").is_empty());
}

fn an_ack_is_cumulative_per_conversation_and_passes_own_sends(fixture: &Fixture) {
    run(
        fixture,
        &[
            message(10, "alice", "phone", "bob"),
            message(11, "carol", "tab", "bob"),
            message(12, "bob", "phone", "alice"),
            message(13, "alice", "phone", "bob"),
        ],
        false,
    );
    assert_eq!(synced_ids(fixture, "bob", "phone"), [10, 11, 13]);
    // Acknowledging 13 covers 10 (same conversation) and bob's own 12, not carol's 11.
    assert!(run(fixture, &[ack("bob", "phone", 13)], false).is_empty());
    assert_eq!(synced_ids(fixture, "bob", "phone"), [11]);
    assert_eq!(
        synced_ids(fixture, "bob", "laptop"),
        [10, 11, 12, 13],
        "per device"
    );
    let mut reader = fixture.backend.reader().unwrap();
    let cursor = reader.cursor("bob", "phone").unwrap();
    assert!(cursor.is_acked(4) && !cursor.is_acked(2), "{cursor:?}");
}

fn an_ack_for_an_unknown_message_is_reported_unresolved(fixture: &Fixture) {
    assert_eq!(run(fixture, &[ack("bob", "phone", 99)], false), [0]);
}

fn acks_in_one_batch_with_their_messages_apply_in_order(fixture: &Fixture) {
    let unresolved = run(
        fixture,
        &[
            message(10, "alice", "phone", "bob"),
            ack("bob", "phone", 10),
            message(11, "alice", "phone", "bob"),
            message(12, "carol", "tab", "bob"),
            ack("bob", "phone", 12),
            ack("bob", "phone", 77),
        ],
        false,
    );
    assert_eq!(unresolved, [5], "only the unknown id, by its record index");
    // 10 and 12 acknowledged; 11 (same conversation as 10 but after it) not.
    assert_eq!(synced_ids(fixture, "bob", "phone"), [11]);
}

fn a_replay_superseded_by_a_retry_elsewhere_is_not_stored(fixture: &Fixture) {
    // Node A appended id 10 for client id "k" but died before it was durable;
    // the client retried on node B and got id 20. A's writer, restarted
    // later, replays 10: it must not be stored next to 20.
    run(
        fixture,
        &[message_with_client_id(20, "alice", "phone", "bob", "k")],
        false,
    );
    run(
        fixture,
        &[message_with_client_id(10, "alice", "phone", "bob", "k")],
        true,
    );
    assert_eq!(synced_ids(fixture, "bob", "phone"), [20]);
}
