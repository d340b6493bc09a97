//! The commit thread's end of push, and starting push.
//!
//! Owns `PushHandle::offer` (never blocks: a full queue is counted) and
//! `start`, which loads the credentials and runs the worker and the sender
//! on their own threads. Never waits on either.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use chat_protocol::records::MessageRecord;

use super::settings::{Candidate, PushArgs};
use super::stats::PushStats;
use super::{send, worker};
use crate::store::Backend;

/// The commit thread's end: offers recipients of durable messages.
pub struct PushHandle {
    queue: crossbeam_channel::Sender<Candidate>,
    pub stats: Arc<PushStats>,
}

impl PushHandle {
    /// Offers every recipient of `message` except its sender (whose own
    /// devices are never pushed for it). Only messages people wrote: no
    /// receipts, no membership changes. Never blocks.
    pub fn offer(&self, message: &MessageRecord<'_>) {
        if message.event.is_some() {
            return;
        }
        let durable_at = Instant::now();
        let recipients = crate::store::inbox_targets(message);
        for (user, _) in recipients.iter().filter(|(user, _)| *user != message.from) {
            self.stats.offered.fetch_add(1, Relaxed);
            let candidate = Candidate {
                user: (*user).to_owned(),
                from: message.from.to_owned(),
                message_id: message.message_id,
                durable_at,
            };
            match self.queue.try_send(candidate) {
                Ok(()) => {
                    self.stats.queue_depth.fetch_add(1, Relaxed);
                }
                Err(_) => {
                    self.stats.dropped.fetch_add(1, Relaxed);
                }
            }
        }
    }
}

/// Starts the push worker and sender when any provider is configured.
pub fn start(args: &PushArgs, backend: Arc<dyn Backend>) -> Result<Option<PushHandle>> {
    if !args.enabled() {
        return Ok(None);
    }
    let stats = Arc::new(PushStats::default());
    let providers = send::Providers::load(args).context("loading push credentials")?;
    let (queue, candidates) = crossbeam_channel::bounded(args.push_queue.max(1));
    let sender = send::start(providers, args, stats.clone())?;
    let worker = worker::Worker::new(
        args,
        backend
            .reader()
            .context("a storage handle for the push worker")?,
        candidates,
        sender,
        stats.clone(),
    );
    std::thread::Builder::new()
        .name("push".into())
        .spawn(move || worker.run())?;
    tracing::info!(
        ack_wait_ms = args.push_ack_wait_ms,
        coalesce_ms = args.push_coalesce_ms,
        "push enabled"
    );
    Ok(Some(PushHandle { queue, stats }))
}
