//! The admin HTTP listener: /healthz, /readyz, /metrics, and the operator's
//! two write calls, `POST /revoke` and `POST /delete-account`.
//!
//! Owns one plain thread with blocking sockets, far from the shards' hot path;
//! for probes and scrapers it only reads atomics the shards publish. A
//! revocation or deletion needs `Authorization: Bearer <admin_token>` and
//! goes to the user's home shard, which stores it and answers once it is
//! durable.
//! Requests are served one at a time with short timeouts and a size bound:
//! it is for probes, scrapers and operators, not for the public.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;

use backplane_bridge::Backplane;
use std::time::Duration;

use crate::config::Config;
use crate::mesh::{Mesh, Revocation, RevokeOrder, Sender, ShardMessage};
use crate::metrics::{render, NodeState};

/// Largest admin request read.
const REQUEST_BYTES_MAX: usize = 4096;
/// Read and write timeout per admin request.
const IO_TIMEOUT: Duration = Duration::from_secs(2);

pub fn spawn(
    listener: TcpListener,
    config: Arc<Config>,
    node: Arc<NodeState>,
    mesh: Arc<Mesh>,
    backplane: Option<Arc<Backplane>>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => serve(stream, &config, &node, &mesh, backplane.as_deref()),
                    Err(error) => {
                        tracing::debug!(%error, "admin accept failed");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        })?;
    Ok(())
}

fn serve(
    mut stream: std::net::TcpStream,
    config: &Config,
    node: &NodeState,
    mesh: &Mesh,
    backplane: Option<&Backplane>,
) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let mut buffer = [0u8; REQUEST_BYTES_MAX];
    let mut filled = 0;
    let (method, target, bearer) = loop {
        match stream.read(&mut buffer[filled..]) {
            Ok(0) | Err(_) => return,
            Ok(read) => filled += read,
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&buffer[..filled]) {
            Ok(httparse::Status::Complete(_)) => {
                let bearer = request
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("authorization"))
                    .and_then(|h| std::str::from_utf8(h.value).ok())
                    .and_then(|v| v.trim().strip_prefix("Bearer "))
                    .map(|t| t.trim().to_owned());
                break (
                    request.method.unwrap_or("GET").to_owned(),
                    request.path.unwrap_or("/").to_owned(),
                    bearer,
                );
            }
            Ok(httparse::Status::Partial) if filled < buffer.len() => {}
            _ => {
                return respond(
                    &mut stream,
                    400,
                    "Bad Request",
                    "text/plain",
                    "bad request\n",
                )
            }
        }
    };
    let (path, query) = target.split_once('?').unwrap_or((target.as_str(), ""));
    if path == "/revoke" || path == "/delete-account" {
        let delete_account = path == "/delete-account";
        let (status, reason, body) = revoke(
            config,
            mesh,
            &method,
            query,
            bearer.as_deref(),
            delete_account,
        );
        return respond(&mut stream, status, reason, "application/json", &body);
    }
    match path {
        "/healthz" => respond(&mut stream, 200, "OK", "text/plain", "ok\n"),
        "/readyz" => {
            let reasons = node.not_ready_because();
            if reasons.is_empty() {
                respond(&mut stream, 200, "OK", "text/plain", "ready\n")
            } else {
                let body = format!("not ready\n{}\n", reasons.join("\n"));
                respond(&mut stream, 503, "Service Unavailable", "text/plain", &body)
            }
        }
        "/metrics" => respond(
            &mut stream,
            200,
            "OK",
            "text/plain; version=0.0.4",
            &render(node, mesh, backplane),
        ),
        _ => respond(&mut stream, 404, "Not Found", "text/plain", "not found\n"),
    }
}

/// `POST /revoke?user=<id>[&device=<id>]`: revokes the device (every
/// device of the user without `device`). `POST /delete-account?user=<id>`
/// (`delete_account`): revokes every device, then removes every row of the
/// user. Answers once it is durable.
fn revoke(
    config: &Config,
    mesh: &Mesh,
    method: &str,
    query: &str,
    bearer: Option<&str>,
    delete_account: bool,
) -> (u16, &'static str, String) {
    let error = |status, reason, message: &str| {
        let body = serde_json::json!({ "error": message }).to_string();
        (status, reason, body)
    };
    let Some(expected) = config.admin_token.as_deref() else {
        return error(
            403,
            "Forbidden",
            "the admin API is off: set admin_token (GATEWAY_ADMIN_TOKEN)",
        );
    };
    if !bearer.is_some_and(|given| same_secret(given.as_bytes(), expected.as_bytes())) {
        return error(
            401,
            "Unauthorized",
            "Authorization: Bearer <admin_token> required",
        );
    }
    if method != "POST" {
        return error(405, "Method Not Allowed", "use POST");
    }
    let field = |name: &str| chat_protocol::handshake::query_param(query, name);
    let user = field("user").unwrap_or_default();
    let device = field("device");
    let valid = chat_protocol::ids::is_valid_id;
    if !valid(&user) || device.as_deref().is_some_and(|d| !valid(d)) {
        return error(
            400,
            "Bad Request",
            "`user` (and `device`, if given) must be 1-64 characters of [A-Za-z0-9_.-]",
        );
    }
    if delete_account && device.is_some() {
        return error(
            400,
            "Bad Request",
            "an account is deleted whole: no `device`",
        );
    }
    let at_unix_ms = crate::clock::unix_ms();
    let (answer, outcome) = std::sync::mpsc::sync_channel(1);
    let order = RevokeOrder {
        at_unix_ms,
        delete_account,
        answer,
    };
    let revocation = Box::new(Revocation {
        user: user.as_str().into(),
        device: device.as_deref().map(Into::into),
        order: Some(order),
    });
    let home = chat_protocol::ids::home_shard(&user, mesh.shard_count());
    if mesh
        .send(Sender::External, home, ShardMessage::Revoke(revocation))
        .is_err()
    {
        return error(
            503,
            "Service Unavailable",
            "the user's shard is busy; retry",
        );
    }
    let storage = if delete_account {
        config.account_deletion_timeout()
    } else {
        Duration::from_millis(config.storage_timeout_ms)
    };
    match outcome.recv_timeout(storage + Duration::from_secs(1)) {
        Ok(Ok(done)) => {
            tracing::info!(%user, device = ?device, delete_account, "revoked");
            let mut body = serde_json::json!({
                "user": user,
                "device": device,
                "revoked_at_ms": at_unix_ms,
                "keys_removed": done.keys_removed,
                "closed_here": done.closed_here,
            });
            if delete_account {
                body["account_deleted"] = true.into();
                body["rows_removed"] = done.rows_removed.into();
            }
            (200, "OK", body.to_string())
        }
        Ok(Err(message)) => error(
            503,
            "Service Unavailable",
            &format!("not stored: {message}; retry"),
        ),
        Err(_) => error(
            503,
            "Service Unavailable",
            "storage did not answer in time; retry",
        ),
    }
}

/// Compares two secrets in time that depends only on their lengths.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |difference, (a, b)| difference | (a ^ b))
            == 0
}

fn respond(
    stream: &mut std::net::TcpStream,
    status: u16,
    reason: &str,
    content_type: &str,
    body: &str,
) {
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(body.as_bytes()));
}
