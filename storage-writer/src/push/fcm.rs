//! FCM: Firebase Cloud Messaging's HTTP v1 API.
//!
//! Owns the OAuth2 access token (the service account signs an RS256 JWT
//! assertion, RFC 7523, scope `firebase.messaging`, exchanged at the
//! account's `token_uri`; kept until a minute before it expires), the
//! request (`POST /v1/projects/<project>/messages:send`: a data message,
//! Android priority high, `collapse_key` per conversation, `ttl`) and FCM's
//! answers (200 sent; 404 or `UNREGISTERED` the token is gone; 401 a new
//! access token; 429 and 5xx retried, honouring `Retry-After`). The token
//! exchange is written here rather than taken from `gcp_auth` or
//! `yup-oauth2` because both bring their own HTTP client and trust
//! settings, and this writer has one client for every provider (the same
//! pool, the same CA settings). Never logs the key or a token.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};

use super::job::{transient, Job, Outcome};
use super::settings::PushArgs;

const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// An access token is renewed this long before Google says it expires.
const RENEW_BEFORE: Duration = Duration::from_secs(60);

/// The fields of a service-account key file this uses.
#[derive(Deserialize)]
struct ServiceAccount {
    project_id: String,
    client_email: String,
    private_key: String,
    token_uri: String,
}

pub struct Fcm {
    key: EncodingKey,
    client_email: String,
    token_uri: String,
    send_url: String,
    ttl_s: u64,
    token: tokio::sync::Mutex<Option<(String, Instant)>>,
}

#[derive(Serialize)]
struct Assertion<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    expires_in: u64,
}

impl Fcm {
    pub fn load(path: &Path, args: &PushArgs) -> Result<Self> {
        let text = std::fs::read(path)
            .with_context(|| format!("reading --push-fcm-service-account {}", path.display()))?;
        let account: ServiceAccount = serde_json::from_slice(&text).map_err(|error| {
            anyhow::anyhow!(
                "--push-fcm-service-account {}: not a service-account key file ({error})",
                path.display()
            )
        })?;
        let key = EncodingKey::from_rsa_pem(account.private_key.as_bytes()).map_err(|error| {
            anyhow::anyhow!(
                "--push-fcm-service-account {}: private_key is not an RSA key in PEM ({error})",
                path.display()
            )
        })?;
        Ok(Self {
            key,
            client_email: account.client_email,
            token_uri: account.token_uri,
            send_url: format!(
                "{}/v1/projects/{}/messages:send",
                args.push_fcm_url.trim_end_matches('/'),
                account.project_id
            ),
            ttl_s: args.push_ttl_s,
            token: tokio::sync::Mutex::new(None),
        })
    }

    /// The current access token; fetched anew when near expiry or `fresh`.
    async fn access_token(&self, client: &reqwest::Client, fresh: bool) -> Option<String> {
        let mut cached = self.token.lock().await;
        if let Some((token, until)) = cached.as_ref() {
            if !fresh && Instant::now() < *until {
                return Some(token.clone());
            }
        }
        let now = crate::store::unix_ms_now() / 1_000;
        let assertion = Assertion {
            iss: &self.client_email,
            scope: SCOPE,
            aud: &self.token_uri,
            iat: now,
            exp: now + 3_600,
        };
        let jwt =
            jsonwebtoken::encode(&Header::new(Algorithm::RS256), &assertion, &self.key).ok()?;
        let answer = client
            .post(&self.token_uri)
            .form(&[
                ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                ("assertion", jwt.as_str()),
            ])
            .send()
            .await
            .ok()?;
        if !answer.status().is_success() {
            tracing::warn!(
                status = answer.status().as_u16(),
                "FCM: the OAuth2 token exchange was refused"
            );
            return None;
        }
        let answer: TokenAnswer = answer.json().await.ok()?;
        let until =
            Instant::now() + Duration::from_secs(answer.expires_in).saturating_sub(RENEW_BEFORE);
        *cached = Some((answer.access_token.clone(), until));
        Some(answer.access_token)
    }

    pub async fn send(
        &self,
        client: &reqwest::Client,
        registration_token: &str,
        job: &Job,
        fresh: bool,
    ) -> Outcome {
        let Some(access_token) = self.access_token(client, fresh).await else {
            return Outcome::Auth;
        };
        // Data values are strings in FCM's v1 API.
        let mut data = serde_json::Map::new();
        data.insert("type".into(), job.payload.kind.clone().into());
        data.insert("count".into(), job.payload.count.to_string().into());
        data.insert("message_id".into(), job.payload.message_id.clone().into());
        if let Some(from) = &job.payload.from {
            data.insert("from".into(), from.clone().into());
        }
        if let Some(conversation) = &job.payload.conversation {
            data.insert("conversation".into(), conversation.clone().into());
        }
        let body = serde_json::json!({
            "message": {
                "token": registration_token,
                "data": data,
                "android": {
                    "priority": "HIGH",
                    "collapse_key": job.collapse,
                    "ttl": format!("{}s", self.ttl_s),
                },
            }
        });
        let response = match client
            .post(&self.send_url)
            .bearer_auth(access_token)
            .json(&body)
            .send()
            .await
        {
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
        if status == 401 {
            return Outcome::Auth;
        }
        if status == 404 {
            return Outcome::Invalid;
        }
        let error: serde_json::Value = response.json().await.unwrap_or_default();
        let unregistered = error["error"]["details"].as_array().is_some_and(|details| {
            details
                .iter()
                .any(|detail| detail["errorCode"] == "UNREGISTERED")
        });
        if unregistered {
            Outcome::Invalid
        } else {
            Outcome::Refused
        }
    }
}
