//! The storage rules, over the embedded backend and a real PostgreSQL
//! (row-by-row and set-based paths): replays are idempotent, inboxes are
//! gap-free, acknowledgements are cumulative per conversation and pass the
//! device's own sends, and sync pages skip what a device has.

use chat_protocol::records::{
    AckRecord, Event, GroupAction, MessageRecord, PresenceEntry, PresenceRecord, Record,
};
use chat_protocol::store_wire::SyncFrom;

use super::embedded::{Embedded, Fsync};
use super::{apply, sync_page, Applied};
use crate::store::{Backend, Tables};

/// Rows naming a user, per table: (table, count).
type RowsNaming = Box<dyn Fn(&str) -> Vec<(String, usize)>>;

/// A backend and whatever keeps it alive (a directory, a server).
struct Fixture {
    backend: Box<dyn Backend>,
    /// Every row that names a user, per table, found by looking at every
    /// table there is (not at a list the code under test also uses).
    rows_naming: RowsNaming,
    _keep: Box<dyn std::any::Any>,
}

/// The embedded store with a day's retention: time buckets of 90 minutes.
fn embedded() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let day = std::time::Duration::from_secs(24 * 60 * 60);
    let store = Embedded::open(&dir.path().join("store"), 1 << 20, Fsync::None, Some(day)).unwrap();
    let audited = store.clone();
    Fixture {
        backend: Box::new(crate::backend::EmbeddedBackend(store)),
        rows_naming: Box::new(move |user| audited.rows_naming(user).unwrap()),
        _keep: Box::new(dir),
    }
}

fn postgres() -> Fixture {
    let server = std::rc::Rc::new(testkit::postgres::Postgres::start());
    let backend = super::postgres::PostgresBackend::connect(&server.url()).unwrap();
    let audited = server.clone();
    Fixture {
        backend: Box::new(backend),
        rows_naming: Box::new(move |user| audited.rows_naming(user)),
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
    roles_follow_the_changes_and_history_starts_at_joining,
    push_targets_are_kept_per_device_replaced_removed_and_revoked,
    a_replayed_batch_stores_nothing_twice,
    the_senders_other_devices_sync_what_it_sent_and_the_sender_does_not,
    an_ack_is_cumulative_per_conversation_and_passes_own_sends,
    an_ack_for_an_unknown_message_is_reported_unresolved,
    acks_in_one_batch_with_their_messages_apply_in_order,
    a_replay_superseded_by_a_retry_elsewhere_is_not_stored,
    a_group_message_reaches_each_listed_inbox_and_is_stored_without_the_list,
    membership_changes_update_both_directions_in_order,
    presence_is_told_only_to_users_who_share_a_conversation,
    a_sync_made_since_an_id_offers_what_a_cumulative_ack_passed,
    a_revocation_is_kept_and_takes_the_devices_keys_with_it,
    joins_that_each_fit_the_bound_but_not_together_are_refused_past_it,
    idempotency_keys_older_than_the_window_are_removed_in_batches,
    offline_presence_older_than_the_retention_is_removed_in_batches,
    messages_older_than_the_retention_leave_history_inbox_and_sync,
    a_delete_by_its_sender_leaves_a_tombstone_and_others_are_refused,
    a_deleted_account_leaves_no_row_but_its_revocation,
    devices_not_seen_for_the_retention_lose_their_per_device_rows,
);

/// A message of group `group` from `from`, to `recipients`, with an optional event.
fn group_message(
    id: u64,
    group: &str,
    from: &str,
    recipients: &[&str],
    event: Option<Event<'_>>,
) -> Vec<u8> {
    let conversation = chat_protocol::ids::group_conversation_id(group);
    MessageRecord {
        message_id: id,
        ts: id,
        conversation: &conversation,
        from,
        from_device: "d",
        to: group,
        client_msg_id: &format!("c{id}"),
        body: "x",
        media: None,
        event,
        recipients: recipients.to_vec(),
        bodies: Vec::new(),
    }
    .encode()
}

fn a_group_message_reaches_each_listed_inbox_and_is_stored_without_the_list(fixture: &Fixture) {
    let members = ["alice", "bob", "carol"];
    run(
        fixture,
        &[group_message(10, "g1", "alice", &members, None)],
        false,
    );
    // Replayed: nothing twice.
    run(
        fixture,
        &[group_message(10, "g1", "alice", &members, None)],
        true,
    );
    assert_eq!(synced_ids(fixture, "bob", "phone"), [10]);
    assert_eq!(synced_ids(fixture, "carol", "phone"), [10]);
    assert_eq!(
        synced_ids(fixture, "alice", "laptop"),
        [10],
        "sender's other device"
    );
    assert!(
        synced_ids(fixture, "alice", "d").is_empty(),
        "the sending device"
    );
    assert!(
        synced_ids(fixture, "dave", "phone").is_empty(),
        "not a recipient"
    );
    let mut reader = fixture.backend.reader().unwrap();
    let stored = reader.history("grp:g1", None, 10).unwrap();
    assert_eq!(stored.len(), 1);
    let message = chat_protocol::records::decode_message(&stored[0]).unwrap();
    assert!(
        message.recipients.is_empty(),
        "stored without its recipient list"
    );
}

fn membership_changes_update_both_directions_in_order(fixture: &Fixture) {
    let create = Event::Group {
        action: GroupAction::Create,
        members: vec!["alice", "bob", "carol"],
    };
    let remove = Event::Group {
        action: GroupAction::Remove,
        members: vec!["bob"],
    };
    let add = Event::Group {
        action: GroupAction::Add,
        members: vec!["dave"],
    };
    let all = ["alice", "bob", "carol", "dave"];
    // In one batch (the set-based path) and again replayed row by row.
    let batch = [
        group_message(1, "g2", "alice", &all[..3], Some(create)),
        group_message(2, "g2", "alice", &all[..3], Some(remove)),
        group_message(3, "g2", "carol", &["alice", "carol", "dave"], Some(add)),
    ];
    run(fixture, &batch, false);
    run(fixture, &batch, true);
    let mut reader = fixture.backend.reader().unwrap();
    let members: Vec<String> = reader
        .member_roles("g2")
        .unwrap()
        .into_iter()
        .map(|role| role.user)
        .collect();
    assert_eq!(members, ["alice", "carol", "dave"]);
    assert_eq!(reader.groups_of("dave").unwrap(), ["g2"]);
    assert!(reader.groups_of("bob").unwrap().is_empty());
    assert!(reader.member_roles("nope").unwrap().is_empty());
    // Bob saw the change that removed him, and nothing after it.
    assert_eq!(synced_ids(fixture, "bob", "phone"), [1, 2]);
}

fn presence_is_told_only_to_users_who_share_a_conversation(fixture: &Fixture) {
    let create = Event::Group {
        action: GroupAction::Create,
        members: vec!["alice", "bob"],
    };
    let presence = PresenceRecord {
        node: 3,
        entries: vec![
            PresenceEntry {
                user: "bob",
                online: true,
                last_seen_ms: 50,
            },
            PresenceEntry {
                user: "erin",
                online: false,
                last_seen_ms: 40,
            },
            PresenceEntry {
                user: "frank",
                online: true,
                last_seen_ms: 45,
            },
        ],
    };
    run(
        fixture,
        &[
            group_message(1, "g3", "alice", &["alice", "bob"], Some(create)),
            message(2, "alice", "d", "erin"),
            presence.encode(),
            // Bob's other device was on node 4 and left: node 3 still has him.
            PresenceRecord {
                node: 4,
                entries: vec![PresenceEntry {
                    user: "bob",
                    online: false,
                    last_seen_ms: 70,
                }],
            }
            .encode(),
        ],
        false,
    );
    let mut reader = fixture.backend.reader().unwrap();
    let users: Vec<String> = ["bob", "erin", "frank"].map(String::from).to_vec();
    let answers = super::presence(&mut *reader, "alice", &users).unwrap();
    assert!(answers[0].shared && answers[0].online, "a fellow member");
    assert_eq!(answers[0].updated_ms, 50, "node 3's online row");
    assert_eq!(answers[0].last_seen_ms, Some(70), "the latest any node saw");
    assert!(answers[1].shared && !answers[1].online);
    assert_eq!(answers[1].last_seen_ms, Some(40), "a direct conversation");
    assert!(!answers[2].shared, "a stranger");
    assert!(
        !answers[2].online && answers[2].last_seen_ms.is_none(),
        "nothing told"
    );
    // Erin shares a conversation with alice, not with bob.
    let answers = super::presence(&mut *reader, "erin", &["bob".to_string()]).unwrap();
    assert!(!answers[0].shared);
}

fn offline_presence_older_than_the_retention_is_removed_in_batches(fixture: &Fixture) {
    // Three users offline since 100, one offline since 900, one online
    // since 50 (its node refreshes it), on node 1; carol also on node 2.
    let entry = |user, online, last_seen_ms| PresenceEntry {
        user,
        online,
        last_seen_ms,
    };
    let records = [
        PresenceRecord {
            node: 1,
            entries: vec![
                entry("ann", false, 100),
                entry("ben", false, 100),
                entry("carol", false, 100),
                entry("dan", false, 900),
                entry("eve", true, 50),
            ],
        }
        .encode(),
        PresenceRecord {
            node: 2,
            entries: vec![entry("carol", false, 950)],
        }
        .encode(),
    ];
    run(fixture, &records, false);
    let mut writer = fixture.backend.writer().unwrap();
    let mut passes = Vec::new();
    for _ in 0..3 {
        writer
            .write_batch(&mut |tables| {
                passes.push(tables.expire_presence(500, 2)?);
                Ok(())
            })
            .unwrap();
    }
    assert_eq!(passes, [2, 1, 0], "at most the limit per batch");
    let mut reader = fixture.backend.reader().unwrap();
    let seen = |reader: &mut dyn Tables, user| -> Vec<(bool, u64)> {
        let mut rows: Vec<(bool, u64)> = reader
            .presence(user)
            .unwrap()
            .iter()
            .map(|row| (row.online, row.last_seen_ms))
            .collect();
        rows.sort();
        rows
    };
    assert!(
        seen(&mut *reader, "ann").is_empty(),
        "offline since 100: gone"
    );
    assert!(seen(&mut *reader, "ben").is_empty());
    assert_eq!(
        seen(&mut *reader, "carol"),
        [(false, 950)],
        "node 2's row is recent"
    );
    assert_eq!(
        seen(&mut *reader, "dan"),
        [(false, 900)],
        "within the retention"
    );
    assert_eq!(seen(&mut *reader, "eve"), [(true, 50)], "online rows stay");
}

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
        event: None,
        bodies: Vec::new(),
        recipients: Vec::new(),
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

/// `run` with a group bound; returns the refused indices.
fn run_bounded(fixture: &Fixture, raws: &[Vec<u8>], bound: usize) -> Vec<usize> {
    apply_batch(fixture, raws, false, bound).refused
}

/// Applies `raws` as one batch, as the commit thread does.
fn apply_batch(
    fixture: &Fixture,
    raws: &[Vec<u8>],
    maybe_applied: bool,
    bound: usize,
) -> super::Outcome {
    let records: Vec<Applied<'_>> = raws
        .iter()
        .map(|raw| Applied {
            raw,
            record: Record::decode(raw).unwrap(),
            maybe_applied,
        })
        .collect();
    let mut outcome = super::Outcome::default();
    let mut writer = fixture.backend.writer().unwrap();
    writer
        .write_batch(&mut |tables| {
            outcome = apply(tables, &records, bound)?;
            Ok(())
        })
        .unwrap();
    outcome
}

fn joins_that_each_fit_the_bound_but_not_together_are_refused_past_it(fixture: &Fixture) {
    let event = |action, members: Vec<&'static str>| Some(Event::Group { action, members });
    let create = group_message(
        30,
        "g9",
        "alice",
        &["alice", "bob"],
        event(GroupAction::Create, vec!["alice", "bob"]),
    );
    assert!(run_bounded(fixture, &[create], 3).is_empty());
    // Two nodes each checked their add against {alice, bob}: both fit a
    // bound of 3 alone. In ring order the second passes it, and a removal
    // after it makes room for the third.
    let batch = [
        group_message(
            31,
            "g9",
            "alice",
            &["alice", "bob", "carol"],
            event(GroupAction::Add, vec!["carol"]),
        ),
        group_message(
            32,
            "g9",
            "bob",
            &["alice", "bob", "dave"],
            event(GroupAction::Add, vec!["dave"]),
        ),
        group_message(
            33,
            "g9",
            "alice",
            &["alice", "bob", "carol"],
            event(GroupAction::Remove, vec!["carol"]),
        ),
        group_message(
            34,
            "g9",
            "bob",
            &["alice", "bob", "erin"],
            event(GroupAction::Add, vec!["erin"]),
        ),
    ];
    assert_eq!(
        run_bounded(fixture, &batch, 3),
        [1],
        "only dave's add is refused"
    );
    let mut reader = fixture.backend.reader().unwrap();
    let members: Vec<String> = reader
        .member_roles("g9")
        .unwrap()
        .into_iter()
        .map(|role| role.user)
        .collect();
    assert_eq!(members, ["alice", "bob", "erin"]);
    // The refused change is stored nowhere: not in history, not in dave's inbox.
    let conversation = chat_protocol::ids::group_conversation_id("g9");
    let history: Vec<u64> = super::history(&mut *reader, &conversation, None, None, 0, 50)
        .unwrap()
        .iter()
        .map(|raw| {
            chat_protocol::records::decode_message(raw)
                .unwrap()
                .message_id
        })
        .collect();
    assert_eq!(history, [34, 33, 31, 30]);
    assert!(synced_ids(fixture, "dave", "phone").is_empty());
}

fn idempotency_keys_older_than_the_window_are_removed_in_batches(fixture: &Fixture) {
    use chat_protocol::snowflake::first_id_at;
    let day = 24 * 60 * 60 * 1000;
    let now = super::unix_ms_now();
    // Three sends two days old, two from now, by message ids of those times.
    let old: Vec<u64> = (0..3).map(|i| first_id_at(now - 2 * day) + i).collect();
    let new: Vec<u64> = (0..2).map(|i| first_id_at(now) + i).collect();
    let batch: Vec<Vec<u8>> = old
        .iter()
        .chain(&new)
        .map(|id| message(*id, "alice", "phone", "bob"))
        .collect();
    run(fixture, &batch, false);
    let cutoff = first_id_at(now - day);
    let mut writer = fixture.backend.writer().unwrap();
    let mut passes = Vec::new();
    for _ in 0..3 {
        writer
            .write_batch(&mut |tables| {
                passes.push(tables.expire_sends(cutoff, 2)?);
                Ok(())
            })
            .unwrap();
    }
    assert_eq!(
        passes,
        [2, 1, 0],
        "at most the limit per batch, oldest first"
    );
    let mut reader = fixture.backend.reader().unwrap();
    for id in &old {
        assert_eq!(
            reader.send_of("alice", "phone", &format!("c{id}")).unwrap(),
            None
        );
    }
    for id in &new {
        assert_eq!(
            reader.send_of("alice", "phone", &format!("c{id}")).unwrap(),
            Some(*id)
        );
    }
    let recent: Vec<u64> = reader
        .recent_sends("alice", "phone", 0, 100)
        .unwrap()
        .iter()
        .map(|send| send.message_id)
        .collect();
    assert_eq!(recent, [new[1], new[0]], "the warm-up list lost them too");
    // The messages themselves stay: only the keys expire.
    assert_eq!(synced_ids(fixture, "bob", "phone").len(), 5);
}

fn a_delete_by_its_sender_leaves_a_tombstone_and_others_are_refused(fixture: &Fixture) {
    use chat_protocol::records::decode_message;
    let conversation = chat_protocol::ids::direct_conversation_id("alice", "bob");
    let deletion = |id: u64, from: &str, to: &str, target: u64| -> Vec<u8> {
        let raw = message_with_client_id(id, from, "phone", to, &format!("d{id}"));
        MessageRecord {
            body: "",
            event: Some(Event::Delete { target }),
            ..decode_message(&raw).unwrap()
        }
        .encode()
    };
    // In one batch: the message, bob's delete of it, a delete naming it
    // from another conversation, and alice's own delete.
    let raws = [
        message(10, "alice", "phone", "bob"),
        deletion(11, "bob", "alice", 10),
        deletion(12, "carol", "alice", 10),
        deletion(13, "alice", "bob", 10),
    ];
    for replay in [false, true] {
        let refused: Vec<usize> = apply_batch(fixture, &raws, replay, usize::MAX)
            .deletes_refused
            .iter()
            .map(|(i, _)| *i)
            .collect();
        assert_eq!(
            refused,
            [1, 2],
            "replay {replay}: only alice may delete hers"
        );
    }
    let mut reader = fixture.backend.reader().unwrap();
    let stored = reader
        .message(&conversation, 10)
        .unwrap()
        .expect("the row stays");
    let tombstone = decode_message(&stored).unwrap();
    assert_eq!((tombstone.body, tombstone.from), ("", "alice"));
    assert_eq!(tombstone.event, Some(Event::Delete { target: 10 }));
    assert!(
        reader.message(&conversation, 11).unwrap().is_none(),
        "a refused delete is not stored"
    );
    assert!(
        reader.message(&conversation, 13).unwrap().is_some(),
        "the delete is stored"
    );
    assert_eq!(
        synced_ids(fixture, "bob", "laptop"),
        [10, 13],
        "bob syncs the tombstone and the delete"
    );
}

/// Calls `expire_messages` until it says nothing old is left (bounded).
fn expire_all(fixture: &Fixture, before_id: u64, limit: usize) -> u64 {
    let mut writer = fixture.backend.writer().unwrap();
    let mut rows = 0;
    for _ in 0..100 {
        let expired = expire_once(&mut *writer, before_id, limit);
        rows += expired.rows;
        if !expired.more {
            return rows;
        }
    }
    panic!("expire_messages never finished");
}

fn messages_older_than_the_retention_leave_history_inbox_and_sync(fixture: &Fixture) {
    use chat_protocol::snowflake::first_id_at;
    let day = 24 * 60 * 60 * 1000;
    let now = super::unix_ms_now();
    let conversation = chat_protocol::ids::direct_conversation_id("alice", "bob");
    // Three messages two days old, two from now; carol only has old ones.
    let old: Vec<u64> = (0..3).map(|i| first_id_at(now - 2 * day) + i).collect();
    let new: Vec<u64> = (0..2).map(|i| first_id_at(now) + i).collect();
    let mut batch: Vec<Vec<u8>> = old
        .iter()
        .chain(&new)
        .map(|id| message(*id, "alice", "phone", "bob"))
        .collect();
    let carols: Vec<u64> = (10..12).map(|i| first_id_at(now - 2 * day) + i).collect();
    batch.extend(
        carols
            .iter()
            .map(|id| message(*id, "dave", "phone", "carol")),
    );
    run(fixture, &batch, false);
    let floor = super::retention_floor(now, Some(std::time::Duration::from_millis(day)));
    assert!(old.iter().all(|id| *id < floor) && new.iter().all(|id| *id >= floor));

    let page = sync_from_cursor;
    let ids = page_ids;
    let history = |fixture: &Fixture, floor: u64| -> Vec<u64> {
        let mut reader = fixture.backend.reader().unwrap();
        record_ids(&super::history(&mut *reader, &conversation, None, None, floor, 100).unwrap())
    };

    // Past the floor, before any row is removed: gone for history and sync
    // already, and the device is told how many it missed.
    let before = page(fixture, "bob", floor);
    assert_eq!(ids(&before), new);
    assert_eq!(before.expired, 3, "bob missed three for good");
    assert_eq!(history(fixture, floor), [new[1], new[0]]);
    assert_eq!(history(fixture, 0).len(), 5, "no floor: all still stored");

    let removed = expire_all(fixture, floor, 2);
    assert!(removed >= 5, "the old rows were removed: {removed}");
    let mut reader = fixture.backend.reader().unwrap();
    for id in &old {
        assert_eq!(reader.message(&conversation, *id).unwrap(), None);
        assert_eq!(reader.inbox_entry_of("bob", *id).unwrap(), None);
        assert_eq!(reader.inbox_entry_of("alice", *id).unwrap(), None);
    }
    for id in &new {
        assert!(
            reader.message(&conversation, *id).unwrap().is_some(),
            "newer ones stay"
        );
    }
    assert_eq!(
        history(fixture, 0),
        [new[1], new[0]],
        "removed, even without a floor"
    );
    // The gap the removal left is still reported, and the sequences go on.
    let after = page(fixture, "bob", floor);
    assert_eq!((ids(&after), after.expired), (new.clone(), 3));
    assert_eq!(reader.inbox_head("bob").unwrap(), 5);
    let carol = page(fixture, "carol", floor);
    assert_eq!(
        (ids(&carol), carol.expired),
        (vec![], 2),
        "every entry gone"
    );
    assert_eq!(
        reader.inbox_head("carol").unwrap(),
        2,
        "her sequence survives"
    );

    // An acknowledgement past the gap folds the cursor over it.
    run(fixture, &[ack("bob", "laptop", new[1])], false);
    let cursor = reader.cursor("bob", "laptop").unwrap();
    assert_eq!((cursor.through, cursor.above.len()), (5, 0), "{cursor:?}");
    assert_eq!(
        page(fixture, "bob", floor).expired,
        0,
        "nothing owed any more"
    );
    // A new message never reuses a removed sequence.
    let later = first_id_at(now) + 100;
    run(fixture, &[message(later, "dave", "phone", "carol")], false);
    let mut reader = fixture.backend.reader().unwrap();
    assert_eq!(
        reader.inbox_entry_of("carol", later).unwrap().map(|e| e.0),
        Some(3)
    );
    let carol = page(fixture, "carol", floor);
    assert_eq!((ids(&carol), carol.expired), (vec![later], 2));
}

#[test]
fn postgres_creates_partitions_ahead_and_drops_them_whole_behind_the_retention() {
    use chat_protocol::snowflake::first_id_at;
    let day = 24 * 60 * 60 * 1000;
    let server = testkit::postgres::Postgres::start();
    let fixture = Fixture {
        backend: Box::new(
            super::postgres::PostgresBackend::connect_with(&server.url(), day).unwrap(),
        ),
        rows_naming: Box::new(|_| unreachable!("not audited here")),
        _keep: Box::new(()),
    };
    let now = super::unix_ms_now();
    let mut client = postgres::Client::connect(&server.url(), postgres::NoTls).unwrap();
    let names = |client: &mut postgres::Client| -> Vec<String> {
        client
            .query(
                "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
                 WHERE i.inhparent = 'messages'::regclass ORDER BY 1",
                &[],
            )
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect()
    };
    let today = now / day * day;
    let window = |start: u64| format!("messages_p{start}");
    let made = names(&mut client);
    for ahead in 0..=3 {
        assert!(made.contains(&window(today + ahead * day)), "{made:?}");
    }
    assert!(made.contains(&"messages_default".to_string()));
    // Windows from two days ago, as a writer running then made them.
    let mut writer = fixture.backend.writer().unwrap();
    writer
        .write_batch(&mut |tables| {
            tables.partitions_ahead(now - 2 * day)?;
            Ok(())
        })
        .unwrap();
    let old = first_id_at(now - 2 * day);
    let new = first_id_at(now);
    run(
        &fixture,
        &[
            message(old, "alice", "phone", "bob"),
            message(new, "alice", "phone", "bob"),
        ],
        false,
    );
    let in_window: i64 = client
        .query_one(
            &format!(
                "SELECT count(*) FROM {}",
                window((now - 2 * day) / day * day)
            ),
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(in_window, 1, "the old row went to its window's partition");
    let floor = first_id_at(now - day);
    expire_all(&fixture, floor, 1000);
    let left = names(&mut client);
    assert!(
        !left.contains(&window((now - 2 * day) / day * day)),
        "dropped whole: {left:?}"
    );
    assert!(
        left.contains(&window((now - day) / day * day)),
        "still covered: {left:?}"
    );
    let inbox_left = client
        .query_one(
            "SELECT count(*) FROM pg_class WHERE relname = $1",
            &[&format!("inbox_p{}", (now - 2 * day) / day * day)],
        )
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(inbox_left, 0, "the inbox's partition too");
    assert_eq!(synced_ids(&fixture, "bob", "laptop"), [new]);
}

fn run(fixture: &Fixture, raws: &[Vec<u8>], maybe_applied: bool) -> Vec<usize> {
    apply_batch(fixture, raws, maybe_applied, usize::MAX).unresolved
}

fn synced_ids(fixture: &Fixture, user: &str, device: &str) -> Vec<u64> {
    synced_ids_from(fixture, user, device, SyncFrom::Cursor)
}

fn synced_ids_from(fixture: &Fixture, user: &str, device: &str, from: SyncFrom) -> Vec<u64> {
    let mut reader = fixture.backend.reader().unwrap();
    let page = sync_page(&mut *reader, user, device, from, 0, 100, 1 << 20).unwrap();
    page_ids(&page)
}

/// The message ids of a sync page's entries, in order.
fn page_ids(page: &super::SyncPage) -> Vec<u64> {
    let records: Vec<Vec<u8>> = page.entries.iter().map(|e| e.record.clone()).collect();
    record_ids(&records)
}

/// The message ids of stored `Message` records, in order.
fn record_ids(records: &[Vec<u8>]) -> Vec<u64> {
    records
        .iter()
        .map(|raw| {
            chat_protocol::records::decode_message(raw)
                .unwrap()
                .message_id
        })
        .collect()
}

fn a_sync_made_since_an_id_offers_what_a_cumulative_ack_passed(fixture: &Fixture) {
    // Bob's laptop got 1-40 and 42-60 live, never 41 (lost on its way), and
    // acknowledged 60, which covers 41 too.
    let messages: Vec<Vec<u8>> = (1..=60)
        .map(|id| message(id * 1_000, "alice", "phone", "bob"))
        .collect();
    run(fixture, &messages, false);
    run(fixture, &[ack("bob", "laptop", 60_000)], false);
    assert!(
        synced_ids(fixture, "bob", "laptop").is_empty(),
        "41 is hidden by the ack"
    );
    let made_since =
        |first: u64| synced_ids_from(fixture, "bob", "laptop", SyncFrom::MadeSince(first));
    let expected: Vec<u64> = (41..=60).map(|id| id * 1_000).collect();
    assert_eq!(
        made_since(41_000),
        expected,
        "from the first id at or after"
    );
    assert_eq!(made_since(40_500), expected, "an id between two messages");
    assert_eq!(
        made_since(1).len(),
        60,
        "older than every message: all of them"
    );
    assert!(
        made_since(61_000).is_empty(),
        "newer than every message: none"
    );
    // A device that never acknowledged anything: the search still starts
    // at the right place.
    let from = SyncFrom::MadeSince(55_000);
    assert_eq!(synced_ids_from(fixture, "bob", "tablet", from).len(), 6);
    // The sender's own device gets none of its own sends, as in any sync.
    let from = SyncFrom::MadeSince(1);
    assert!(synced_ids_from(fixture, "alice", "phone", from).is_empty());
}

/// Gives `user`'s `device` keys with `prekeys` one-time prekeys and a push target.
fn enroll(tables: &mut dyn Tables, user: &str, device: &str, prekeys: usize) {
    let prekeys: Vec<String> = (0..prekeys).map(|i| format!("k{i}")).collect();
    let upload = super::DeviceKeys {
        user,
        device,
        identity_key: "i",
        signed_prekey: "s",
        signed_prekey_signature: "g",
        one_time_prekeys: &prekeys,
    };
    tables.put_device_keys(&upload).unwrap();
    let target = br#"{"kind":"fcm","token":"t"}"#;
    tables.put_push_target(user, device, Some(target)).unwrap();
}

fn a_deleted_account_leaves_no_row_but_its_revocation(fixture: &Fixture) {
    let create = Event::Group {
        action: GroupAction::Create,
        members: vec!["alice", "bob", "carol"],
    };
    let presence = PresenceRecord {
        node: 3,
        entries: vec![
            PresenceEntry {
                user: "alice",
                online: false,
                last_seen_ms: 40,
            },
            PresenceEntry {
                user: "bob",
                online: true,
                last_seen_ms: 41,
            },
        ],
    };
    run(
        fixture,
        &[
            group_message(1, "g1", "alice", &["alice", "bob", "carol"], Some(create)),
            message(2, "alice", "phone", "bob"),
            message(3, "bob", "phone", "alice"),
            message(4, "alice", "laptop", "carol"),
            group_message(5, "g1", "bob", &["alice", "bob", "carol"], None),
            ack("alice", "phone", 3),
            ack("bob", "phone", 2),
            presence.encode(),
        ],
        false,
    );
    let mut tables = fixture.backend.reader().unwrap();
    for (user, device) in [("alice", "phone"), ("alice", "laptop"), ("bob", "phone")] {
        enroll(&mut *tables, user, device, 1);
    }
    tables.revoke("alice", Some("tablet"), 100).unwrap();
    tables.put_device_seen("alice", "phone", 150).unwrap();
    tables.put_device_seen("bob", "phone", 150).unwrap();
    let before = (fixture.rows_naming)("alice");
    for table in [
        "sends",
        "inbox",
        "cursors",
        "device_keys",
        "prekeys",
        "push_targets",
        "devices_seen",
    ] {
        assert!(
            // (PostgreSQL's inbox is its partitions: inbox_default, ...)
            before.iter().any(|(name, _)| name.starts_with(table)),
            "alice has rows in {table} to delete: {before:?}"
        );
    }
    let bob_before = (fixture.rows_naming)("bob");

    // As the writer does it: every device revoked, then the rest removed.
    tables.revoke("alice", None, 200).unwrap();
    assert_eq!(tables.account_deleted_at("alice").unwrap(), None);
    let removed = tables.delete_account("alice", 200).unwrap();
    assert_eq!(removed.groups, ["g1"]);
    assert!(removed.rows >= 10, "{removed:?}");
    assert_eq!(
        (fixture.rows_naming)("alice"),
        [("revocations".to_owned(), 2)],
        "only the revocation of every device and the record of the deletion are left"
    );
    assert_eq!(tables.revoked_at("alice", "phone").unwrap(), Some(200));
    assert_eq!(tables.revoked_at("alice", "tablet").unwrap(), Some(200));
    assert_eq!(tables.account_deleted_at("alice").unwrap(), Some(200));
    assert_eq!(tables.account_deleted_at("bob").unwrap(), None);
    // Again (a retry, or the name's new account deleted too): nothing more
    // to remove, nothing fails, and the record moves to the later time.
    assert_eq!(tables.delete_account("alice", 300).unwrap().rows, 0);
    assert_eq!(tables.account_deleted_at("alice").unwrap(), Some(300));

    // Everyone else keeps their rows, and what alice sent stays in their
    // conversations (the documented choice).
    let bob_after = (fixture.rows_naming)("bob");
    assert_eq!(bob_after, bob_before, "bob's rows are untouched");
    let members: Vec<String> = tables
        .member_roles("g1")
        .unwrap()
        .into_iter()
        .map(|role| role.user)
        .collect();
    assert_eq!(members, ["bob", "carol"]);
    let direct = chat_protocol::ids::direct_conversation_id("alice", "bob");
    assert_eq!(
        record_ids(&tables.history(&direct, None, 10).unwrap()),
        [3, 2]
    );
    assert_eq!(synced_ids(fixture, "carol", "phone"), [1, 4, 5]);
    assert!(synced_ids(fixture, "alice", "phone").is_empty());
    assert!(tables.devices_of("alice").unwrap().is_empty());
    assert!(tables.push_targets("alice").unwrap().is_empty());
    assert!(tables.groups_of("alice").unwrap().is_empty());
    drop(tables);
    // Durable: a new handle (a restarted writer) finds the same.
    assert_eq!(
        (fixture.rows_naming)("alice"),
        [("revocations".to_owned(), 2)]
    );
    let mut again = fixture.backend.reader().unwrap();
    assert_eq!(again.account_deleted_at("alice").unwrap(), Some(300));
    // A message another node stored for the old account after its rows
    // went (made before the deletion) is not the new account's to sync;
    // one made after the deletion is. (Deleted again at a time of this
    // era: message ids count from the snowflake epoch.)
    let deleted_at = super::unix_ms_now();
    again.delete_account("alice", deleted_at).unwrap();
    let after_deletion = chat_protocol::snowflake::first_id_at(deleted_at + 1_000);
    let late = [
        message(6, "bob", "phone", "alice"),
        message(after_deletion, "bob", "phone", "alice"),
    ];
    run(fixture, &late, false);
    assert_eq!(synced_ids(fixture, "alice", "phone"), [after_deletion]);
    let mut reader = fixture.backend.reader().unwrap();
    let page = sync_page(
        &mut *reader,
        "alice",
        "phone",
        SyncFrom::Cursor,
        0,
        100,
        1 << 20,
    );
    assert_eq!(
        page.unwrap().expired,
        0,
        "the old account's entry is not the new one's loss"
    );
}

fn devices_not_seen_for_the_retention_lose_their_per_device_rows(fixture: &Fixture) {
    let mut tables = fixture.backend.reader().unwrap();
    let devices = [
        ("alice", "phone", 1_000),
        ("alice", "laptop", 1_000),
        ("bob", "phone", 2_000),
    ];
    for (user, device, seen) in devices {
        enroll(&mut *tables, user, device, 2);
        let cursor = super::Cursor {
            through: 3,
            above: vec![5],
        };
        tables.put_cursor(user, device, &cursor).unwrap();
        tables.put_device_seen(user, device, seen).unwrap();
    }
    // The laptop came back later; an older sighting never moves it back.
    tables.put_device_seen("alice", "laptop", 5_000).unwrap();
    tables.put_device_seen("alice", "laptop", 4_000).unwrap();
    let expire = |before: u64, limit: usize| -> usize {
        let mut removed = 0;
        let mut writer = fixture.backend.writer().unwrap();
        writer
            .write_batch(&mut |tables| {
                removed = tables.expire_devices(before, limit)?;
                Ok(())
            })
            .unwrap();
        removed
    };
    // In batches: one device, then the other, then nothing.
    assert_eq!(expire(4_500, 1), 1);
    assert_eq!(expire(4_500, 1), 1);
    assert_eq!(expire(4_500, 1), 0);
    assert_eq!(tables.devices_of("alice").unwrap(), ["laptop"]);
    let targets: Vec<String> = tables
        .push_targets("alice")
        .unwrap()
        .into_iter()
        .map(|(device, _)| device)
        .collect();
    assert_eq!(targets, ["laptop"]);
    assert_eq!(tables.cursor("alice", "laptop").unwrap().through, 3);
    assert_eq!(tables.cursor("alice", "phone").unwrap().through, 0);
    // Every table there is: bob's only device is gone whole.
    assert_eq!((fixture.rows_naming)("bob"), []);
    let alice = (fixture.rows_naming)("alice");
    for table in ["cursors", "device_keys", "push_targets", "devices_seen"] {
        assert!(
            alice.contains(&(table.to_owned(), 1)),
            "the laptop's row in {table}: {alice:?}"
        );
    }
    assert!(alice.contains(&("prekeys".to_owned(), 2)), "{alice:?}");
    // Back after its rows went: a new device, seen from now on.
    tables.put_device_seen("bob", "phone", 9_000).unwrap();
    assert_eq!(expire(4_500, 10), 0);
}

fn a_revocation_is_kept_and_takes_the_devices_keys_with_it(fixture: &Fixture) {
    let mut tables = fixture.backend.reader().unwrap();
    for device in ["phone", "laptop", "tablet"] {
        enroll(&mut *tables, "alice", device, 2);
    }
    assert_eq!(tables.revoked_at("alice", "phone").unwrap(), None);
    assert_eq!(tables.revoke("alice", Some("phone"), 5_000).unwrap(), 1);
    assert_eq!(tables.revoked_at("alice", "phone").unwrap(), Some(5_000));
    assert_eq!(tables.revoked_at("alice", "laptop").unwrap(), None);
    assert_eq!(tables.devices_of("alice").unwrap(), ["laptop", "tablet"]);
    // An earlier revocation of the same scope does not move it back.
    tables.revoke("alice", Some("phone"), 4_000).unwrap();
    assert_eq!(tables.revoked_at("alice", "phone").unwrap(), Some(5_000));
    // All devices: every device is covered, the latest revocation counts.
    assert_eq!(tables.revoke("alice", None, 9_000).unwrap(), 2);
    assert!(tables.devices_of("alice").unwrap().is_empty());
    for device in ["phone", "laptop", "never-seen"] {
        assert_eq!(tables.revoked_at("alice", device).unwrap(), Some(9_000));
    }
    assert_eq!(tables.revoked_at("bob", "phone").unwrap(), None);
    // A device uploads keys again after it is enrolled anew: no prekey of
    // the revoked one is handed out.
    let fresh = vec!["new".to_owned()];
    let upload = super::DeviceKeys {
        user: "alice",
        device: "phone",
        identity_key: "i2",
        signed_prekey: "s2",
        signed_prekey_signature: "g2",
        one_time_prekeys: &fresh,
    };
    assert_eq!(tables.put_device_keys(&upload).unwrap(), 1);
    drop(tables);
    // Durable: a new handle (a restarted writer) still knows.
    let mut again = fixture.backend.reader().unwrap();
    assert_eq!(again.revoked_at("alice", "laptop").unwrap(), Some(9_000));
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

fn push_targets_are_kept_per_device_replaced_removed_and_revoked(fixture: &Fixture) {
    let mut tables = fixture.backend.reader().unwrap();
    assert!(tables.push_targets("alice").unwrap().is_empty());
    tables
        .put_push_target("alice", "phone", Some(b"first"))
        .unwrap();
    tables
        .put_push_target("alice", "phone", Some(b"second"))
        .unwrap();
    tables
        .put_push_target("alice", "tablet", Some(b"tab"))
        .unwrap();
    tables
        .put_push_target("bob", "phone", Some(b"bob"))
        .unwrap();
    assert_eq!(
        tables.push_targets("alice").unwrap(),
        [
            ("phone".to_owned(), b"second".to_vec()),
            ("tablet".to_owned(), b"tab".to_vec())
        ]
    );
    tables.put_push_target("alice", "tablet", None).unwrap();
    tables.put_push_target("alice", "never", None).unwrap();
    assert_eq!(tables.push_targets("alice").unwrap().len(), 1);
    // A revoked device is woken no more; a user-wide revocation takes all.
    tables.revoke("alice", Some("phone"), 1_000).unwrap();
    assert!(tables.push_targets("alice").unwrap().is_empty());
    tables.revoke("bob", None, 1_000).unwrap();
    assert!(tables.push_targets("bob").unwrap().is_empty());
    tables
        .put_push_target("carol", "phone", Some(b"c"))
        .unwrap();
    drop(tables);
    let mut again = fixture.backend.reader().unwrap();
    assert_eq!(again.push_targets("carol").unwrap().len(), 1, "durable");
}

#[test]
fn a_postgres_database_from_before_versions_is_migrated_in_place_once() {
    let server = testkit::postgres::Postgres::start();
    // A database an older build made: the first schema, no version table,
    // and a row in it.
    let mut client = postgres::Client::connect(&server.url(), postgres::NoTls).unwrap();
    client
        .batch_execute(super::migrations::POSTGRES[0].statements)
        .unwrap();
    client
        .execute(
            "INSERT INTO revocations (user_id, device_id, at_ms) VALUES ('old', '', 7)",
            &[],
        )
        .unwrap();
    // A message and its inbox entry, which migration 7 moves under the
    // partitioned tables (as their DEFAULT partitions) without copying.
    let started = super::unix_ms_now() as i64;
    let old_id = chat_protocol::snowflake::first_id_at(super::unix_ms_now()) as i64;
    client
        .batch_execute(&format!(
            "INSERT INTO messages VALUES ('dm:a:b', {old_id}, '\\x01'); \
             INSERT INTO inbox VALUES ('b', 1, {old_id}, 'dm:a:b', ''); \
             INSERT INTO inbox_heads VALUES ('b', 1); \
             INSERT INTO cursors VALUES ('b', 'phone', '\\x00')"
        ))
        .unwrap();
    for _ in 0..2 {
        // Twice: the second start finds nothing to do.
        let backend = super::postgres::PostgresBackend::connect(&server.url()).unwrap();
        let mut tables = backend.reader().unwrap();
        assert_eq!(tables.revoked_at("old", "phone").unwrap(), Some(7), "kept");
        assert_eq!(
            tables.message("dm:a:b", old_id as u64).unwrap(),
            Some(vec![1]),
            "the old message row is kept"
        );
        assert_eq!(
            tables.inbox_entry_of("b", old_id as u64).unwrap(),
            Some((1, "dm:a:b".to_string())),
            "and its inbox entry"
        );
        tables.put_push_target("old", "phone", Some(b"t")).unwrap();
    }
    // Migration 8: a device known before it counts as seen at the upgrade,
    // so the device retention runs from then, not from an unknown past.
    let seen: Vec<(String, String, i64)> = client
        .query(
            "SELECT user_id, device_id, last_seen_ms FROM devices_seen",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!((seen[0].0.as_str(), seen[0].1.as_str()), ("b", "phone"));
    assert!(seen[0].2 >= started, "seen at the upgrade: {seen:?}");
    let versions: Vec<i32> = client
        .query(
            "SELECT version FROM schema_migrations ORDER BY version",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let every: Vec<i32> = super::migrations::POSTGRES
        .iter()
        .map(|step| step.version as i32)
        .collect();
    assert_eq!(versions, every, "every step, once");
    // A database a newer build migrated further is refused, not damaged.
    client
        .execute(
            "INSERT INTO schema_migrations (version, name) VALUES (99, 'future')",
            &[],
        )
        .unwrap();
    let Err(error) = super::postgres::PostgresBackend::connect(&server.url()) else {
        panic!("a newer schema was accepted");
    };
    let error = format!("{error:#}");
    assert!(error.contains("newer than this storage-writer"), "{error}");
}

#[test]
fn the_embedded_store_records_its_version_and_refuses_a_newer_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    drop(Embedded::open(&path, 1 << 20, Fsync::Batch, None).unwrap());
    drop(Embedded::open(&path, 1 << 20, Fsync::Batch, None).unwrap());
    {
        let keyspace = fjall::Config::new(&path).open().unwrap();
        let meta = keyspace
            .open_partition("meta", fjall::PartitionCreateOptions::default())
            .unwrap();
        let version = meta.get(b"schema_version").unwrap().unwrap();
        assert_eq!(
            u32::from_be_bytes(version.as_ref().try_into().unwrap()),
            super::migrations::EMBEDDED_VERSION
        );
        meta.insert(b"schema_version", 99u32.to_be_bytes()).unwrap();
        keyspace.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    let Err(error) = Embedded::open(&path, 1 << 20, Fsync::Batch, None) else {
        panic!("a newer layout was accepted");
    };
    let error = format!("{error:#}");
    assert!(error.contains("newer than this storage-writer"), "{error}");
}

#[test]
fn an_embedded_store_from_version_7_counts_its_known_devices_as_seen_at_the_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let started = super::unix_ms_now();
    {
        // Version 7's layout: a device with a cursor, one with only a push
        // target, and no `devices_seen`.
        let keyspace = fjall::Config::new(&path).open().unwrap();
        let open = |name: &str| {
            keyspace
                .open_partition(name, fjall::PartitionCreateOptions::default())
                .unwrap()
        };
        open("cursors").insert(b"bob\0phone\0", [0u8]).unwrap();
        open("push_targets").insert(b"bob\0tablet\0", b"t").unwrap();
        open("meta")
            .insert(b"schema_version", 7u32.to_be_bytes())
            .unwrap();
        keyspace.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    let store = Embedded::open(&path, 1 << 20, Fsync::Batch, None).unwrap();
    let fixture = Fixture {
        backend: Box::new(crate::backend::EmbeddedBackend(store.clone())),
        rows_naming: Box::new(move |user| store.rows_naming(user).unwrap()),
        _keep: Box::new(()),
    };
    let found = (fixture.rows_naming)("bob");
    assert!(found.contains(&("devices_seen".to_owned(), 2)), "{found:?}");
    // Seen at the upgrade: a retention cut from before it removes nothing.
    let mut writer = fixture.backend.writer().unwrap();
    writer
        .write_batch(&mut |tables| {
            assert_eq!(tables.expire_devices(started, 10)?, 0);
            Ok(())
        })
        .unwrap();
}

fn roles_follow_the_changes_and_history_starts_at_joining(fixture: &Fixture) {
    let event = |action, members: Vec<&'static str>| Some(Event::Group { action, members });
    let batch = [
        group_message(
            10,
            "g3",
            "alice",
            &["alice", "bob"],
            event(GroupAction::Create, vec!["alice", "bob"]),
        ),
        group_message(11, "g3", "alice", &["alice", "bob"], None),
        group_message(
            12,
            "g3",
            "alice",
            &["alice", "bob", "carol"],
            event(GroupAction::Add, vec!["carol"]),
        ),
        group_message(
            13,
            "g3",
            "alice",
            &["alice", "bob", "carol"],
            event(GroupAction::Promote, vec!["bob"]),
        ),
        group_message(14, "g3", "bob", &["alice", "bob", "carol"], None),
    ];
    // The set-based path, then the same replayed row by row: idempotent.
    run(fixture, &batch, false);
    run(fixture, &batch, true);
    let mut reader = fixture.backend.reader().unwrap();
    let roles: Vec<(String, bool, u64)> = reader
        .member_roles("g3")
        .unwrap()
        .into_iter()
        .map(|role| (role.user, role.admin, role.joined_id))
        .collect();
    assert_eq!(
        roles,
        [
            ("alice".to_owned(), true, 10),
            ("bob".to_owned(), true, 10),
            ("carol".to_owned(), false, 12)
        ]
    );
    let ids = |records: Vec<Vec<u8>>| record_ids(&records);
    let conversation = chat_protocol::ids::group_conversation_id("g3");
    let everything = super::history(&mut *reader, &conversation, None, None, 0, 50).unwrap();
    assert_eq!(ids(everything), [14, 13, 12, 11, 10]);
    let from_joining = super::history(&mut *reader, &conversation, None, Some(12), 0, 50).unwrap();
    assert_eq!(ids(from_joining), [14, 13, 12]);
    // Posting restricted to admins, then opened again.
    assert!(!reader.admins_only("g3").unwrap(), "open until restricted");
    let everyone = ["alice", "bob", "carol"];
    let restrict = group_message(
        20,
        "g3",
        "bob",
        &everyone,
        event(GroupAction::Restrict, vec![]),
    );
    run(fixture, std::slice::from_ref(&restrict), false);
    run(fixture, &[restrict], true);
    assert!(reader.admins_only("g3").unwrap());
    let open = group_message(
        21,
        "g3",
        "alice",
        &everyone,
        event(GroupAction::Open, vec![]),
    );
    run(fixture, &[open], false);
    assert!(!reader.admins_only("g3").unwrap());
    // Leaving takes the role with the membership; coming back is a fresh start.
    let batch = [
        group_message(
            15,
            "g3",
            "bob",
            &["alice", "bob", "carol"],
            event(GroupAction::Leave, vec!["bob"]),
        ),
        group_message(
            16,
            "g3",
            "alice",
            &["alice", "bob", "carol"],
            event(GroupAction::Add, vec!["bob"]),
        ),
    ];
    run(fixture, &batch, false);
    let bob = reader
        .member_roles("g3")
        .unwrap()
        .into_iter()
        .find(|role| role.user == "bob")
        .unwrap();
    assert_eq!((bob.admin, bob.joined_id), (false, 16));
}

/// An embedded store at `path` kept for `retention`, and a fixture over it.
fn embedded_at(
    path: &std::path::Path,
    retention: Option<std::time::Duration>,
) -> (Fixture, Embedded) {
    let store = Embedded::open(path, 1 << 20, Fsync::None, retention).unwrap();
    let audited = store.clone();
    let fixture = Fixture {
        backend: Box::new(crate::backend::EmbeddedBackend(store.clone())),
        rows_naming: Box::new(move |user| audited.rows_naming(user).unwrap()),
        _keep: Box::new(()),
    };
    (fixture, store)
}

/// A sync page of `user`'s laptop from its cursor, with a retention floor.
fn sync_from_cursor(fixture: &Fixture, user: &str, floor: u64) -> super::SyncPage {
    let mut reader = fixture.backend.reader().unwrap();
    sync_page(
        &mut *reader,
        user,
        "laptop",
        SyncFrom::Cursor,
        floor,
        100,
        1 << 20,
    )
    .unwrap()
}

/// The store's partitions of time windows (`<table>_b<start ms>`).
fn window_partitions(store: &Embedded) -> Vec<String> {
    store
        .partition_names()
        .into_iter()
        .filter(|name| {
            name.rsplit_once("_b")
                .is_some_and(|(_, start)| start.parse::<u64>().is_ok())
        })
        .collect()
}

/// Messages from alice's phone to bob, one per id.
fn alice_to_bob(ids: &[u64]) -> Vec<Vec<u8>> {
    ids.iter()
        .map(|id| message(*id, "alice", "phone", "bob"))
        .collect()
}

/// One `expire_messages` call through `writer`.
fn expire_once(
    writer: &mut dyn super::BatchWriter,
    before_id: u64,
    limit: usize,
) -> super::Expired {
    let mut expired = super::Expired::default();
    writer
        .write_batch(&mut |tables| {
            expired = tables.expire_messages(before_id, limit)?;
            Ok(())
        })
        .unwrap();
    expired
}

#[test]
fn embedded_retention_drops_whole_time_windows_and_gives_their_bytes_back() {
    use chat_protocol::snowflake::first_id_at;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let retention = std::time::Duration::from_secs(16);
    let (fixture, store) = embedded_at(&path, Some(retention));
    let now = super::unix_ms_now();
    // Windows of a second: two old ones, a minute back, and the current one.
    let old: Vec<u64> = [60_000, 60_000, 50_000]
        .iter()
        .enumerate()
        .map(|(i, ago)| first_id_at(now - ago) + i as u64)
        .collect();
    let new = first_id_at(now);
    let batch: Vec<Vec<u8>> = old
        .iter()
        .chain([&new])
        .map(|id| message(*id, "alice", "phone", "bob"))
        .collect();
    run(&fixture, &batch, false);
    assert_eq!(
        window_partitions(&store).len(),
        9,
        "three windows, three tables each"
    );
    let mut writer = fixture.backend.writer().unwrap();
    let mut made = 0;
    writer
        .write_batch(&mut |tables| {
            made = tables.partitions_ahead(now)?;
            Ok(())
        })
        .unwrap();
    assert_eq!(made, 1, "the next window is made ahead");
    store.flush_buckets().unwrap();

    let floor = super::retention_floor(now, Some(retention));
    let mut removed = super::Expired::default();
    for _ in 0..20 {
        let step = expire_once(&mut *writer, floor, 1000);
        removed.rows += step.rows;
        removed.bytes += step.bytes;
        if !step.more {
            break;
        }
    }
    assert_eq!(
        removed.rows, 9,
        "three messages and their six inbox entries (bob's, and alice's own): {removed:?}"
    );
    assert!(
        removed.bytes > 0,
        "the dropped windows' segments are counted"
    );
    let windows = window_partitions(&store);
    assert_eq!(
        windows.len(),
        6,
        "the current and the next window stay: {windows:?}"
    );
    let old_start = (now - 60_000) / 1000 * 1000;
    let folder = path
        .join("partitions")
        .join(format!("messages_b{old_start}"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while folder.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "{} is still on disk",
            folder.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // What retention keeps is there, the gap is reported, sequences go on.
    let page = sync_from_cursor(&fixture, "bob", floor);
    assert_eq!((page_ids(&page), page.expired), (vec![new], 3));
    let mut reader = fixture.backend.reader().unwrap();
    assert_eq!(reader.inbox_head("bob").unwrap(), 4);
    for id in &old {
        assert_eq!(
            reader
                .message(
                    &chat_protocol::ids::direct_conversation_id("alice", "bob"),
                    *id
                )
                .unwrap(),
            None
        );
    }
    let later = first_id_at(now) + 10;
    run(&fixture, &[message(later, "alice", "phone", "bob")], false);
    assert_eq!(
        reader.inbox_entry_of("bob", later).unwrap().map(|e| e.0),
        Some(5)
    );
}

#[test]
fn embedded_counts_the_rows_its_dropped_windows_held() {
    use chat_protocol::snowflake::first_id_at;
    let dir = tempfile::tempdir().unwrap();
    let retention = std::time::Duration::from_secs(16);
    let (fixture, _store) = embedded_at(&dir.path().join("store"), Some(retention));
    let now = super::unix_ms_now();
    let batch: Vec<Vec<u8>> = (0..4)
        .map(|i| message(first_id_at(now - 60_000) + i, "dave", "phone", "carol"))
        .collect();
    run(&fixture, &batch, false);
    let floor = super::retention_floor(now, Some(retention));
    let rows = expire_all(&fixture, floor, 1000);
    assert_eq!(rows, 4 + 8, "four messages and eight inbox entries: {rows}");
}

#[test]
fn a_message_committed_into_a_window_being_dropped_still_takes_its_sequence() {
    use chat_protocol::snowflake::first_id_at;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let retention = std::time::Duration::from_secs(16);
    let now = super::unix_ms_now();
    let old = first_id_at(now - 60_000);
    let floor = super::retention_floor(now, Some(retention));
    {
        let (fixture, _store) = embedded_at(&path, Some(retention));
        run(
            &fixture,
            &[
                message(old, "dave", "phone", "carol"),
                message(old + 1, "dave", "phone", "carol"),
            ],
            false,
        );
        // The cleanup closes the window and walks one of its two users...
        let mut cleanup = fixture.backend.writer().unwrap();
        assert!(expire_once(&mut *cleanup, floor, 1).more);
        // ...when a late message for that window commits: it is not
        // stored, but its sequence is taken for good.
        run(
            &fixture,
            &[message(old + 2, "dave", "phone", "carol")],
            false,
        );
        let mut reader = fixture.backend.reader().unwrap();
        assert_eq!(reader.inbox_entry_of("carol", old + 2).unwrap(), None);
        assert_eq!(reader.inbox_head("carol").unwrap(), 3);
        for _ in 0..10 {
            if !expire_once(&mut *cleanup, floor, 1).more {
                break;
            }
        }
        assert_eq!(
            reader.inbox_head("carol").unwrap(),
            3,
            "the walk never lowers it"
        );
    }
    // After a restart (no counter in memory) the next sequence is 4.
    let (fixture, _store) = embedded_at(&path, Some(retention));
    let new = first_id_at(super::unix_ms_now());
    run(&fixture, &[message(new, "dave", "phone", "carol")], false);
    let mut reader = fixture.backend.reader().unwrap();
    assert_eq!(
        reader.inbox_entry_of("carol", new).unwrap().map(|e| e.0),
        Some(4)
    );
    let page = sync_from_cursor(&fixture, "carol", floor);
    assert_eq!((page_ids(&page), page.expired), (vec![new], 3));
}

#[test]
fn sync_follows_the_inbox_order_where_neighbouring_windows_interleave() {
    use chat_protocol::snowflake::first_id_at;
    let dir = tempfile::tempdir().unwrap();
    let (fixture, _store) = embedded_at(
        &dir.path().join("store"),
        Some(std::time::Duration::from_secs(16)),
    );
    let now = super::unix_ms_now();
    // A message of a later window commits first (it came from a node whose
    // clock runs ahead): sequence order is commit order, not id order.
    let (later, earlier) = (first_id_at(now + 3_000), first_id_at(now));
    run(&fixture, &[message(later, "alice", "phone", "bob")], false);
    run(&fixture, &alice_to_bob(&[earlier, earlier + 1]), false);
    assert_eq!(
        synced_ids(&fixture, "bob", "laptop"),
        [later, earlier, earlier + 1]
    );
    let mut reader = fixture.backend.reader().unwrap();
    let seqs = |entries: Vec<super::InboxEntry>| entries.iter().map(|e| e.seq).collect::<Vec<_>>();
    assert_eq!(seqs(reader.inbox_after("bob", 0, 2).unwrap()), [1, 2]);
    assert_eq!(seqs(reader.inbox_after("bob", 1, 1).unwrap()), [2]);
    assert_eq!(seqs(reader.inbox_after("bob", 2, 5).unwrap()), [3]);
    let conversation = chat_protocol::ids::direct_conversation_id("alice", "bob");
    let history = super::history(&mut *reader, &conversation, None, None, 0, 2).unwrap();
    assert_eq!(
        record_ids(&history),
        [later, earlier + 1],
        "history is by id, newest first, across windows"
    );
}

#[test]
fn an_embedded_store_from_version_8_keeps_its_rows_as_a_legacy_window_dropped_whole_later() {
    use chat_protocol::snowflake::first_id_at;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let before = super::unix_ms_now();
    let old = first_id_at(before - 1_000);
    {
        // Version 8's layout: unsplit tables, the inbox's time index, no
        // bucket keys in `meta`.
        let (fixture, store) = embedded_at(&path, None);
        run(&fixture, &alice_to_bob(&[old, old + 1]), false);
        assert!(
            window_partitions(&store).is_empty(),
            "a store keeping everything has no windows"
        );
        drop(fixture);
        drop(store);
        let keyspace = fjall::Config::new(&path).open().unwrap();
        let meta = keyspace
            .open_partition("meta", fjall::PartitionCreateOptions::default())
            .unwrap();
        meta.insert(b"schema_version", 8u32.to_be_bytes()).unwrap();
        meta.remove(b"bucket_width_ms").unwrap();
        meta.remove(b"legacy_until_ms").unwrap();
        keyspace
            .open_partition("inbox_by_time", fjall::PartitionCreateOptions::default())
            .unwrap()
            .insert(b"k", b"")
            .unwrap();
        keyspace.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    let retention = std::time::Duration::from_secs(16);
    let (fixture, store) = embedded_at(&path, Some(retention));
    let opened = super::unix_ms_now();
    let names = store.partition_names();
    assert!(!names.iter().any(|n| n == "inbox_by_time"), "{names:?}");
    assert!(
        names.iter().any(|n| n == "messages"),
        "the legacy window stays: {names:?}"
    );
    assert_eq!(synced_ids(&fixture, "bob", "laptop"), [old, old + 1]);
    // New messages go to windows; the legacy one is dropped only once the
    // retention has passed the upgrade.
    let new = first_id_at(opened + 5_000);
    run(&fixture, &[message(new, "alice", "phone", "bob")], false);
    assert_eq!(window_partitions(&store).len(), 3);
    let mut cleanup = fixture.backend.writer().unwrap();
    assert!(
        !expire_once(&mut *cleanup, first_id_at(before), 1000).more,
        "the upgrade is after the floor"
    );
    assert!(store.partition_names().iter().any(|n| n == "messages"));
    for _ in 0..10 {
        if !expire_once(&mut *cleanup, first_id_at(opened), 1000).more {
            break;
        }
    }
    let names = store.partition_names();
    assert!(
        !names
            .iter()
            .any(|n| n == "messages" || n == "inbox" || n == "inbox_ids"),
        "{names:?}"
    );
    let page = sync_from_cursor(&fixture, "bob", 0);
    assert_eq!((page_ids(&page), page.expired), (vec![new], 2));
    drop(fixture);
    drop(store);
    // Reopened: the layout is kept, and so is the sequence.
    let (fixture, _store) = embedded_at(&path, Some(retention));
    let newer = new + 1;
    run(&fixture, &[message(newer, "alice", "phone", "bob")], false);
    let mut reader = fixture.backend.reader().unwrap();
    assert_eq!(
        reader.inbox_entry_of("bob", newer).unwrap().map(|e| e.0),
        Some(4)
    );
}
