//! The ring's contract, each test named after the behaviour it pins down:
//! order and integrity across wrap-arounds (property test against a model),
//! two mappings of one file (as two processes have), validation at attach,
//! corruption detection, a full ring recovering, and restarts resuming at the
//! durable watermark.

use std::path::Path;
use std::time::{Duration, Instant};

use chat_ring::{attach_consumer, attach_producer, record_bytes, RingError, RingOptions};
use proptest::prelude::*;

const CAPACITY: u64 = 64 * 1024;

fn options() -> RingOptions {
    RingOptions {
        capacity_bytes: CAPACITY,
        shard_id: 3,
    }
}

fn payload(sequence: u64, length: usize) -> Vec<u8> {
    let mut bytes = sequence.to_le_bytes().to_vec();
    bytes.extend((0..length).map(|i| (sequence as usize + i) as u8));
    bytes
}

#[derive(Debug, Clone)]
enum Step {
    Append(usize),
    Read(usize),
    CommitAll,
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(
        prop_oneof![
            4 => (0usize..3000).prop_map(Step::Append),
            3 => (1usize..20).prop_map(Step::Read),
            1 => Just(Step::CommitAll),
        ],
        1..400,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]
    #[test]
    fn records_come_out_in_order_intact_and_full_matches_the_model(steps in steps()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.ring");
        let mut producer = attach_producer(&path, options()).unwrap();
        let mut consumer = attach_consumer(&path, options()).unwrap();
        // The model: bytes in use, and the records not yet read.
        let mut sequence = 0u64;
        let mut unread: std::collections::VecDeque<Vec<u8>> = Default::default();
        let mut last_read_end = 0;
        for step in steps {
            match step {
                Step::Append(length) => {
                    let record = payload(sequence, length);
                    // The model: the record plus any padding to the wrap must fit
                    // in the bytes not yet made durable.
                    let head = producer.head();
                    let record_size = record_bytes(record.len() as u64);
                    let contiguous = CAPACITY - head % CAPACITY;
                    let needed = record_size + if contiguous < record_size { contiguous } else { 0 };
                    let fits = needed <= CAPACITY - (head - consumer.durable());
                    match producer.try_append(&record) {
                        Ok(end) => {
                            prop_assert!(fits, "appended although the model says it does not fit");
                            prop_assert_eq!(end, head + needed);
                            unread.push_back(record);
                            sequence += 1;
                        }
                        Err(full) => {
                            prop_assert!(!fits, "refused although the model says it fits");
                            prop_assert_eq!(full.needed, needed);
                            prop_assert_eq!(producer.head(), head, "a refusal changes nothing");
                        }
                    }
                }
                Step::Read(count) => {
                    for _ in 0..count {
                        match consumer.next_record().unwrap() {
                            Some(record) => {
                                let expected = unread.pop_front().expect("the model has an unread record");
                                prop_assert_eq!(record.payload, &expected[..]);
                                last_read_end = record.end;
                            }
                            None => { prop_assert!(unread.is_empty()); break; }
                        }
                    }
                }
                Step::CommitAll => {
                    if last_read_end > consumer.durable() {
                        consumer.commit(last_read_end);
                    }
                    prop_assert_eq!(producer.durable(), consumer.durable());
                }
            }
        }
        // Drain: everything appended comes out, in order.
        while let Some(record) = consumer.next_record().unwrap() {
            prop_assert_eq!(record.payload, &unread.pop_front().unwrap()[..]);
        }
        prop_assert!(unread.is_empty());
    }
}

#[test]
fn producer_and_consumer_on_separate_mappings_pass_200k_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("threads.ring");
    let mut producer = attach_producer(&path, options()).unwrap();
    let consumer_path = path.clone();
    const COUNT: u64 = 200_000;
    let consumer = std::thread::spawn(move || {
        // Its own mapping of the file, as the storage-writer process has.
        let mut consumer = attach_consumer(&consumer_path, options()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut expected = 0u64;
        while expected < COUNT {
            assert!(Instant::now() < deadline, "consumer stalled at {expected}");
            let mut last_end = None;
            for _ in 0..64 {
                match consumer.next_record().unwrap() {
                    Some(record) => {
                        let sequence = u64::from_le_bytes(record.payload[..8].try_into().unwrap());
                        assert_eq!(sequence, expected, "in order, none lost or repeated");
                        assert_eq!(
                            record.payload,
                            &payload(sequence, (sequence % 200) as usize)[..]
                        );
                        expected += 1;
                        last_end = Some(record.end);
                    }
                    None => break,
                }
            }
            match last_end {
                Some(end) => consumer.commit(end),
                None => consumer.wait(Duration::from_millis(5)),
            }
        }
        expected
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut fulls = 0u64;
    for sequence in 0..COUNT {
        let record = payload(sequence, (sequence % 200) as usize);
        loop {
            assert!(Instant::now() < deadline, "producer stalled at {sequence}");
            match producer.try_append(&record) {
                Ok(_) => break,
                Err(_) => {
                    fulls += 1;
                    producer.wake_consumer();
                    std::thread::yield_now();
                }
            }
        }
        if sequence % 32 == 0 {
            producer.wake_consumer();
        }
    }
    producer.wake_consumer();
    assert_eq!(consumer.join().unwrap(), COUNT);
    // A 64 KiB ring cannot hold 200k records: the producer did meet a full ring.
    assert!(fulls > 0);
    assert_eq!(producer.durable(), producer.head());
}

fn attach_error(path: &Path, options: RingOptions) -> RingError {
    match attach_consumer(path, options) {
        Ok(_) => panic!("attach should have failed"),
        Err(error) => error,
    }
}

fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::OpenOptions::new().write(true).open(path).unwrap(),
        bytes,
        offset,
    )
    .unwrap();
}

#[test]
fn bad_headers_are_refused_at_attach_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("header.ring");
    drop(attach_producer(&path, options()).unwrap());

    let wrong_capacity = RingOptions {
        capacity_bytes: CAPACITY * 2,
        ..options()
    };
    assert!(matches!(
        attach_error(&path, wrong_capacity),
        RingError::Mismatch {
            what: "capacity",
            ..
        }
    ));
    let wrong_shard = RingOptions {
        shard_id: 4,
        ..options()
    };
    assert!(matches!(
        attach_error(&path, wrong_shard),
        RingError::Mismatch {
            what: "shard id",
            ..
        }
    ));

    patch(&path, 8, &2u32.to_le_bytes());
    let error = attach_error(&path, options());
    assert!(
        matches!(
            error,
            RingError::WrongVersion {
                found: 2,
                expected: 1,
                ..
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("layout version 2"));

    patch(&path, 0, b"NOTARING");
    assert!(matches!(
        attach_error(&path, options()),
        RingError::BadMagic { .. }
    ));

    let truncated = dir.path().join("truncated.ring");
    drop(attach_producer(&truncated, options()).unwrap());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&truncated)
        .unwrap()
        .set_len(4096 + 100)
        .unwrap();
    assert!(matches!(
        attach_error(&truncated, options()),
        RingError::Truncated { .. }
    ));

    let short = dir.path().join("short.ring");
    std::fs::write(&short, b"tiny").unwrap();
    assert!(matches!(
        attach_error(&short, options()),
        RingError::Truncated { .. }
    ));

    assert!(matches!(
        attach_consumer(
            &dir.path().join("x.ring"),
            RingOptions {
                capacity_bytes: 1000,
                shard_id: 0
            }
        ),
        Err(RingError::Options(_))
    ));
}

#[test]
fn a_second_producer_or_consumer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("roles.ring");
    let _producer = attach_producer(&path, options()).unwrap();
    let _consumer = attach_consumer(&path, options()).unwrap();
    assert!(matches!(
        attach_producer(&path, options()),
        Err(RingError::Locked {
            role: "producer",
            ..
        })
    ));
    assert!(matches!(
        attach_consumer(&path, options()),
        Err(RingError::Locked {
            role: "consumer",
            ..
        })
    ));
}

#[test]
fn a_corrupt_record_is_reported_not_read_as_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("corrupt.ring");
    let mut producer = attach_producer(&path, options()).unwrap();
    producer.try_append(b"first record").unwrap();
    producer.try_append(b"second record").unwrap();
    // Flip a payload byte of the second record (header 4096 + first record 24 + its header 8).
    patch(&path, 4096 + record_bytes(12) + 8, b"X");
    let mut consumer = attach_consumer(&path, options()).unwrap();
    assert_eq!(
        consumer.next_record().unwrap().unwrap().payload,
        b"first record"
    );
    let error = consumer.next_record().unwrap_err();
    assert!(
        matches!(
            error,
            RingError::Corrupt {
                reason: "record checksum mismatch",
                ..
            }
        ),
        "{error}"
    );

    // A length that runs past the head is corrupt too.
    patch(
        &path,
        4096 + record_bytes(12),
        &u32::MAX.wrapping_sub(1).to_le_bytes(),
    );
    let mut consumer_again = {
        drop(consumer);
        attach_consumer(&path, options()).unwrap()
    };
    consumer_again.next_record().unwrap();
    assert!(matches!(
        consumer_again.next_record(),
        Err(RingError::Corrupt { .. })
    ));
}

#[test]
fn a_full_ring_refuses_without_damage_and_recovers_after_commit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("full.ring");
    let mut producer = attach_producer(&path, options()).unwrap();
    let mut consumer = attach_consumer(&path, options()).unwrap();
    let record = vec![7u8; 1000];
    let mut appended = 0;
    while producer.try_append(&record).is_ok() {
        appended += 1;
    }
    assert_eq!(appended, CAPACITY / record_bytes(1000));
    let full = producer.try_append(&record).unwrap_err();
    assert!(full.needed > full.free);
    // Reading alone frees nothing; committing does.
    let first_end = consumer.next_record().unwrap().unwrap().end;
    assert!(producer.try_append(&record).is_err());
    consumer.commit(first_end);
    producer.try_append(&record).unwrap();
    let mut read = 1;
    while consumer.next_record().unwrap().is_some() {
        read += 1;
    }
    assert_eq!(
        read,
        appended + 1,
        "nothing lost or duplicated by the refusals"
    );
}

#[test]
fn restarts_resume_at_the_durable_watermark() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("restart.ring");
    let mut producer = attach_producer(&path, options()).unwrap();
    for sequence in 0..10 {
        producer.try_append(&payload(sequence, 10)).unwrap();
    }
    let mut consumer = attach_consumer(&path, options()).unwrap();
    let mut fifth_end = 0;
    for sequence in 0..10 {
        let record = consumer.next_record().unwrap().unwrap();
        if sequence == 4 {
            fifth_end = record.end;
        }
    }
    consumer.commit(fifth_end);
    // The writer dies after committing 5 of 10: a new one re-reads 5..10.
    drop(consumer);
    let mut consumer = attach_consumer(&path, options()).unwrap();
    let again: Vec<u64> = std::iter::from_fn(|| {
        consumer
            .next_record()
            .unwrap()
            .map(|r| u64::from_le_bytes(r.payload[..8].try_into().unwrap()))
    })
    .collect();
    assert_eq!(again, (5..10).collect::<Vec<_>>());
    // The gateway dies: a new producer continues after the last record.
    let head = producer.head();
    drop(producer);
    let mut producer = attach_producer(&path, options()).unwrap();
    assert_eq!(producer.head(), head);
    producer.try_append(&payload(10, 10)).unwrap();
    let next = consumer.next_record().unwrap().unwrap();
    assert_eq!(
        u64::from_le_bytes(next.payload[..8].try_into().unwrap()),
        10
    );
}

#[test]
fn a_parked_consumer_wakes_when_the_producer_appends() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wake.ring");
    let mut producer = attach_producer(&path, options()).unwrap();
    let consumer_path = path.clone();
    let waiter = std::thread::spawn(move || {
        let mut consumer = attach_consumer(&consumer_path, options()).unwrap();
        let started = Instant::now();
        while consumer.next_record().unwrap().is_none() {
            consumer.wait(Duration::from_secs(10));
        }
        started.elapsed()
    });
    std::thread::sleep(Duration::from_millis(200));
    producer.try_append(b"wake up").unwrap();
    producer.wake_consumer();
    let waited = waiter.join().unwrap();
    // Woken by the futex, not by the 10 s timeout.
    assert!(waited < Duration::from_secs(5), "{waited:?}");
}
