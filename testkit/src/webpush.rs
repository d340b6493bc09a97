//! A real Web Push service for the tests: the npm package
//! `web-push-testing` (installed by `npm ci` in `clients/js`), which checks
//! each push's VAPID signature against the subscription's key and decrypts
//! its `aes128gcm` payload, run as a child on a free loopback port.
//!
//! Owns starting it (killed when dropped), subscribing, reading back what a
//! subscription was sent, and expiring a subscription (its endpoint then
//! answers 410). Every wait is bounded by `WAIT`. Also owns the tests'
//! VAPID key: a fresh P-256 key in a PEM file for `--push-vapid-key`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{free_port, repo, KillOnDrop, WAIT};

/// A fresh VAPID key (P-256) in a PEM file, removed when dropped.
pub struct VapidKey {
    _dir: tempfile::TempDir,
    /// The PEM file, for the writer's `--push-vapid-key`.
    pub path: std::path::PathBuf,
    /// The uncompressed public point (the subscription's
    /// `applicationServerKey`, once base64url-encoded).
    pub public_key_raw: Vec<u8>,
}

impl VapidKey {
    pub fn generate() -> VapidKey {
        let key = rcgen::KeyPair::generate().expect("a P-256 key");
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("vapid.pem");
        std::fs::write(&path, key.serialize_pem()).expect("the VAPID key is written");
        VapidKey {
            _dir: dir,
            path,
            public_key_raw: key.public_key_raw().to_vec(),
        }
    }
}

pub struct WebPushService {
    _child: KillOnDrop,
    pub port: u16,
}

/// A subscription as a browser's `PushSubscription.toJSON()` gives it.
#[derive(Debug, Clone)]
pub struct Subscription {
    pub endpoint: String,
    pub p256dh: String,
    pub auth: String,
    /// The service's name for it (reading and expiring use it).
    pub client_hash: String,
}

impl WebPushService {
    pub fn start() -> WebPushService {
        let server = repo().join("clients/js/node_modules/web-push-testing/src/bin/server.js");
        assert!(
            server.exists(),
            "{} is missing: run `npm ci` in clients/js (scripts/test does)",
            server.display()
        );
        let port = free_port();
        let child = Command::new("node")
            .arg(&server)
            .arg(port.to_string())
            .current_dir(std::env::temp_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node runs web-push-testing");
        let service = WebPushService {
            _child: KillOnDrop(child),
            port,
        };
        let deadline = Instant::now() + WAIT;
        while service
            .post("/status", &Value::Null)
            .map(|(status, _)| status)
            != Some(200)
        {
            assert!(Instant::now() < deadline, "web-push-testing did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        service
    }

    /// POST `body` as JSON; (status, JSON answer).
    fn post(&self, path: &str, body: &Value) -> Option<(u16, Value)> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream.set_read_timeout(Some(WAIT)).ok()?;
        let body = if body.is_null() {
            String::new()
        } else {
            body.to_string()
        };
        write!(
            stream,
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let (head, body) = response.split_once("\r\n\r\n")?;
        let status = head.get(9..12)?.parse().ok()?;
        Some((status, serde_json::from_str(body).unwrap_or(Value::Null)))
    }

    /// A new subscription for the VAPID public key `application_server_key`
    /// (base64url of the uncompressed P-256 point).
    pub fn subscribe(&self, application_server_key: &str) -> Subscription {
        let (status, answer) = self
            .post(
                "/subscribe",
                &serde_json::json!({"userVisibleOnly": "true", "applicationServerKey": application_server_key}),
            )
            .expect("the push service answers");
        assert_eq!(status, 200, "{answer}");
        let data = &answer["data"];
        Subscription {
            endpoint: data["endpoint"].as_str().unwrap().to_owned(),
            p256dh: data["keys"]["p256dh"].as_str().unwrap().to_owned(),
            auth: data["keys"]["auth"].as_str().unwrap().to_owned(),
            client_hash: data["clientHash"].as_str().unwrap().to_owned(),
        }
    }

    /// Every push the subscription received so far, decrypted by the service.
    pub fn notifications(&self, subscription: &Subscription) -> Vec<Value> {
        let (status, answer) = self
            .post(
                "/get-notifications",
                &serde_json::json!({"clientHash": subscription.client_hash}),
            )
            .expect("the push service answers");
        assert_eq!(status, 200, "{answer}");
        answer["data"]["messages"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Waits (bounded) until the subscription has received `count` pushes.
    pub fn wait_notifications(&self, subscription: &Subscription, count: usize) -> Vec<Value> {
        let deadline = Instant::now() + WAIT;
        loop {
            let received = self.notifications(subscription);
            if received.len() >= count {
                return received;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {count} pushes arrived: {received:?}",
                received.len()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Makes the subscription's endpoint answer 410 Gone from now on.
    pub fn expire(&self, subscription: &Subscription) {
        let path = format!("/expire-subscription/{}", subscription.client_hash);
        let (status, answer) = self
            .post(&path, &Value::Null)
            .expect("the push service answers");
        assert_eq!(status, 200, "{answer}");
    }
}
