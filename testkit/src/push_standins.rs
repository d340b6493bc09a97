//! Stand-ins for APNs and FCM, which these machines cannot reach: HTTP/2
//! servers over TLS on loopback that check every request the way the real
//! service documents it, and answer with the real services' success and
//! error bodies.
//!
//! APNs (Apple's "Sending notification requests to APNs"): HTTP/2 only;
//! `POST /3/device/<hex token>`; `authorization: bearer <ES256 JWT>` whose
//! signature is checked against the team's public key, `kid` the key id,
//! `iss` the team id, `iat` within the hour; `apns-topic`, `apns-push-type`,
//! `apns-priority` (5 or 10), `apns-expiration`, `apns-collapse-id` (at
//! most 64 bytes); a JSON body with `aps`, at most 4 KB. Answers 200 with
//! `apns-id`, or `{"reason": ...}` with 400, 403, 410 (`Unregistered`) or
//! 429 (`TooManyRequests`).
//!
//! FCM (the HTTP v1 API and Google's OAuth2 JWT grant): `POST /token` with
//! an RS256 assertion checked against the service account's public key
//! (`iss`, `aud`, `scope`, at most an hour), answering an access token;
//! `POST /v1/projects/<id>/messages:send` with that token, a `message` with
//! `token`, string-valued `data`, `android.priority`; answers `{"name":...}`,
//! or Google's error body (404 `UNREGISTERED`, 429 `QUOTA_EXCEEDED` with
//! `Retry-After`, 401).
//!
//! Every request, accepted or not, is recorded for the test to look at.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{json, Value};

use crate::WAIT;

/// One request as the stand-in saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub path: String,
    pub version: String,
    pub headers: BTreeMap<String, String>,
    pub body: Value,
    /// The status it was answered with.
    pub status: u16,
}

#[derive(Default)]
struct State {
    requests: Vec<Recorded>,
    /// Device tokens the service calls gone.
    unregistered: HashSet<String>,
    /// The next this many sends are answered 429.
    throttle: u32,
    /// The next provider token (APNs) or access token (FCM) is refused as expired.
    expire_next_credential: bool,
    /// FCM: access tokens handed out, and token requests seen.
    issued: HashSet<String>,
    token_requests: u32,
}

enum Kind {
    Apns {
        key: DecodingKey,
        key_id: String,
        team_id: String,
    },
    Fcm {
        key: DecodingKey,
        client_email: String,
        project_id: String,
    },
}

pub struct StandIn {
    /// `https://127.0.0.1:<port>`.
    pub url: String,
    /// The CA that signed its certificate (for `--push-ca-file`).
    pub ca_file: PathBuf,
    state: Arc<Mutex<State>>,
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for StandIn {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl StandIn {
    /// APNs, trusting provider tokens signed by `public_key_pem` (EC P-256)
    /// with `key_id` for `team_id`.
    pub fn apns(public_key_pem: &str, key_id: &str, team_id: &str) -> StandIn {
        let kind = Kind::Apns {
            key: DecodingKey::from_ec_pem(public_key_pem.as_bytes()).expect("an EC public key"),
            key_id: key_id.into(),
            team_id: team_id.into(),
        };
        Self::start(kind, vec![b"h2".to_vec()])
    }

    /// FCM for `project_id`, trusting assertions by `client_email` signed
    /// by `public_key_pem` (RSA).
    pub fn fcm(public_key_pem: &str, client_email: &str, project_id: &str) -> StandIn {
        let kind = Kind::Fcm {
            key: DecodingKey::from_rsa_pem(public_key_pem.as_bytes()).expect("an RSA public key"),
            client_email: client_email.into(),
            project_id: project_id.into(),
        };
        Self::start(kind, vec![b"h2".to_vec(), b"http/1.1".to_vec()])
    }

    fn start(kind: Kind, alpn: Vec<Vec<u8>>) -> StandIn {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "push stand-in CA");
        let ca = ca.self_signed(&ca_key).unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let mut leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        leaf.subject_alt_names.push(rcgen::SanType::IpAddress(
            std::net::Ipv4Addr::LOCALHOST.into(),
        ));
        let leaf = leaf.signed_by(&leaf_key, &ca, &ca_key).unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
            )
            .unwrap();
        config.alpn_protocols = alpn;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let address: SocketAddr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shared = (Arc::new(kind), state.clone());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let serve = async {
                    loop {
                        let Ok((socket, _)) = listener.accept().await else {
                            continue;
                        };
                        let acceptor = acceptor.clone();
                        let (kind, state) = (shared.0.clone(), shared.1.clone());
                        tokio::spawn(async move {
                            let Ok(tls) = acceptor.accept(socket).await else {
                                return;
                            };
                            let service = hyper::service::service_fn(move |request| {
                                let (kind, state) = (kind.clone(), state.clone());
                                async move {
                                    Ok::<_, std::convert::Infallible>(
                                        handle(&kind, &state, request).await,
                                    )
                                }
                            });
                            let builder = hyper_util::server::conn::auto::Builder::new(
                                hyper_util::rt::TokioExecutor::new(),
                            );
                            let _ = builder
                                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                                .await;
                        });
                    }
                };
                tokio::select! {
                    _ = serve => {}
                    _ = stopped => {}
                }
            });
        });
        StandIn {
            url: format!("https://127.0.0.1:{}", address.port()),
            ca_file,
            state,
            _dir: dir,
            stop: Some(stop),
        }
    }

    /// Calls `token` gone from now on (APNs 410, FCM 404 `UNREGISTERED`).
    pub fn unregister(&self, token: &str) {
        self.state.lock().unwrap().unregistered.insert(token.into());
    }

    /// Answers the next `count` sends with 429.
    pub fn throttle(&self, count: u32) {
        self.state.lock().unwrap().throttle = count;
    }

    /// Refuses the next credential it sees as expired.
    pub fn expire_next_credential(&self) {
        self.state.lock().unwrap().expire_next_credential = true;
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }

    /// FCM: how many access tokens were asked for.
    pub fn token_requests(&self) -> u32 {
        self.state.lock().unwrap().token_requests
    }

    /// Waits (bounded) until `count` requests matching `filter` arrived.
    pub fn wait_requests(&self, count: usize, filter: impl Fn(&Recorded) -> bool) -> Vec<Recorded> {
        let deadline = Instant::now() + WAIT;
        loop {
            let matching: Vec<Recorded> = self.requests().into_iter().filter(&filter).collect();
            if matching.len() >= count {
                return matching;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {count} requests arrived: {:?}",
                matching.len(),
                self.requests()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

type Answer = Response<Full<Bytes>>;

fn answer(status: u16, body: Value, headers: &[(&str, String)]) -> Answer {
    let mut response = Response::builder()
        .status(StatusCode::from_u16(status).unwrap())
        .header("content-type", "application/json");
    for (name, value) in headers {
        response = response.header(*name, value);
    }
    let body = if body.is_null() {
        Bytes::new()
    } else {
        Bytes::from(body.to_string())
    };
    response.body(Full::new(body)).unwrap()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn handle(
    kind: &Kind,
    state: &Mutex<State>,
    request: Request<hyper::body::Incoming>,
) -> Answer {
    let path = request.uri().path().to_owned();
    let version = format!("{:?}", request.version());
    let headers: BTreeMap<String, String> = request
        .headers()
        .iter()
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                value.to_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    let raw = request
        .into_body()
        .collect()
        .await
        .map(|body| body.to_bytes())
        .unwrap_or_default();
    let (status, response) = match kind {
        Kind::Apns {
            key,
            key_id,
            team_id,
        } => apns(state, key, key_id, team_id, &path, &headers, &raw),
        Kind::Fcm {
            key,
            client_email,
            project_id,
        } => fcm(state, key, client_email, project_id, &path, &headers, &raw),
    };
    let body = serde_json::from_slice(&raw)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&raw).into_owned()));
    state.lock().unwrap().requests.push(Recorded {
        path,
        version,
        headers,
        body,
        status,
    });
    response
}

fn apns_error(status: u16, reason: &str) -> (u16, Answer) {
    let mut body = json!({ "reason": reason });
    if status == 410 {
        body["timestamp"] = json!(unix_now() * 1000);
    }
    (status, answer(status, body, &[]))
}

fn apns(
    state: &Mutex<State>,
    key: &DecodingKey,
    key_id: &str,
    team_id: &str,
    path: &str,
    headers: &BTreeMap<String, String>,
    raw: &[u8],
) -> (u16, Answer) {
    let Some(token) = path.strip_prefix("/3/device/") else {
        return apns_error(404, "BadPath");
    };
    if token.len() < 64 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return apns_error(400, "BadDeviceToken");
    }
    // The scheme is case-insensitive (RFC 9110 §11.1); Apple writes "bearer".
    let Some(jwt) = headers
        .get("authorization")
        .and_then(|value| value.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, jwt)| jwt)
    else {
        return apns_error(403, "MissingProviderToken");
    };
    let mut validation = Validation::new(Algorithm::ES256);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    let Ok(decoded) = jsonwebtoken::decode::<Value>(jwt, key, &validation) else {
        return apns_error(403, "InvalidProviderToken");
    };
    let iat = decoded.claims["iat"].as_u64().unwrap_or(0);
    if decoded.header.kid.as_deref() != Some(key_id)
        || decoded.claims["iss"] != team_id
        || iat + 3600 < unix_now()
        || iat > unix_now() + 60
    {
        return apns_error(403, "InvalidProviderToken");
    }
    let Some(topic) = headers.get("apns-topic") else {
        return apns_error(400, "MissingTopic");
    };
    if topic.is_empty() {
        return apns_error(400, "MissingTopic");
    }
    if !matches!(
        headers.get("apns-push-type").map(String::as_str),
        Some("alert" | "background")
    ) {
        return apns_error(400, "InvalidPushType");
    }
    if !matches!(
        headers.get("apns-priority").map(String::as_str),
        None | Some("5" | "10")
    ) {
        return apns_error(400, "BadPriority");
    }
    if headers
        .get("apns-expiration")
        .is_some_and(|e| e.parse::<u64>().is_err())
    {
        return apns_error(400, "BadExpirationDate");
    }
    if headers
        .get("apns-collapse-id")
        .is_some_and(|id| id.len() > 64)
    {
        return apns_error(400, "BadCollapseId");
    }
    if raw.len() > 4096 {
        return apns_error(413, "PayloadTooLarge");
    }
    let body: Value = match serde_json::from_slice(raw) {
        Ok(body) => body,
        Err(_) => return apns_error(400, "PayloadEmpty"),
    };
    if !body["aps"].is_object() {
        return apns_error(400, "PayloadEmpty");
    }
    let mut state = state.lock().unwrap();
    if std::mem::take(&mut state.expire_next_credential) {
        return apns_error(403, "ExpiredProviderToken");
    }
    if state.throttle > 0 {
        state.throttle -= 1;
        return apns_error(429, "TooManyRequests");
    }
    if state.unregistered.contains(token) {
        return apns_error(410, "Unregistered");
    }
    (
        200,
        answer(
            200,
            Value::Null,
            &[("apns-id", format!("{:032x}", unique()))],
        ),
    )
}

/// A number no two answers share (for ids in answers).
fn unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn google_error(status: u16, google_status: &str, message: &str, code: Option<&str>) -> Answer {
    let mut error = json!({"code": status, "message": message, "status": google_status});
    if let Some(code) = code {
        error["details"] = json!([{
            "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
            "errorCode": code,
        }]);
    }
    answer(status, json!({ "error": error }), &[])
}

fn fcm(
    state: &Mutex<State>,
    key: &DecodingKey,
    client_email: &str,
    project_id: &str,
    path: &str,
    headers: &BTreeMap<String, String>,
    raw: &[u8],
) -> (u16, Answer) {
    if path == "/token" {
        state.lock().unwrap().token_requests += 1;
        let form: BTreeMap<String, String> = form_pairs(raw);
        if form.get("grant_type").map(String::as_str)
            != Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
        {
            return (
                400,
                answer(400, json!({"error": "unsupported_grant_type"}), &[]),
            );
        }
        let mut validation = Validation::new(Algorithm::RS256);
        // The audience is checked below: it is the token URI, whatever port.
        validation.validate_aud = false;
        let claims = form
            .get("assertion")
            .and_then(|jwt| jsonwebtoken::decode::<Value>(jwt, key, &validation).ok())
            .map(|decoded| decoded.claims);
        let Some(claims) = claims else {
            return (
                400,
                answer(
                    400,
                    json!({"error": "invalid_grant", "error_description": "Invalid JWT Signature."}),
                    &[],
                ),
            );
        };
        let lifetime = claims["exp"].as_u64().unwrap_or(0) - claims["iat"].as_u64().unwrap_or(0);
        if claims["iss"] != client_email
            || !claims["aud"].as_str().unwrap_or("").ends_with("/token")
            || !claims["scope"]
                .as_str()
                .unwrap_or("")
                .split(' ')
                .any(|s| s == "https://www.googleapis.com/auth/firebase.messaging")
            || lifetime > 3600
        {
            return (400, answer(400, json!({"error": "invalid_grant"}), &[]));
        }
        let mut state = state.lock().unwrap();
        let token = format!("ya29.stand-in-{}", state.issued.len() + 1);
        state.issued.insert(token.clone());
        return (
            200,
            answer(
                200,
                json!({"access_token": token, "expires_in": 3599, "token_type": "Bearer"}),
                &[],
            ),
        );
    }
    if path != format!("/v1/projects/{project_id}/messages:send") {
        return (
            404,
            google_error(404, "NOT_FOUND", "Requested entity was not found.", None),
        );
    }
    let bearer = headers
        .get("authorization")
        .and_then(|value| value.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, token)| token);
    let mut state = state.lock().unwrap();
    if !state.issued.contains(bearer) {
        return (
            401,
            google_error(
                401,
                "UNAUTHENTICATED",
                "Request had invalid authentication credentials.",
                None,
            ),
        );
    }
    if std::mem::take(&mut state.expire_next_credential) {
        state.issued.remove(bearer);
        return (
            401,
            google_error(
                401,
                "UNAUTHENTICATED",
                "Request had invalid authentication credentials.",
                None,
            ),
        );
    }
    let body: Value = serde_json::from_slice(raw).unwrap_or_default();
    let message = &body["message"];
    let Some(token) = message["token"].as_str() else {
        return (
            400,
            google_error(
                400,
                "INVALID_ARGUMENT",
                "Recipient of the message is not set.",
                Some("INVALID_ARGUMENT"),
            ),
        );
    };
    if message["data"]
        .as_object()
        .is_some_and(|data| data.values().any(|v| !v.is_string()))
    {
        return (
            400,
            google_error(
                400,
                "INVALID_ARGUMENT",
                "Invalid value at 'message.data': data values must be strings",
                Some("INVALID_ARGUMENT"),
            ),
        );
    }
    if !matches!(
        message["android"]["priority"].as_str(),
        None | Some("HIGH" | "NORMAL")
    ) {
        return (
            400,
            google_error(
                400,
                "INVALID_ARGUMENT",
                "Invalid value at 'message.android.priority'",
                Some("INVALID_ARGUMENT"),
            ),
        );
    }
    if state.throttle > 0 {
        state.throttle -= 1;
        let mut response = google_error(
            429,
            "RESOURCE_EXHAUSTED",
            "Quota exceeded.",
            Some("QUOTA_EXCEEDED"),
        );
        response
            .headers_mut()
            .insert("retry-after", "1".parse().unwrap());
        return (429, response);
    }
    if state.unregistered.contains(token) {
        return (
            404,
            google_error(
                404,
                "NOT_FOUND",
                "Requested entity was not found.",
                Some("UNREGISTERED"),
            ),
        );
    }
    (
        200,
        answer(
            200,
            json!({"name": format!("projects/{project_id}/messages/0:{}", unique())}),
            &[],
        ),
    )
}

/// An `application/x-www-form-urlencoded` body.
fn form_pairs(raw: &[u8]) -> BTreeMap<String, String> {
    form_urlencoded::parse(raw).into_owned().collect()
}
