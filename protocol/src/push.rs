//! Push targets: where a device wants to be woken when a message waits and
//! it is not connected (APNs, FCM, Web Push), and the payload it is woken with.
//!
//! Owns the shapes a client registers (`push_register`), their limits and
//! checks, the stored form (JSON, so a database row is readable and a new
//! field is not a format break), and the content-free notification payload.
//! Never sends anything and never decides when to push (the storage-writer's
//! push worker does).

use serde::{Deserialize, Serialize};

pub use crate::limits::{
    PUSH_APNS_TOKEN_CHARS_MAX, PUSH_ENDPOINT_BYTES_MAX, PUSH_FCM_TOKEN_CHARS_MAX,
    PUSH_TOPIC_CHARS_MAX,
};

/// One device's push target, as registered and as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum PushTarget {
    /// Apple Push Notification service: the device token (hex), the app's
    /// bundle id (`apns-topic`), and which APNs environment issued it.
    Apns {
        token: String,
        topic: String,
        #[serde(default)]
        sandbox: bool,
    },
    /// Firebase Cloud Messaging (HTTP v1): the registration token.
    Fcm { token: String },
    /// Web Push (RFC 8030): the subscription's endpoint and keys (RFC 8291),
    /// as `PushSubscription.toJSON()` gives them.
    Webpush {
        endpoint: String,
        p256dh: String,
        auth: String,
    },
}

/// Base64url characters (unpadded, as browsers give subscription keys).
fn is_base64url(text: &str) -> bool {
    text.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Characters of unpadded base64 for `bytes` bytes.
const fn base64_chars(bytes: usize) -> usize {
    (bytes * 8).div_ceil(6)
}

impl PushTarget {
    /// The provider's name, for metrics and answers.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Apns { .. } => "apns",
            Self::Fcm { .. } => "fcm",
            Self::Webpush { .. } => "webpush",
        }
    }

    /// Why this target is refused, if it is. `loopback_http`: a Web Push
    /// endpoint may be plain `http://` on a loopback host (a push service
    /// run locally, for development and tests); otherwise it must be `https://`.
    pub fn problem(&self, loopback_http: bool) -> Option<String> {
        match self {
            Self::Apns {
                token,
                topic,
                sandbox: _,
            } => {
                if token.len() < 64
                    || token.len() > PUSH_APNS_TOKEN_CHARS_MAX
                    || token.len() % 2 != 0
                    || !token.bytes().all(|b| b.is_ascii_hexdigit())
                {
                    return Some(format!(
                        "an APNs `token` is 64-{PUSH_APNS_TOKEN_CHARS_MAX} hex characters"
                    ));
                }
                if topic.is_empty()
                    || topic.len() > PUSH_TOPIC_CHARS_MAX
                    || !topic
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
                {
                    return Some(format!(
                        "an APNs `topic` is the app's bundle id, 1-{PUSH_TOPIC_CHARS_MAX} characters of [A-Za-z0-9.-]"
                    ));
                }
                None
            }
            Self::Fcm { token } => {
                if token.is_empty()
                    || token.len() > PUSH_FCM_TOKEN_CHARS_MAX
                    || !token
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'-' | b'_'))
                {
                    return Some(format!(
                        "an FCM `token` is 1-{PUSH_FCM_TOKEN_CHARS_MAX} characters of [A-Za-z0-9:_-]"
                    ));
                }
                None
            }
            Self::Webpush {
                endpoint,
                p256dh,
                auth,
            } => {
                if let Some(problem) = endpoint_problem(endpoint, loopback_http) {
                    return Some(problem);
                }
                // An uncompressed P-256 point (65 bytes) and a 16-byte secret.
                if p256dh.len() != base64_chars(65) || !is_base64url(p256dh) {
                    return Some("`p256dh` must be the subscription's P-256 key: 65 bytes, base64url without padding".into());
                }
                if auth.len() != base64_chars(16) || !is_base64url(auth) {
                    return Some(
                        "`auth` must be the subscription's 16-byte secret, base64url without padding"
                            .into(),
                    );
                }
                None
            }
        }
    }

    /// The stored form.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a push target always serializes")
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }
}

/// Why a Web Push endpoint is refused, if it is.
fn endpoint_problem(endpoint: &str, loopback_http: bool) -> Option<String> {
    if endpoint.len() > PUSH_ENDPOINT_BYTES_MAX
        || endpoint
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Some(format!(
            "`endpoint` must be a URL of at most {PUSH_ENDPOINT_BYTES_MAX} bytes"
        ));
    }
    if let Some(rest) = endpoint.strip_prefix("https://") {
        return (rest.is_empty() || rest.starts_with('/'))
            .then(|| "`endpoint` has no host".to_owned());
    }
    if let Some(rest) = endpoint.strip_prefix("http://") {
        let host = rest.split(['/', '?']).next().unwrap_or_default();
        let host = host.rsplit_once(':').map_or(host, |(host, _port)| host);
        let loopback = matches!(host, "localhost" | "[::1]") || host.starts_with("127.");
        if loopback && loopback_http {
            return None;
        }
        return Some(if loopback {
            "`endpoint` is plain http on loopback, which this node does not allow (push_loopback_endpoints)".into()
        } else {
            "`endpoint` must be an https:// URL".into()
        });
    }
    Some("`endpoint` must be an https:// URL".into())
}

/// What a notification says: content-free, since bodies are end-to-end
/// encrypted and the server cannot read them. The app wakes, syncs and
/// decrypts on the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushPayload {
    /// Always "new_messages".
    #[serde(rename = "type")]
    pub kind: String,
    /// Messages waiting since the last push (a burst is one notification).
    pub count: u32,
    /// The newest waiting message's id (a decimal string, as in frames).
    pub message_id: String,
    /// The sender and conversation, only where the operator allows them
    /// (`push_include_sender`): the push services see them.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub conversation: Option<String>,
}

/// `push_registered` / `push_unregistered`: the answer to a registration
/// (`type` first, as in every server frame).
pub fn encode_push_answer(client_id: &str, kind: Option<&str>) -> Vec<u8> {
    #[derive(Serialize)]
    struct Answer<'a> {
        #[serde(rename = "type")]
        frame: &'a str,
        id: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        kind: Option<&'a str>,
    }
    let frame = if kind.is_some() {
        "push_registered"
    } else {
        "push_unregistered"
    };
    serde_json::to_vec(&Answer {
        frame,
        id: client_id,
        kind,
    })
    .expect("an answer always serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn webpush(endpoint: &str) -> PushTarget {
        PushTarget::Webpush {
            endpoint: endpoint.into(),
            p256dh: "B".repeat(87),
            auth: "a".repeat(22),
        }
    }

    #[test]
    fn good_targets_pass_and_round_trip() {
        for target in [
            PushTarget::Apns {
                token: "ab".repeat(32),
                topic: "org.example.chat".into(),
                sandbox: true,
            },
            PushTarget::Fcm {
                token: "dXk:APA91b-x_y".into(),
            },
            webpush("https://fcm.googleapis.com/fcm/send/abc"),
        ] {
            assert_eq!(target.problem(false), None, "{target:?}");
            assert_eq!(PushTarget::decode(&target.encode()), Some(target));
        }
        assert_eq!(
            webpush("http://127.0.0.1:8090/notify/x").problem(true),
            None
        );
    }

    #[test]
    fn bad_targets_say_why() {
        let cases = [
            (
                PushTarget::Apns {
                    token: "xyz".into(),
                    topic: "a".into(),
                    sandbox: false,
                },
                "hex",
            ),
            (
                PushTarget::Apns {
                    token: "ab".repeat(32),
                    topic: "has space".into(),
                    sandbox: false,
                },
                "bundle id",
            ),
            (PushTarget::Fcm { token: "".into() }, "FCM"),
            (webpush("ftp://example.org/"), "https://"),
            (webpush("http://push.example.org/"), "https://"),
            (webpush("http://127.0.0.1:8090/x"), "loopback"),
            (webpush("https://"), "no host"),
            (
                PushTarget::Webpush {
                    endpoint: "https://push.example.org/x".into(),
                    p256dh: "short".into(),
                    auth: "a".repeat(22),
                },
                "p256dh",
            ),
            (
                PushTarget::Webpush {
                    endpoint: "https://push.example.org/x".into(),
                    p256dh: "B".repeat(87),
                    auth: "a+b=".into(),
                },
                "auth",
            ),
        ];
        for (target, expected) in cases {
            let problem = target.problem(false).expect("refused");
            assert!(problem.contains(expected), "{target:?}: {problem}");
        }
        let long = format!("https://push.example.org/{}", "x".repeat(2000));
        assert!(webpush(&long).problem(false).unwrap().contains("at most"));
        assert_eq!(PushTarget::decode(br#"{"kind":"carrier-pigeon"}"#), None);
    }
}
