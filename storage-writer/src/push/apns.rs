//! APNs: Apple's token-based provider API over HTTP/2.
//!
//! Owns the provider token (an ES256 JWT signed with the `.p8` key, `kid`
//! the key id, `iss` the team id, `iat` now; made again every
//! `TOKEN_LIFETIME`, inside Apple's one hour and no more often than its 20
//! minutes), the request (`POST /3/device/<token>` with `apns-push-type:
//! alert`, `apns-priority: 10`, `apns-topic`, `apns-collapse-id` and
//! `apns-expiration`; a content-free alert body) and Apple's answers (200
//! sent; 410, or 400 `BadDeviceToken` / `DeviceTokenNotForTopic`, the token is
//! gone; 403 `ExpiredProviderToken` / `InvalidProviderToken` a new provider
//! token; 429 and 5xx retried). Never logs the key, a token or a JWT.

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};

use super::job::{alert_text, transient, Job, Outcome};
use super::settings::PushArgs;

/// How long one provider token is used (Apple: refresh between 20 and 60 minutes).
const TOKEN_LIFETIME: Duration = Duration::from_secs(30 * 60);

pub struct Apns {
    key: EncodingKey,
    key_id: String,
    team_id: String,
    url: String,
    sandbox_url: String,
    ttl_s: u64,
    token: Mutex<Option<(String, Instant)>>,
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    iat: u64,
}

#[derive(Deserialize)]
struct ErrorBody {
    reason: String,
}

impl Apns {
    pub fn load(path: &Path, args: &PushArgs) -> Result<Self> {
        let pem = std::fs::read(path)
            .with_context(|| format!("reading --push-apns-key {}", path.display()))?;
        let key = EncodingKey::from_ec_pem(&pem).map_err(|error| {
            anyhow::anyhow!(
                "--push-apns-key {}: not an EC private key in PEM (.p8) ({error})",
                path.display()
            )
        })?;
        anyhow::ensure!(
            !args.push_apns_key_id.is_empty() && !args.push_apns_team_id.is_empty(),
            "--push-apns-key needs --push-apns-key-id and --push-apns-team-id"
        );
        Ok(Self {
            key,
            key_id: args.push_apns_key_id.clone(),
            team_id: args.push_apns_team_id.clone(),
            url: args.push_apns_url.trim_end_matches('/').to_owned(),
            sandbox_url: args.push_apns_sandbox_url.trim_end_matches('/').to_owned(),
            ttl_s: args.push_ttl_s,
            token: Mutex::new(None),
        })
    }

    /// The current provider token, made anew when old or when `fresh`.
    fn provider_token(&self, fresh: bool) -> Option<String> {
        let mut cached = self.token.lock().expect("apns token lock");
        if let Some((token, made)) = cached.as_ref() {
            if !fresh && made.elapsed() < TOKEN_LIFETIME {
                return Some(token.clone());
            }
        }
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.key_id.clone());
        let claims = Claims {
            iss: &self.team_id,
            iat: crate::store::unix_ms_now() / 1_000,
        };
        let token = jsonwebtoken::encode(&header, &claims, &self.key).ok()?;
        *cached = Some((token.clone(), Instant::now()));
        Some(token)
    }

    pub async fn send(
        &self,
        client: &reqwest::Client,
        device_token: &str,
        topic: &str,
        sandbox: bool,
        job: &Job,
        fresh: bool,
    ) -> Outcome {
        let Some(provider_token) = self.provider_token(fresh) else {
            return Outcome::Auth;
        };
        let base = if sandbox {
            &self.sandbox_url
        } else {
            &self.url
        };
        let expiration = crate::store::unix_ms_now() / 1_000 + self.ttl_s;
        let body = serde_json::json!({
            "aps": {
                "alert": { "title": "Chat", "body": alert_text(job.payload.count) },
                "sound": "default",
                "mutable-content": 1,
                "thread-id": job.collapse,
            },
            "chat": job.payload,
        });
        let request = client
            .post(format!("{base}/3/device/{device_token}"))
            .bearer_auth(provider_token)
            .header("apns-push-type", "alert")
            .header("apns-priority", "10")
            .header("apns-topic", topic)
            .header("apns-collapse-id", &job.collapse)
            .header("apns-expiration", expiration.to_string())
            .json(&body);
        let response = match request.send().await {
            Ok(response) => response,
            Err(_) => return Outcome::Retry(None, super::stats::Failure::Unavailable),
        };
        let status = response.status().as_u16();
        if status == 200 {
            return Outcome::Sent;
        }
        if status == 429 || status >= 500 {
            return transient(&response);
        }
        let reason = response
            .json::<ErrorBody>()
            .await
            .map(|body| body.reason)
            .unwrap_or_default();
        match (status, reason.as_str()) {
            (410, _) | (400, "BadDeviceToken" | "DeviceTokenNotForTopic") => Outcome::Invalid,
            (403, "ExpiredProviderToken" | "InvalidProviderToken") => Outcome::Auth,
            _ => Outcome::Refused,
        }
    }
}
