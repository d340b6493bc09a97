//! The commit thread: turns chunks of ring records into durable batches.
//!
//! Owns reading the rings (through `Drains`: this thread parks on them and
//! producers wake it directly), batching (up to `batch_records_max` records,
//! or whatever arrived while the last batch was being written: group commit,
//! with an adaptive linger while records keep coming),
//! retrying a failed batch whole with back-off, then advancing each ring's
//! durable watermark, waking readers and telling shards (`Durable`). Owns the
//! acknowledgements that arrived before their message (from another ring):
//! they wait, bounded, until every ring has been read past the point where the
//! acknowledgement was seen. Never advances a watermark before the store has
//! made the batch durable.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::rings::{Chunk, Drains, Progress};
use crate::sessions::Sessions;
use crate::stats::Stats;
use crate::store::BatchWriter;
use crate::store::{self};
use anyhow::Result;
use chat_protocol::records::Record;

/// Acknowledgements waiting for their message, at most.
const PENDING_ACKS_MAX: usize = 65_536;
/// Longest wait between batches when acknowledgements are pending.
const PENDING_RETRY: Duration = Duration::from_millis(20);
/// A batch of at least this many records is written without a linger: its
/// fsync is already shared widely enough.
const LINGER_BELOW_RECORDS: usize = 64;
/// Longest wait for records before looking at `stop` again.
const IDLE_WAIT: Duration = Duration::from_millis(100);
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// The exit status when the store can only be opened again (EX_TEMPFAIL):
/// the gateway, or systemd, starts the writer again.
pub const EXIT_STORE_MUST_REOPEN: i32 = 75;

/// The recent commit time per record (a moving average over batches of at
/// least `RecordCost::SAMPLE_RECORDS_MIN`: a small batch is mostly fsync).
#[derive(Default)]
struct RecordCost {
    nanos_per_record: Option<f64>,
}

impl RecordCost {
    const SAMPLE_RECORDS_MIN: usize = 64;
    /// A batch is never cut below this many records.
    const RECORDS_MIN: usize = 64;

    fn observe(&mut self, records: usize, took: Duration) {
        if records < Self::SAMPLE_RECORDS_MIN {
            return;
        }
        let sample = took.as_nanos() as f64 / records as f64;
        self.nanos_per_record = Some(match self.nanos_per_record {
            Some(average) => average * 0.8 + sample * 0.2,
            None => sample,
        });
    }

    /// Records that fill `target` at the recent cost, within `max`.
    fn records_for(&self, target: Duration, max: usize) -> usize {
        match self.nanos_per_record {
            Some(nanos) if nanos > 0.0 && !target.is_zero() => {
                ((target.as_nanos() as f64 / nanos) as usize).clamp(Self::RECORDS_MIN.min(max), max)
            }
            _ => max,
        }
    }
}

struct PendingAck {
    user: String,
    device: String,
    message_id: u64,
    /// Every ring's head when the acknowledgement was first not found.
    heads: Vec<u64>,
}

pub struct CommitLoop {
    /// Every ring, read by this thread.
    pub drains: Drains,
    pub writer: Box<dyn BatchWriter>,
    pub progress: Arc<Progress>,
    pub sessions: Arc<Sessions>,
    pub stats: Arc<Stats>,
    pub batch_records_max: usize,
    /// How long one batch should take to commit: batches are cut at the
    /// records that fill it at the recent cost per record, so a writer
    /// that is behind commits often (each `sent` waits about one batch
    /// time, not one of 4,096 records) and the gateway's lag bound holds.
    pub batch_time_target: Duration,
    /// The most members a group may have: changes past it are refused.
    pub group_members_max: usize,
    /// How long a batch waits for more records while records keep coming
    /// (0: never). See `run`.
    pub batch_linger: Duration,
    pub stop: Arc<AtomicBool>,
    /// The push worker's queue, when push is configured.
    pub push: Option<crate::push::PushHandle>,
}

impl CommitLoop {
    pub fn run(mut self) {
        let mut pending: VecDeque<PendingAck> = VecDeque::new();
        // When the last batch was made durable.
        let mut last_commit: Option<Instant> = None;
        let mut cost = RecordCost::default();
        loop {
            // The batch in hand is done; nothing new is read once stopping.
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            let records_max = cost.records_for(self.batch_time_target, self.batch_records_max);
            let mut chunks = self.drains.read(records_max);
            if chunks.is_empty() {
                self.drains.wait(if pending.is_empty() {
                    IDLE_WAIT
                } else {
                    PENDING_RETRY
                });
                chunks = self.drains.read(records_max);
            }
            let mut records = chunks.iter().map(|c| c.records.len()).sum::<usize>();
            // Group commit: a batch is what arrived while the last one was
            // written. Adaptive linger: only a small batch while records
            // keep coming (the last commit ended less than a linger ago)
            // waits for more, so a busy writer pays one fsync per linger, an
            // idle one answers at once, and a saturated one (its batches
            // already large) never waits.
            let flowing = last_commit.is_some_and(|at| at.elapsed() < self.batch_linger);
            if records > 0 && records < records_max.min(LINGER_BELOW_RECORDS) && flowing {
                std::thread::sleep(self.batch_linger);
                let more = self.drains.read(records_max - records);
                records += more.iter().map(|c| c.records.len()).sum::<usize>();
                chunks.extend(more);
            }
            if chunks.is_empty() && pending.is_empty() {
                continue;
            }
            let started = Instant::now();
            let mut backoff = Duration::from_millis(10);
            let mut retry = false;
            // The first failure of this batch: a store that refuses writes
            // from then on says only that it does.
            let mut first_failure: Option<String> = None;
            let still_pending = loop {
                match self.commit(&chunks, &pending, retry) {
                    Ok(still_pending) => break still_pending,
                    Err(error) if self.stop.load(Ordering::Relaxed) => {
                        // Nothing in it was acknowledged, and the rings keep
                        // it: the next writer commits it. Retrying forever
                        // would only keep this process from stopping.
                        tracing::warn!(error = format!("{error:#}"), "stopping with a batch not committed; it stays in the rings for the next writer");
                        return;
                    }
                    Err(error) if self.writer.must_restart(&error) => {
                        // Like kill -9: the rings keep the batch for the next writer.
                        let first = first_failure.unwrap_or_else(|| format!("{error:#}"));
                        let reason = format!("{first}; the store refuses writes until it is opened again, so the writer restarts");
                        tracing::error!(
                            error = reason,
                            "batch not committed; exiting for a restart"
                        );
                        self.sessions.stalled(&reason);
                        std::process::exit(EXIT_STORE_MUST_REOPEN);
                    }
                    Err(error) => {
                        let reason = format!("{error:#}");
                        tracing::warn!(error = reason, retry_in = ?backoff, "batch not committed; retrying");
                        self.sessions.stalled(&reason);
                        self.stats.commit_failed();
                        first_failure.get_or_insert(reason);
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
                        retry = true;
                    }
                }
            };
            self.stats.batch(records, started.elapsed());
            if !retry {
                // A retried batch's time is mostly back-off, not cost.
                cost.observe(records, started.elapsed());
            }
            pending = still_pending;
            self.publish(&chunks);
            if records > 0 {
                last_commit = Some(Instant::now());
            }
        }
    }

    /// Writes one batch. Returns the acknowledgements still waiting.
    ///
    /// `retry`: an earlier attempt at this batch failed, and a failure does
    /// not say the store did not commit it (a database that dies between its
    /// commit and the answer). Every record is then applied the way a replay
    /// is: checked first, stored at most once.
    fn commit(
        &mut self,
        chunks: &[Chunk],
        pending: &VecDeque<PendingAck>,
        retry: bool,
    ) -> Result<VecDeque<PendingAck>> {
        let mut decoded = Vec::with_capacity(chunks.len());
        // The ring of each decoded record (to tell its shard of a refusal).
        let mut rings = Vec::with_capacity(chunks.len());
        for chunk in chunks {
            for raw in &chunk.records {
                // A record that passed its checksum but does not decode was
                // written by an incompatible gateway: stop, do not guess.
                let record = Record::decode(raw).map_err(|error| {
                    anyhow::anyhow!(
                        "ring {}: {error}; is the gateway the same version?",
                        chunk.ring
                    )
                })?;
                decoded.push(store::Applied {
                    raw: raw.as_slice(),
                    record,
                    maybe_applied: chunk.maybe_applied || retry,
                });
                rings.push(chunk.ring);
            }
        }
        let heads = self.progress.barrier();
        let committed: Vec<u64> = {
            let rings = self.progress.rings.lock().expect("progress lock");
            rings.iter().map(|ring| ring.committed).collect()
        };
        let mut still_pending = VecDeque::new();
        let mut refused = Vec::new();
        let mut deletes_refused = Vec::new();
        self.writer.write_batch(&mut |tables| {
            still_pending.clear();
            let outcome = store::apply(tables, &decoded, self.group_members_max)?;
            refused = outcome.refused;
            deletes_refused = outcome.deletes_refused;
            for index in outcome.unresolved {
                if let Record::Ack(ack) = &decoded[index].record {
                    still_pending.push_back(PendingAck {
                        user: ack.user.to_owned(),
                        device: ack.device.to_owned(),
                        message_id: ack.message_id,
                        heads: heads.clone(),
                    });
                }
            }
            for ack in pending {
                if store::apply_ack(tables, &ack.user, &ack.device, ack.message_id)? {
                    continue;
                }
                // Every ring was read past where this ack was seen and its
                // message never came: the client named an id it was not sent.
                let read_past = ack
                    .heads
                    .iter()
                    .zip(&committed)
                    .all(|(head, committed)| committed >= head);
                if !read_past {
                    still_pending.push_back(PendingAck {
                        user: ack.user.clone(),
                        device: ack.device.clone(),
                        message_id: ack.message_id,
                        heads: ack.heads.clone(),
                    });
                }
            }
            while still_pending.len() > PENDING_ACKS_MAX {
                // Forgetting an ack only means a redelivery.
                still_pending.pop_front();
            }
            Ok(())
        })?;
        // Before the `Durable` that covers them (`publish`).
        if !refused.is_empty() || !deletes_refused.is_empty() {
            let paths: Vec<std::path::PathBuf> = {
                let rings = self.progress.rings.lock().expect("progress lock");
                rings.iter().map(|ring| ring.path.clone()).collect()
            };
            for (index, why) in &deletes_refused {
                if let Record::Message(message) = &decoded[*index].record {
                    tracing::info!(
                        message_id = message.message_id,
                        why,
                        "delete for everyone refused"
                    );
                    self.sessions
                        .refused(&paths[rings[*index]], message.message_id, why);
                }
            }
            let reason = format!("a group has at most {} members", self.group_members_max);
            for index in &refused {
                if let Record::Message(message) = &decoded[*index].record {
                    tracing::info!(
                        message_id = message.message_id,
                        group = message.to,
                        "group change refused: past the bound"
                    );
                    self.sessions
                        .refused(&paths[rings[*index]], message.message_id, &reason);
                }
            }
        }
        // Durable now: recipients that did not get it live may be pushed.
        if let Some(push) = &self.push {
            for (index, applied) in decoded.iter().enumerate() {
                if refused.contains(&index) || deletes_refused.iter().any(|(i, _)| *i == index) {
                    continue;
                }
                if let Record::Message(message) = &applied.record {
                    push.offer(message);
                }
            }
        }
        Ok(still_pending)
    }

    /// After a durable batch: advance watermarks, wake readers, tell shards.
    fn publish(&self, chunks: &[Chunk]) {
        let mut notices = Vec::new();
        {
            let mut rings = self.progress.rings.lock().expect("progress lock");
            for chunk in chunks {
                let ring = &mut rings[chunk.ring];
                ring.watermark.commit(chunk.end);
                ring.committed = ring.committed.max(chunk.end);
                notices.push((ring.shard, ring.path.clone(), ring.committed));
            }
        }
        self.progress.committed.notify_all();
        notices.sort();
        notices.dedup_by(|a, b| {
            a.1 == b.1 && {
                b.2 = b.2.max(a.2);
                true
            }
        });
        for (_, path, position) in notices {
            self.sessions.durable(&path, position);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::EmbeddedBackend;
    use crate::store::embedded::{Embedded, Fsync};
    use crate::store::Backend;
    use chat_protocol::records::MessageRecord;

    /// Commits each batch, then (the first time) reports a failure: the
    /// database that went away after its commit, before its answer.
    struct AnswerLost {
        inner: Box<dyn BatchWriter>,
        failed: bool,
    }

    impl BatchWriter for AnswerLost {
        fn write_batch(
            &mut self,
            work: &mut dyn FnMut(&mut dyn store::Tables) -> Result<()>,
        ) -> Result<()> {
            self.inner.write_batch(work)?;
            if !self.failed {
                self.failed = true;
                anyhow::bail!("connection closed before the commit was answered");
            }
            Ok(())
        }
    }

    #[test]
    fn a_batch_retried_after_a_lost_commit_answer_is_stored_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Embedded::open(&dir.path().join("store"), 1 << 20, Fsync::None, None).unwrap();
        let backend = EmbeddedBackend(store);
        let progress = Arc::new(Progress {
            rings: Default::default(),
            committed: Default::default(),
        });
        let (_rings, drains) = crate::rings::Rings::new(progress.clone());
        let mut commit = CommitLoop {
            drains,
            writer: Box::new(AnswerLost {
                inner: backend.writer().unwrap(),
                failed: false,
            }),
            progress,
            sessions: Default::default(),
            stats: Default::default(),
            batch_records_max: 64,
            batch_time_target: Duration::ZERO,
            group_members_max: 1024,
            batch_linger: Duration::ZERO,
            stop: Default::default(),
            push: None,
        };
        let record = |id: u64, client: &str| {
            MessageRecord {
                message_id: id,
                ts: id,
                conversation: "dm:alice:bob",
                from: "alice",
                from_device: "phone",
                to: "bob",
                client_msg_id: client,
                body: "x",
                media: None,
                event: None,
                bodies: Vec::new(),
                recipients: Vec::new(),
            }
            .encode()
        };
        let batch = [Chunk {
            ring: 0,
            maybe_applied: false,
            records: vec![record(10, "c10"), record(11, "c11")],
            end: 0,
        }];
        let none = VecDeque::new();
        assert!(commit.commit(&batch, &none, false).is_err());
        commit.commit(&batch, &none, true).unwrap();

        let mut reader = backend.reader().unwrap();
        let inbox = reader.inbox_after("bob", 0, 10).unwrap();
        assert_eq!(
            inbox.iter().map(|e| e.message_id).collect::<Vec<_>>(),
            [10, 11],
            "each message in bob's inbox once"
        );
        assert_eq!(reader.history("dm:alice:bob", None, 10).unwrap().len(), 2);
    }
}
