//! The gateway as its integration tests drive it: start the real `gateway`
//! binary on loopback ports, mint tokens, and talk to it with a real
//! WebSocket client (tungstenite) over a real TCP socket.
//!
//! Owns `Gateway` (a running node, killed when dropped), `Client`, the test
//! secret and tokens, raw frames for framing tests, and the scenario every
//! shared-database backend must pass. Every wait here is bounded by `WAIT`.
//! Never used by a shipped binary.

pub use crate::postgres;
pub use crate::writer::{ensure_storage_writer_built, storage_writer_binary, Writer};
pub use crate::{free_port, repo, run_script, KillOnDrop, WAIT};

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tungstenite::{Message, WebSocket};

pub const SECRET: &str = "integration-test-secret-0123456789abcdef";
/// Gateway flags that lift the per-user send and per-connection frame rate
/// limits, for tests that send faster than a person would.
pub const UNLIMITED_RATES: [&str; 8] = [
    "--sends-per-s",
    "100000",
    "--sends-burst",
    "100000",
    "--frames-per-s",
    "100000",
    "--frames-burst",
    "100000",
];
/// Tries at starting a gateway before a test fails.
const START_ATTEMPTS: usize = 3;

pub fn unix_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub fn token(user: &str, device: &str) -> String {
    chat_protocol::token::mint(SECRET.as_bytes(), user, device, unix_s(), unix_s() + 3600).unwrap()
}

/// Gateway flags that pass each of `args` to its spawned storage-writer
/// (`--storage-writer-arg` before each).
pub fn writer_args(args: &[&str]) -> Vec<String> {
    args.iter()
        .flat_map(|arg| ["--storage-writer-arg".to_owned(), (*arg).to_owned()])
        .collect()
}

/// Runs one of the gateway's operator commands (`revoke`, `delete-account`,
/// `token`...) with `args`, with `GATEWAY_ADMIN_TOKEN` set to `admin_token`
/// when given and no `GATEWAY_AUTH_SECRET`; expects it to succeed and
/// returns what it printed.
pub fn gateway_command(args: &[&str], admin_token: Option<&str>) -> String {
    let mut command = std::process::Command::new(crate::workspace_binary("gateway"));
    command.args(args).env_remove("GATEWAY_AUTH_SECRET");
    if let Some(admin_token) = admin_token {
        command.env("GATEWAY_ADMIN_TOKEN", admin_token);
    }
    let output = command.output().expect("the gateway runs");
    assert!(
        output.status.success(),
        "gateway {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("the command prints UTF-8")
}

/// A token issued after every revocation so far: tokens carry seconds, so
/// this waits for the next one.
pub fn fresh_token(user: &str, device: &str) -> String {
    std::thread::sleep(Duration::from_millis(1_100));
    token(user, device)
}

/// A running gateway process; killed when dropped.
pub struct Gateway {
    child: Child,
    pub ws: SocketAddr,
    pub admin: SocketAddr,
    pub data_dir: tempfile::TempDir,
    /// What it was started with, for `restart`.
    extra: Vec<String>,
    secret: Option<String>,
}

impl Gateway {
    /// Two shards, a short drain, and `extra` flags on top.
    pub fn start(extra: &[&str]) -> Gateway {
        Self::start_with(extra, Some(SECRET))
    }

    pub fn start_with(extra: &[&str], secret: Option<&str>) -> Gateway {
        ensure_storage_writer_built();
        // A free port can be taken by a parallel test between our check and
        // the gateway's bind: a start that fails is retried on fresh ports.
        for _ in 0..START_ATTEMPTS - 1 {
            if let Some(gateway) = Self::try_start(extra, secret) {
                return gateway;
            }
        }
        Self::try_start(extra, secret).expect("gateway exited during start-up")
    }

    fn try_start(extra: &[&str], secret: Option<&str>) -> Option<Gateway> {
        let data_dir = tempfile::tempdir().unwrap();
        let ws: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Self::spawn(ws, admin, data_dir.path(), extra, secret);
        let mut gateway = Gateway {
            child,
            ws,
            admin,
            data_dir,
            extra: extra.iter().map(|flag| flag.to_string()).collect(),
            secret: secret.map(str::to_owned),
        };
        gateway.wait_ready().then_some(gateway)
    }

    /// Starts the process again (after `kill9`) on the same ports and data
    /// directory, with the same flags, and waits until it is ready.
    pub fn restart(&mut self) {
        self.kill9();
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        self.child = Self::spawn(
            self.ws,
            self.admin,
            self.data_dir.path(),
            &extra,
            self.secret.as_deref(),
        );
        assert!(self.wait_ready(), "gateway exited while restarting");
    }

    fn spawn(
        ws: SocketAddr,
        admin: SocketAddr,
        data_dir: &std::path::Path,
        extra: &[&str],
        secret: Option<&str>,
    ) -> Child {
        let mut command = Command::new(crate::workspace_binary("gateway"));
        command
            .args([
                "--listen",
                &ws.to_string(),
                "--admin-listen",
                &admin.to_string(),
            ])
            .args(extra)
            .env_remove("GATEWAY_AUTH_SECRET")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        if !extra.contains(&"--data-dir") {
            command.args(["--data-dir", data_dir.to_str().unwrap()]);
        }
        // Test defaults, unless the test sets them itself.
        for (flag, value) in [
            ("--shards", "2"),
            ("--drain-window-ms", "500"),
            ("--close-grace-ms", "500"),
        ] {
            if !extra.contains(&flag) {
                command.args([flag, value]);
            }
        }
        if let Some(secret) = secret {
            command.env("GATEWAY_AUTH_SECRET", secret);
        }
        command.spawn().expect("gateway binary starts")
    }

    /// False when the process exited before it was ready.
    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                eprintln!("gateway exited during start-up: {status}");
                return false;
            }
            if self.admin_get("/readyz").map(|(status, _)| status) == Some(200) {
                return true;
            }
            assert!(
                Instant::now() < deadline,
                "gateway not ready within {WAIT:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// GET on the admin listener: (status, body), or None if it did not answer.
    pub fn admin_get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.admin, path)
    }

    /// Waits (bounded) until `/readyz` answers `status`.
    pub fn wait_readyz(&self, status: u16) {
        let deadline = Instant::now() + WAIT;
        while self.admin_get("/readyz").map(|(s, _)| s) != Some(status) {
            assert!(Instant::now() < deadline, "/readyz never answered {status}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sum of every sample of `name` whose labels contain all of `labels`.
    pub fn metric(&self, name: &str, labels: &[&str]) -> u64 {
        let (_, body) = self.admin_get("/metrics").expect("metrics answer");
        metric_in(&body, name, labels)
    }

    /// Waits (bounded) until `metric(name, labels) >= at_least`.
    pub fn wait_metric(&self, name: &str, labels: &[&str], at_least: u64) -> u64 {
        let deadline = Instant::now() + WAIT;
        loop {
            let value = self.metric(name, labels);
            if value >= at_least {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "{name}{labels:?} stayed at {value} < {at_least}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Connects as `user`/`device`, waits for `hello`, then reads the
    /// connect-time sync up to `synced` (its messages are in `client.synced`).
    pub fn connect(&self, user: &str, device: &str) -> Client {
        connect_at(self.ws, user, device)
    }

    /// Connects and waits for `hello` only.
    pub fn connect_unsynced(&self, user: &str, device: &str) -> Client {
        connect_unsynced_at(self.ws, user, device)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The pid of the storage-writer this gateway spawned, once it runs.
    pub fn writer_pid(&self) -> Option<u32> {
        // Any of the gateway's threads may have spawned it.
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.child.id())).ok()?;
        tasks.flatten().find_map(|task| {
            let children = std::fs::read_to_string(task.path().join("children")).ok()?;
            children.split_whitespace().find_map(|child| {
                let comm = std::fs::read_to_string(format!("/proc/{child}/comm")).ok()?;
                (comm.trim() == "storage-writer").then(|| child.parse().ok())?
            })
        })
    }

    /// Attempts an upgrade with `token` in the Authorization header. Err is the HTTP status.
    pub fn connect_with_token(&self, token: &str) -> Result<Client, u16> {
        self.upgrade("/ws", Some(token), TcpStream::connect(self.ws).unwrap())
    }

    /// Attempts an upgrade on a given socket (so tests can size its buffers).
    /// Err is the HTTP status, or 0 when the server gave none.
    pub fn upgrade(
        &self,
        path: &str,
        bearer: Option<&str>,
        stream: TcpStream,
    ) -> Result<Client, u16> {
        upgrade_at(self.ws, path, bearer, stream)
    }

    /// `kill -9`: no drain, no goodbye.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `signal` (a name: TERM, HUP, ...) to the process.
    pub fn signal(&self, signal: &str) {
        crate::signal(self.child.id(), signal);
    }

    /// Waits (bounded) for the process to exit.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "gateway still running after {within:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A WebSocket client over a blocking socket with a read timeout.
pub struct Client {
    pub socket: WebSocket<TcpStream>,
    /// Messages the connect-time sync delivered (see `Gateway::connect`).
    pub synced: Vec<Value>,
    /// The `hello` frame (`Value::Null` until read by a connect helper).
    pub hello: Value,
}

/// What the server said next.
#[derive(Debug)]
pub enum Next {
    Json(Value),
    Closed(Option<u16>),
    /// The socket ended without a close frame (the error, for the report).
    Gone(String),
    Silent,
}

impl Client {
    /// Sends `body` to `to` with client id `id`.
    pub fn send_message(&mut self, id: &str, to: &str, body: &str) {
        self.send(serde_json::json!({"type": "send", "id": id, "to": to, "body": body}));
    }

    /// Creates a group of this user and `members`; returns the group id.
    pub fn create_group(&mut self, id: &str, members: &[&str]) -> String {
        self.send(serde_json::json!({"type": "group_create", "id": id, "members": members}));
        let sent = self.recv_type("sent");
        assert_eq!(sent["id"], id, "{sent}");
        sent["group"]
            .as_str()
            .expect("sent names the group")
            .to_owned()
    }

    /// Reads frames until a `message` whose body is `body` (skipping others,
    /// at most 1000); returns every `message` read, that one last.
    pub fn messages_until(&mut self, body: &str) -> Vec<Value> {
        let mut seen = Vec::new();
        for _ in 0..1000 {
            let frame = self.recv();
            if frame["type"] == "message" {
                let done = frame["body"] == body;
                seen.push(frame);
                if done {
                    return seen;
                }
            }
        }
        panic!("no message {body:?} within 1000 frames");
    }

    /// Asks for a page of history and returns its messages (newest first).
    pub fn history(&mut self, conversation: &str, before: Option<&str>, limit: u64) -> Vec<Value> {
        let mut request =
            serde_json::json!({"type": "history", "conversation": conversation, "limit": limit});
        if let Some(before) = before {
            request["before"] = before.into();
        }
        self.send(request);
        let page = self.recv_type("history");
        assert_eq!(page["conversation"], conversation);
        page["messages"].as_array().unwrap().clone()
    }

    /// The whole history of `conversation`, page by page, oldest first.
    pub fn whole_history(&mut self, conversation: &str) -> Vec<Value> {
        let mut all = Vec::new();
        let mut before: Option<String> = None;
        for _ in 0..100_000 {
            let page = self.history(conversation, before.as_deref(), 100);
            let Some(last) = page.last() else { break };
            before = last["message_id"].as_str().map(str::to_owned);
            all.extend(page);
        }
        all.reverse();
        all
    }

    pub fn send(&mut self, value: Value) {
        self.socket.send(Message::text(value.to_string())).unwrap();
    }

    pub fn send_text(&mut self, text: &str) {
        self.socket.send(Message::text(text.to_owned())).unwrap();
    }

    /// Writes raw bytes to the socket, bypassing the client's framing.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.socket.get_mut().write_all(bytes).unwrap();
    }

    pub fn set_timeout(&mut self, timeout: Duration) {
        self.socket
            .get_mut()
            .set_read_timeout(Some(timeout))
            .unwrap();
    }

    /// The next JSON frame, a close, or silence within the read timeout.
    pub fn next_frame(&mut self) -> Next {
        loop {
            match self.socket.read() {
                Ok(Message::Text(text)) => {
                    return Next::Json(serde_json::from_str(&text).expect("server sends JSON"))
                }
                Ok(Message::Close(frame)) => return Next::Closed(frame.map(|f| u16::from(f.code))),
                Ok(_) => continue,
                // A signal landed during the read (seen once in a full run):
                // nothing was read, so read again.
                Err(tungstenite::Error::Io(error))
                    if error.kind() == std::io::ErrorKind::Interrupted =>
                {
                    continue
                }
                Err(tungstenite::Error::Io(error))
                    if matches!(
                        error.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Next::Silent
                }
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    return Next::Closed(None)
                }
                Err(error) => return Next::Gone(error.to_string()),
            }
        }
    }

    /// The next JSON frame; panics on anything else.
    pub fn recv(&mut self) -> Value {
        match self.next_frame() {
            Next::Json(value) => value,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// Skips frames until one of type `kind` (at most `limit` frames).
    pub fn recv_type(&mut self, kind: &str) -> Value {
        for _ in 0..1000 {
            let value = self.recv();
            if value["type"] == kind {
                return value;
            }
        }
        panic!("no {kind} frame within 1000 frames");
    }

    /// Reads (at most `limit` frames) until the server closes; returns its code.
    pub fn expect_close(&mut self, limit: usize) -> Option<u16> {
        for _ in 0..limit {
            match self.next_frame() {
                Next::Json(_) => continue,
                Next::Closed(code) => return code,
                other => panic!("expected a close, got {other:?}"),
            }
        }
        panic!("no close within {limit} frames");
    }

    /// Uploads this device's public keys with two one-time prekeys.
    pub fn upload_keys(&mut self) {
        self.send(
            serde_json::json!({"type": "keys_upload", "identity_key": "i",
            "signed_prekey": "s", "signed_prekey_signature": "g",
            "one_time_prekeys": ["k1", "k2"]}),
        );
        self.recv_type("keys_uploaded");
    }

    /// Reads (skipping frames) until the server closes, within `WAIT`;
    /// its close code (`None`: closed without a code, or the socket ended).
    pub fn closed_within_wait(&mut self) -> Option<u16> {
        let deadline = Instant::now() + WAIT;
        self.set_timeout(Duration::from_millis(200));
        loop {
            match self.next_frame() {
                Next::Closed(code) => return code,
                Next::Gone(_) => return None,
                Next::Json(_) | Next::Silent => {
                    assert!(Instant::now() < deadline, "the connection stayed open");
                }
            }
        }
    }

    /// Asserts nothing arrives for `quiet`.
    pub fn expect_silence(&mut self, quiet: Duration) {
        self.set_timeout(quiet);
        let next = self.next_frame();
        self.set_timeout(WAIT);
        assert!(
            matches!(next, Next::Silent),
            "expected silence, got {next:?}"
        );
    }

    pub fn ping(&mut self) {
        self.send(serde_json::json!({"type": "ping"}));
        assert_eq!(self.recv()["type"], "pong");
    }

    pub fn close(mut self) {
        let _ = self.socket.close(Some(tungstenite::protocol::CloseFrame {
            code: WsCloseCode::Normal,
            reason: "".into(),
        }));
        let _ = self.socket.flush();
    }
}

/// A request on the admin listener at `address` (`method`, `target`, an
/// optional bearer token): (status, JSON body, or null).
pub fn admin_request(
    address: SocketAddr,
    method: &str,
    target: &str,
    bearer: Option<&str>,
) -> (u16, Value) {
    let mut stream = TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let auth = bearer
        .map(|b| format!("Authorization: Bearer {b}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "{method} {target} HTTP/1.1\r\nHost: admin\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head[9..12].parse().unwrap();
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// GET `path` on `address`: (status, body), or None if it did not answer.
pub fn http_get(address: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    // One write: a server that answers after its first read sees it all.
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// In Prometheus text `body`: the sum of every sample of `name` whose
/// labels contain all of `labels`.
pub fn metric_in(body: &str, name: &str, labels: &[&str]) -> u64 {
    body.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| line.split(['{', ' ']).next() == Some(name))
        .filter(|line| labels.iter().all(|label| line.contains(label)))
        .map(|line| line.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// Users whose home shards differ on a 2-shard node: (on shard 0, on shard 1).
/// `Gateway::connect` on the node listening at `ws` (for threads that hold
/// an address, not the `Gateway`).
pub fn connect_at(ws: SocketAddr, user: &str, device: &str) -> Client {
    let mut client = connect_unsynced_at(ws, user, device);
    loop {
        let frame = client.recv();
        match frame["type"].as_str() {
            Some("synced") => break,
            Some("message" | "receipts") => client.synced.push(frame),
            _ => panic!("unexpected frame during the connect-time sync: {frame}"),
        }
    }
    client
}

/// `Gateway::connect_unsynced` on the node listening at `ws`.
pub fn connect_unsynced_at(ws: SocketAddr, user: &str, device: &str) -> Client {
    let stream = TcpStream::connect(ws).unwrap();
    let mut client =
        upgrade_at(ws, "/ws", Some(&token(user, device)), stream).expect("upgrade accepted");
    let hello = client.recv();
    assert_eq!(hello["type"], "hello", "first frame is hello: {hello}");
    assert_eq!(
        (hello["user"].as_str(), hello["device"].as_str()),
        (Some(user), Some(device))
    );
    client.hello = hello;
    client
}

/// `Gateway::upgrade` on the node listening at `ws`.
pub fn upgrade_at(
    ws: SocketAddr,
    path: &str,
    bearer: Option<&str>,
    stream: TcpStream,
) -> Result<Client, u16> {
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut request =
        tungstenite::client::IntoClientRequest::into_client_request(format!("ws://{ws}{path}"))
            .unwrap();
    if let Some(token) = bearer {
        request
            .headers_mut()
            .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    }
    match tungstenite::client(request, stream) {
        Ok((socket, _response)) => Ok(Client {
            socket,
            synced: Vec::new(),
            hello: Value::Null,
        }),
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(response))) => {
            Err(response.status().as_u16())
        }
        // No HTTP answer at all (reset, closed listener): status 0.
        Err(_) => Err(0),
    }
}

pub fn users_on_different_shards(prefix: &str) -> (String, String) {
    let mut on = [None, None];
    for index in 0..1000 {
        let user = format!("{prefix}{index}");
        let shard = chat_protocol::ids::home_shard(&user, 2);
        on[shard].get_or_insert(user);
        if on.iter().all(Option::is_some) {
            break;
        }
    }
    let [a, b] = on;
    (a.unwrap(), b.unwrap())
}

/// A client frame built by hand: `first_byte` is FIN/RSV/opcode, masked unless `mask` is None.
pub fn raw_frame(first_byte: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut frame = vec![first_byte];
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        len if len < 126 => frame.push(mask_bit | len as u8),
        len if len <= 0xffff => {
            frame.push(mask_bit | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            frame.push(mask_bit | 127);
            frame.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    match mask {
        Some(mask) => {
            frame.extend_from_slice(&mask);
            frame.extend(
                payload
                    .iter()
                    .enumerate()
                    .map(|(i, byte)| byte ^ mask[i % 4]),
            );
        }
        None => frame.extend_from_slice(payload),
    }
    frame
}

/// What every shared-database backend must keep across a gateway `kill -9`
/// onto a fresh data directory (a new node on the same database): the
/// backlog syncs in order, history answers, a retry keeps its first id, and
/// an acknowledgement is remembered. `flags` select the backend.
pub fn messages_survive_a_node_replacement(flags: &[&str]) {
    let mut gateway = Gateway::start(flags);
    let mut alice = gateway.connect("alice", "phone");
    let mut ids = Vec::new();
    for index in 0..3 {
        alice.send_message(&format!("c{index}"), "bob", &format!("m{index}"));
        ids.push(alice.recv_type("sent")["message_id"].clone());
    }
    gateway.kill9();

    let gateway = Gateway::start(flags);
    let mut alice = gateway.connect("alice", "phone");
    alice.send_message("c1", "bob", "m1");
    assert_eq!(
        alice.recv_type("sent")["message_id"],
        ids[1],
        "retry keeps its id"
    );
    let mut bob = gateway.connect("bob", "phone");
    let bodies: Vec<&str> = bob
        .synced
        .iter()
        .map(|m| m["body"].as_str().unwrap())
        .collect();
    assert_eq!(bodies, ["m0", "m1", "m2"]);
    let history = bob.history("dm:alice:bob", None, 10);
    assert_eq!(history.len(), 3);
    assert_eq!(history[0]["message_id"], ids[2]);

    bob.send(serde_json::json!({"type": "ack", "message_id": ids[2]}));
    gateway.wait_metric("gateway_acks_total", &[], 1);
    bob.ping();
    bob.close();
    std::thread::sleep(Duration::from_millis(300));
    let bob = gateway.connect("bob", "phone");
    assert!(
        bob.synced.is_empty(),
        "acknowledged in the database: {:?}",
        bob.synced
    );
}
