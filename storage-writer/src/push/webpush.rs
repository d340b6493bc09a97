//! Web Push (RFC 8030) with VAPID (RFC 8292) and the `aes128gcm` payload
//! encryption of RFC 8291, through `web-push-native`.
//!
//! Owns the VAPID key (a P-256 PEM file) and its signed header per push
//! service (reused for an hour), building one push request (the
//! encrypted payload, `TTL`, `Urgency: high`, a `Topic` per conversation so
//! the service replaces an undelivered older push) and reading the push
//! service's answer (201 sent; 404 and 410 the subscription is gone; 429 and
//! 5xx retried). Never logs the key or an endpoint (endpoints are capabilities).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use base64ct::{Base64UrlUnpadded, Encoding};
use web_push_native::jwt_simple::algorithms::ES256KeyPair;
use web_push_native::vapid::VapidSignature;
use web_push_native::{p256, Auth, WebPushBuilder};

use super::job::{transient, Job, Outcome};

/// How long a VAPID JWT is valid (RFC 8292 §2: at most 24 hours).
const VAPID_JWT_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// How long one signed VAPID header is reused for a push service (signing
/// per push would be an ECDSA signature per push for nothing).
const VAPID_JWT_REUSE: Duration = Duration::from_secs(3600);
/// Push services (origins) whose VAPID header is kept, at most.
const VAPID_ORIGINS_MAX: usize = 1024;

pub struct WebPush {
    key: ES256KeyPair,
    subject: String,
    ttl: Duration,
    /// The signed `Authorization` header per push service origin.
    signatures: Mutex<HashMap<String, (String, Instant)>>,
}

impl WebPush {
    pub fn load(path: &Path, subject: &str, ttl_s: u64) -> Result<Self> {
        let pem = std::fs::read_to_string(path)
            .with_context(|| format!("reading --push-vapid-key {}", path.display()))?;
        let key = ES256KeyPair::from_pem(&pem).map_err(|error| {
            anyhow::anyhow!(
                "--push-vapid-key {}: not a P-256 private key in PEM ({error})",
                path.display()
            )
        })?;
        anyhow::ensure!(
            subject.starts_with("mailto:") || subject.starts_with("https://"),
            "--push-vapid-subject must be a mailto: or https: URL (RFC 8292 §2.1)"
        );
        Ok(Self {
            key,
            subject: subject.to_owned(),
            ttl: Duration::from_secs(ttl_s),
            signatures: Mutex::new(HashMap::new()),
        })
    }

    /// The VAPID header for `endpoint`'s push service, signed at most once
    /// per `VAPID_JWT_REUSE`.
    fn authorization(&self, endpoint: &http::Uri) -> Option<String> {
        let origin = format!("{}://{}", endpoint.scheme_str()?, endpoint.authority()?);
        let mut signatures = self.signatures.lock().expect("vapid cache lock");
        if let Some((header, made)) = signatures.get(&origin) {
            if made.elapsed() < VAPID_JWT_REUSE {
                return Some(header.clone());
            }
        }
        let header =
            VapidSignature::sign(endpoint, VAPID_JWT_LIFETIME, &self.subject, &self.key).ok()?;
        let header = header.to_string();
        if signatures.len() >= VAPID_ORIGINS_MAX {
            signatures.clear();
        }
        signatures.insert(origin, (header.clone(), Instant::now()));
        Some(header)
    }

    pub async fn send(
        &self,
        client: &reqwest::Client,
        endpoint: &str,
        p256dh: &str,
        auth: &str,
        job: &Job,
    ) -> Outcome {
        let Some(request) = self.request(endpoint, p256dh, auth, job) else {
            return Outcome::Invalid;
        };
        let (parts, body) = request.into_parts();
        let mut builder = client.post(parts.uri.to_string()).body(body);
        for (name, value) in &parts.headers {
            builder = builder.header(name.as_str(), value.as_bytes());
        }
        let builder = builder
            .header("Urgency", "high")
            .header("Topic", &job.collapse);
        match builder.send().await {
            Ok(response) => match response.status().as_u16() {
                200..=299 => Outcome::Sent,
                404 | 410 => Outcome::Invalid,
                429 | 500..=599 => transient(&response),
                401 | 403 => Outcome::Auth,
                _ => Outcome::Refused,
            },
            Err(_) => Outcome::Retry(None, super::stats::Failure::Unavailable),
        }
    }

    /// The signed, encrypted request; `None` when the subscription's keys
    /// are not usable (it can never be pushed: removed).
    fn request(
        &self,
        endpoint: &str,
        p256dh: &str,
        auth: &str,
        job: &Job,
    ) -> Option<http::Request<Vec<u8>>> {
        let public =
            p256::PublicKey::from_sec1_bytes(&Base64UrlUnpadded::decode_vec(p256dh).ok()?).ok()?;
        let auth = Base64UrlUnpadded::decode_vec(auth).ok()?;
        if auth.len() != 16 {
            return None;
        }
        let endpoint: http::Uri = endpoint.parse().ok()?;
        let authorization = self.authorization(&endpoint)?;
        let builder = WebPushBuilder::new(endpoint, public, Auth::clone_from_slice(&auth))
            .with_valid_duration(self.ttl);
        let payload = serde_json::to_vec(&job.payload).ok()?;
        let mut request = builder.build(payload).ok()?;
        request
            .headers_mut()
            .insert(http::header::AUTHORIZATION, authorization.parse().ok()?);
        Some(request)
    }
}
