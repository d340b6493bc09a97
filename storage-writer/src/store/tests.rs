//! The storage rules over the embedded backend: replays are idempotent,
//! inboxes are gap-free, acknowledgements are cumulative per conversation and
//! pass the device's own sends, and sync pages skip what a device has.

use chat_protocol::records::{AckRecord, MessageRecord, Record};
use chat_protocol::store_wire::SyncFrom;

use super::embedded::{Embedded, Fsync};
use super::{apply, sync_page, Applied, Tables};

struct Fixture {
    _dir: tempfile::TempDir,
    store: Embedded,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Embedded::open(&dir.path().join("store"), 1 << 20, Fsync::None).unwrap();
    Fixture { _dir: dir, store }
}

fn message(id: u64, from: &str, device: &str, to: &str) -> Vec<u8> {
    let conversation = chat_protocol::ids::direct_conversation_id(from, to);
    MessageRecord {
        message_id: id,
        ts: id,
        conversation: &conversation,
        from,
        from_device: device,
        to,
        client_msg_id: &format!("c{id}"),
        body: "x",
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
    let mut writer = fixture.store.writer();
    apply(&mut writer, &records).unwrap()
}

fn synced_ids(fixture: &Fixture, user: &str, device: &str) -> Vec<u64> {
    let mut reader = fixture.store.clone();
    let page = sync_page(&mut reader, user, device, SyncFrom::Cursor, 100, 1 << 20).unwrap();
    page.entries
        .iter()
        .map(|e| {
            chat_protocol::records::decode_message(&e.record)
                .unwrap()
                .message_id
        })
        .collect()
}

#[test]
fn a_replayed_batch_stores_nothing_twice() {
    let fixture = fixture();
    let batch = vec![
        message(10, "alice", "phone", "bob"),
        message(11, "alice", "phone", "bob"),
    ];
    run(&fixture, &batch, false);
    // A restarted writer re-reads what it had not committed.
    run(&fixture, &batch, true);
    assert_eq!(synced_ids(&fixture, "bob", "laptop"), [10, 11]);
    let mut reader = fixture.store.clone();
    let inbox = reader.inbox_after("bob", 0, 10).unwrap();
    assert_eq!(
        inbox.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [1, 2],
        "gap-free, once"
    );
    assert_eq!(reader.history("dm:alice:bob", None, 10).unwrap().len(), 2);
}

#[test]
fn the_senders_other_devices_sync_what_it_sent_and_the_sender_does_not() {
    let fixture = fixture();
    run(&fixture, &[message(10, "alice", "phone", "bob")], false);
    assert_eq!(synced_ids(&fixture, "alice", "laptop"), [10]);
    assert!(synced_ids(&fixture, "alice", "phone").is_empty());
}

#[test]
fn an_ack_is_cumulative_per_conversation_and_passes_own_sends() {
    let fixture = fixture();
    run(
        &fixture,
        &[
            message(10, "alice", "phone", "bob"),
            message(11, "carol", "tab", "bob"),
            message(12, "bob", "phone", "alice"),
            message(13, "alice", "phone", "bob"),
        ],
        false,
    );
    assert_eq!(synced_ids(&fixture, "bob", "phone"), [10, 11, 13]);
    // Acknowledging 13 covers 10 (same conversation) and bob's own 12, not carol's 11.
    assert!(run(&fixture, &[ack("bob", "phone", 13)], false).is_empty());
    assert_eq!(synced_ids(&fixture, "bob", "phone"), [11]);
    assert_eq!(
        synced_ids(&fixture, "bob", "laptop"),
        [10, 11, 12, 13],
        "per device"
    );
    let mut reader = fixture.store.clone();
    let cursor = reader.cursor("bob", "phone").unwrap();
    assert!(cursor.is_acked(4) && !cursor.is_acked(2), "{cursor:?}");
}

#[test]
fn an_ack_for_an_unknown_message_is_reported_unresolved() {
    let fixture = fixture();
    assert_eq!(run(&fixture, &[ack("bob", "phone", 99)], false), [0]);
}
