//! The web client the node serves on its listener: the chat page at `/`,
//! its script and style, the JavaScript client library, and (only when
//! `dev_sign_in` is on) a development sign-in that mints a token for any name.
//!
//! Owns which paths exist and what each answers (a complete HTTP response,
//! then the connection closes). The files are compiled in from `clients/`
//! (no build step, nothing fetched at run time). Never answers a WebSocket
//! upgrade (`shard::accept` does) and never does I/O.

use chat_protocol::handshake::{self, PageRequest};
use chat_protocol::ids::is_valid_id;
use chat_protocol::token;

/// How long a development sign-in token lasts.
const DEV_TOKEN_TTL_S: u64 = 24 * 3600;

/// The static files, by path.
const FILES: &[(&str, &str, &[u8])] = &[
    (
        "/",
        "text/html; charset=utf-8",
        include_bytes!("../../clients/web/index.html"),
    ),
    (
        "/app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../clients/web/app.js"),
    ),
    (
        "/style.css",
        "text/css; charset=utf-8",
        include_bytes!("../../clients/web/style.css"),
    ),
    (
        "/chat-client.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../clients/js/src/index.js"),
    ),
    (
        "/favicon.svg",
        "image/svg+xml",
        include_bytes!("../../clients/web/favicon.svg"),
    ),
];

/// What the node serves besides `/ws`.
pub struct WebClient {
    enabled: bool,
    /// The node's token secret, held only when development sign-in is on.
    dev_secret: Option<Vec<u8>>,
}

impl WebClient {
    pub fn new(enabled: bool, dev_sign_in: bool, secret: &[u8]) -> WebClient {
        WebClient {
            enabled,
            dev_secret: (enabled && dev_sign_in).then(|| secret.to_vec()),
        }
    }

    /// The whole answer to a page request.
    pub fn respond(&self, request: &PageRequest, now_unix_s: u64) -> Vec<u8> {
        if !self.enabled {
            return handshake::refusal(
                404,
                "Not Found",
                "the web client is off on this node (web_client = false)",
            );
        }
        let path = if request.path == "/index.html" {
            "/"
        } else {
            request.path.as_str()
        };
        if let Some((_, content_type, body)) = FILES.iter().find(|(p, _, _)| *p == path) {
            return handshake::page(content_type, body);
        }
        if path == "/dev/sign-in" {
            return self.dev_sign_in(&request.query, now_unix_s);
        }
        handshake::refusal(404, "Not Found", "no such page")
    }

    /// `/dev/sign-in?user=<id>&device=<id>`: a token for that device, as
    /// JSON; with no query, whether sign-in is on (the page asks); 404
    /// unless `dev_sign_in` is on.
    fn dev_sign_in(&self, query: &str, now_unix_s: u64) -> Vec<u8> {
        let Some(secret) = &self.dev_secret else {
            return handshake::refusal(
                404,
                "Not Found",
                "development sign-in is off on this node (dev_sign_in = false): ask for a token",
            );
        };
        let field = |name: &str| handshake::query_param(query, name).unwrap_or_default();
        if query.is_empty() {
            let body = serde_json::json!({ "dev_sign_in": true });
            return handshake::page("application/json", body.to_string().as_bytes());
        }
        let (user, device) = (field("user"), field("device"));
        if !is_valid_id(&user) || !is_valid_id(&device) {
            return handshake::refusal(
                400,
                "Bad Request",
                "`user` and `device` must be 1-64 characters of [A-Za-z0-9_.-]",
            );
        }
        match token::mint(
            secret,
            &user,
            &device,
            now_unix_s,
            now_unix_s + DEV_TOKEN_TTL_S,
        ) {
            Ok(token) => {
                let body = serde_json::json!({
                    "token": token,
                    "user": user,
                    "device": device,
                    "expires_in_s": DEV_TOKEN_TTL_S,
                    "dev_sign_in": true,
                });
                handshake::page("application/json", body.to_string().as_bytes())
            }
            Err(error) => handshake::refusal(400, "Bad Request", &error.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(web: &WebClient, target: &str) -> String {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let request = PageRequest {
            path: path.into(),
            query: query.into(),
        };
        String::from_utf8(web.respond(&request, 1_800_000_000)).unwrap()
    }

    #[test]
    fn pages_are_served_and_sign_in_exists_only_when_enabled() {
        let secret = b"a-secret-of-at-least-thirty-two-bytes!!";
        let web = WebClient::new(true, false, secret);
        let page = get(&web, "/");
        assert!(page.starts_with("HTTP/1.1 200 OK"));
        assert!(page.contains("text/html"));
        assert!(get(&web, "/chat-client.js").contains("export class ChatClient"));
        assert!(get(&web, "/nope").starts_with("HTTP/1.1 404"));
        assert!(get(&web, "/dev/sign-in?user=a&device=b").starts_with("HTTP/1.1 404"));

        let dev = WebClient::new(true, true, secret);
        let answer = get(&dev, "/dev/sign-in?user=alice&device=tab-1");
        let body = answer.split_once("\r\n\r\n").unwrap().1;
        let value: serde_json::Value = serde_json::from_str(body).unwrap();
        let claims = token::TokenVerifier::new(secret)
            .verify(value["token"].as_str().unwrap(), 1_800_000_000)
            .unwrap();
        assert_eq!(
            (claims.sub.as_str(), claims.dev.as_str()),
            ("alice", "tab-1")
        );
        assert!(get(&dev, "/dev/sign-in?user=bad%20name&device=x").starts_with("HTTP/1.1 400"));
        assert!(get(&dev, "/dev/sign-in").contains(r#"{"dev_sign_in":true}"#));

        let off = WebClient::new(false, true, secret);
        assert!(get(&off, "/").starts_with("HTTP/1.1 404"));
        assert!(get(&off, "/dev/sign-in?user=a&device=b").starts_with("HTTP/1.1 404"));
    }
}
