//! The push sender: an async runtime on its own thread that sends what the
//! worker decided, to APNs, FCM or a Web Push service.
//!
//! Owns the one HTTP client (rustls; HTTP/2 where the provider speaks it,
//! so many requests share few connections), the bound on requests in flight,
//! retries with full-jitter back-off that honour `Retry-After` on 429 and
//! 5xx, and the outcome of each push: counted, and a target the provider
//! called invalid sent back to the worker to be removed. What a provider's
//! request looks like is its own file's. Never blocks the worker: a full
//! queue drops the push and counts it.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use chat_protocol::push::PushTarget;

pub use super::job::Job;
use super::job::Outcome;
use super::settings::PushArgs;
use super::stats::{provider_index, Failure, PushStats};
use super::{apns, fcm, webpush};

/// Tries per push (the first and two retries) before it counts as failed.
const ATTEMPTS: u32 = 3;
/// First retry delay (full jitter up to it, doubling per try).
const RETRY_BASE: Duration = Duration::from_millis(500);
/// The longest `Retry-After` honoured; a longer one fails the push (the
/// device syncs when it next connects either way).
const RETRY_AFTER_MAX: Duration = Duration::from_secs(60);
/// One request's bound, connection set-up included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Pushes decided but not yet started, at most.
const JOBS_QUEUED_MAX: usize = 16_384;
/// Invalid targets waiting for the worker to remove, at most.
const PRUNES_QUEUED_MAX: usize = 4_096;

/// The providers this writer has credentials for.
pub struct Providers {
    pub client: reqwest::Client,
    pub webpush: Option<webpush::WebPush>,
    pub apns: Option<apns::Apns>,
    pub fcm: Option<fcm::Fcm>,
}

impl Providers {
    pub fn load(args: &PushArgs) -> Result<Self> {
        let mut client = reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("chat-storage-writer/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &args.push_ca_file {
            let pem = std::fs::read(path)
                .with_context(|| format!("reading --push-ca-file {}", path.display()))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem).with_context(|| {
                format!("--push-ca-file {}: not PEM certificates", path.display())
            })? {
                client = client.add_root_certificate(cert);
            }
        }
        Ok(Self {
            client: client.build().context("building the push HTTP client")?,
            webpush: args
                .push_vapid_key
                .as_deref()
                .map(|key| webpush::WebPush::load(key, &args.push_vapid_subject, args.push_ttl_s))
                .transpose()?,
            apns: args
                .push_apns_key
                .as_deref()
                .map(|key| apns::Apns::load(key, args))
                .transpose()?,
            fcm: args
                .push_fcm_service_account
                .as_deref()
                .map(|account| fcm::Fcm::load(account, args))
                .transpose()?,
        })
    }

    async fn send(&self, job: &Job, fresh_credential: bool) -> Outcome {
        match &job.target {
            PushTarget::Webpush {
                endpoint,
                p256dh,
                auth,
            } => match &self.webpush {
                Some(webpush) => {
                    webpush
                        .send(&self.client, endpoint, p256dh, auth, job)
                        .await
                }
                None => Outcome::NotConfigured,
            },
            PushTarget::Apns {
                token,
                topic,
                sandbox,
            } => match &self.apns {
                Some(apns) => {
                    apns.send(&self.client, token, topic, *sandbox, job, fresh_credential)
                        .await
                }
                None => Outcome::NotConfigured,
            },
            PushTarget::Fcm { token } => match &self.fcm {
                Some(fcm) => fcm.send(&self.client, token, job, fresh_credential).await,
                None => Outcome::NotConfigured,
            },
        }
    }
}

/// The worker's end of the sender.
pub struct SendQueue {
    jobs: tokio::sync::mpsc::Sender<Job>,
    prunes: crossbeam_channel::Receiver<(String, String, Vec<u8>)>,
    stats: Arc<PushStats>,
}

impl SendQueue {
    /// Queues a push; a full queue drops it (counted as unavailable).
    pub fn submit(&self, job: Job) {
        let kind = job.target.kind();
        if self.jobs.try_send(job).is_err() {
            self.stats.failed(kind, Failure::Unavailable);
        }
    }

    /// A target a provider called invalid, to remove.
    pub fn next_prune(&self) -> Option<(String, String, Vec<u8>)> {
        self.prunes.try_recv().ok()
    }
}

/// Starts the sender's thread and runtime.
pub fn start(providers: Providers, args: &PushArgs, stats: Arc<PushStats>) -> Result<SendQueue> {
    let (jobs, mut receiver) = tokio::sync::mpsc::channel::<Job>(JOBS_QUEUED_MAX);
    let (prune_tx, prunes) = crossbeam_channel::bounded(PRUNES_QUEUED_MAX);
    let in_flight = Arc::new(tokio::sync::Semaphore::new(args.push_in_flight.max(1)));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("the push sender's runtime")?;
    let providers = Arc::new(providers);
    let sender_stats = stats.clone();
    std::thread::Builder::new()
        .name("push-send".into())
        .spawn(move || {
            runtime.block_on(async move {
                while let Some(job) = receiver.recv().await {
                    let Ok(permit) = in_flight.clone().acquire_owned().await else {
                        return;
                    };
                    let (providers, stats, prune_tx) =
                        (providers.clone(), sender_stats.clone(), prune_tx.clone());
                    stats.in_flight.fetch_add(1, Relaxed);
                    tokio::spawn(async move {
                        deliver(&providers, &stats, &prune_tx, job).await;
                        stats.in_flight.fetch_sub(1, Relaxed);
                        drop(permit);
                    });
                }
            });
        })?;
    Ok(SendQueue {
        jobs,
        prunes,
        stats,
    })
}

/// Sends one push, retrying what may succeed later.
async fn deliver(
    providers: &Providers,
    stats: &PushStats,
    prunes: &crossbeam_channel::Sender<(String, String, Vec<u8>)>,
    job: Job,
) {
    let kind = job.target.kind();
    let provider = &stats.providers[provider_index(kind)];
    let mut fresh_credential = false;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let outcome = providers.send(&job, fresh_credential).await;
        let retry = match outcome {
            Outcome::Sent => {
                provider.sent.fetch_add(1, Relaxed);
                provider.latency.record(job.durable_at.elapsed());
                return;
            }
            Outcome::Invalid => {
                provider.pruned.fetch_add(1, Relaxed);
                stats.failed(kind, Failure::Invalid);
                let _ = prunes.try_send((job.user, job.device, job.stored));
                return;
            }
            Outcome::Refused => {
                stats.failed(kind, Failure::Refused);
                return;
            }
            Outcome::Auth if !fresh_credential => {
                fresh_credential = true;
                None
            }
            Outcome::Auth => {
                stats.failed(kind, Failure::Auth);
                return;
            }
            Outcome::NotConfigured => {
                stats.failed(kind, Failure::NotConfigured);
                return;
            }
            Outcome::Retry(after, failure) => {
                if attempt >= ATTEMPTS || after.is_some_and(|after| after > RETRY_AFTER_MAX) {
                    stats.failed(kind, failure);
                    return;
                }
                Some(after.unwrap_or_else(|| {
                    let ceiling = RETRY_BASE * 2u32.pow(attempt - 1);
                    ceiling.mul_f64(fastrand::f64())
                }))
            }
        };
        provider.retries.fetch_add(1, Relaxed);
        if let Some(delay) = retry {
            tokio::time::sleep(delay).await;
        }
    }
}
