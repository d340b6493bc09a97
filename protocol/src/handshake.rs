//! The HTTP/1.1 upgrade that opens a WebSocket, parsed and answered without I/O.
//!
//! Owns request validation (method, path, upgrade headers, version), token
//! extraction (`Authorization: Bearer` or `?token=`), telling a page request
//! (a plain `GET` of another path: the web client) from an upgrade, and the
//! response bytes. Never verifies the token itself (that is `token`), never
//! decides what a page holds, and never reads a socket.

use crate::limits::UPGRADE_HEADERS_MAX;

/// A valid upgrade request.
#[derive(Debug, PartialEq, Eq)]
pub struct UpgradeRequest {
    /// The bearer token, from the header or the query; empty when absent.
    pub token: String,
    /// `Sec-WebSocket-Accept` value to answer with.
    pub accept_key: String,
}

/// Why an upgrade was refused, and the HTTP status to answer with.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("request headers are larger than the limit")]
    TooLarge,
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("only GET is allowed")]
    MethodNotAllowed,
    #[error("no such path")]
    NotFound,
    #[error("not a WebSocket upgrade (or not version 13)")]
    UpgradeRequired,
}

impl HandshakeError {
    pub fn status(&self) -> (u16, &'static str) {
        match self {
            HandshakeError::TooLarge => (431, "Request Header Fields Too Large"),
            HandshakeError::BadRequest(_) => (400, "Bad Request"),
            HandshakeError::MethodNotAllowed => (405, "Method Not Allowed"),
            HandshakeError::NotFound => (404, "Not Found"),
            HandshakeError::UpgradeRequired => (426, "Upgrade Required"),
        }
    }
}

/// A plain `GET` of a path other than the WebSocket's.
#[derive(Debug, PartialEq, Eq)]
pub struct PageRequest {
    pub path: String,
    /// The query string, without `?` (empty when there is none).
    pub query: String,
}

/// What a complete request asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    Upgrade(UpgradeRequest),
    Page(PageRequest),
}

/// Parses an upgrade request at the start of `input` (any other path is
/// `NotFound`). `Ok(None)` means more bytes are needed; `Ok(Some((request,
/// length)))` gives the request and how many bytes it took (anything after
/// it is the client's first WebSocket frames).
pub fn parse_upgrade(
    input: &[u8],
    ws_path: &str,
    request_bytes_max: usize,
) -> Result<Option<(UpgradeRequest, usize)>, HandshakeError> {
    match parse_request(input, ws_path, request_bytes_max)? {
        None => Ok(None),
        Some((Request::Upgrade(upgrade), length)) => Ok(Some((upgrade, length))),
        Some((Request::Page(_), _)) => Err(HandshakeError::NotFound),
    }
}

/// Parses the request at the start of `input`: an upgrade on `ws_path`, or
/// a page request for any other path (the caller answers it or says 404).
pub fn parse_request(
    input: &[u8],
    ws_path: &str,
    request_bytes_max: usize,
) -> Result<Option<(Request, usize)>, HandshakeError> {
    let mut headers = [httparse::EMPTY_HEADER; UPGRADE_HEADERS_MAX];
    let mut request = httparse::Request::new(&mut headers);
    let length = match request.parse(input) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) if input.len() >= request_bytes_max => {
            return Err(HandshakeError::TooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HandshakeError::TooLarge),
        Err(_) => return Err(HandshakeError::BadRequest("malformed HTTP request")),
    };
    if length > request_bytes_max {
        return Err(HandshakeError::TooLarge);
    }
    if request.method != Some("GET") {
        return Err(HandshakeError::MethodNotAllowed);
    }
    // RFC 6455 §4.1: the upgrade is HTTP/1.1 or later, with a Host header.
    if request.version != Some(1) {
        return Err(HandshakeError::BadRequest(
            "a WebSocket upgrade needs HTTP/1.1",
        ));
    }
    let target = request.path.unwrap_or("");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if path != ws_path {
        let page = PageRequest {
            path: path.to_owned(),
            query: query.to_owned(),
        };
        return Ok(Some((Request::Page(page), length)));
    }

    let header = |name: &str| {
        request
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| std::str::from_utf8(h.value).unwrap_or(""))
    };
    let count = |name: &str| {
        request
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .count()
    };
    if header("host").is_none_or(|host| host.trim().is_empty()) {
        return Err(HandshakeError::BadRequest("the upgrade has no Host header"));
    }
    if count("sec-websocket-key") > 1 {
        return Err(HandshakeError::BadRequest(
            "more than one Sec-WebSocket-Key",
        ));
    }
    let has_token = |value: Option<&str>, wanted: &str| {
        value.is_some_and(|v| {
            v.split(',')
                .any(|part| part.trim().eq_ignore_ascii_case(wanted))
        })
    };
    if !has_token(header("upgrade"), "websocket") || !has_token(header("connection"), "upgrade") {
        return Err(HandshakeError::UpgradeRequired);
    }
    if header("sec-websocket-version").map(str::trim) != Some("13") {
        return Err(HandshakeError::UpgradeRequired);
    }
    let key = header("sec-websocket-key")
        .map(str::trim)
        .filter(|key| key.len() == 24)
        .ok_or(HandshakeError::BadRequest(
            "missing or malformed Sec-WebSocket-Key",
        ))?;

    let token = match header("authorization") {
        Some(value) => value
            .trim()
            .strip_prefix("Bearer ")
            .map(|t| t.trim().to_owned())
            .unwrap_or_default(),
        None => query_param(query, "token").unwrap_or_default(),
    };
    let accept_key = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let upgrade = UpgradeRequest { token, accept_key };
    Ok(Some((Request::Upgrade(upgrade), length)))
}

/// The first value of `name` in a URL query string (percent-decoded).
pub fn query_param(query: &str, name: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

/// `101 Switching Protocols` for an accepted upgrade.
pub fn switching_protocols(accept_key: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept_key}\r\n\r\n"
    )
    .into_bytes()
}

/// A complete `200 OK` answer to a page request; the connection closes
/// after it. The headers keep a page to this origin (scripts, styles and
/// WebSocket connections), off other sites' frames, and uncached.
pub fn page(content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-cache\r\nX-Content-Type-Options: nosniff\r\n\
         Content-Security-Policy: default-src 'self'; connect-src 'self' ws: wss:; frame-ancestors 'none'\r\n\
         Referrer-Policy: no-referrer\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    response.extend_from_slice(body);
    response
}

/// A complete refusal with a short plain-text body; the connection closes after it.
pub fn refusal(status: u16, reason: &str, body: &str) -> Vec<u8> {
    let mut extra = "";
    if status == 401 {
        extra = "WWW-Authenticate: Bearer\r\n";
    } else if status == 503 {
        extra = "Retry-After: 1\r\n";
    }
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}\n",
        body.len() + 1
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn request(target: &str, extra: &str) -> Vec<u8> {
        format!(
            "GET {target} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n{extra}\r\n"
        )
        .into_bytes()
    }

    #[test]
    fn the_rfc_sample_key_gets_the_rfc_accept_value() {
        let input = request("/ws", "Authorization: Bearer abc.def.ghi\r\n");
        let (upgrade, length) = parse_upgrade(&input, "/ws", 8192).unwrap().unwrap();
        assert_eq!(length, input.len());
        assert_eq!(upgrade.accept_key, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(upgrade.token, "abc.def.ghi");
    }

    #[test]
    fn the_token_may_come_in_the_query() {
        let input = request("/ws?x=1&token=abc.def.ghi", "");
        let (upgrade, _) = parse_upgrade(&input, "/ws", 8192).unwrap().unwrap();
        assert_eq!(upgrade.token, "abc.def.ghi");
    }

    #[test]
    fn bytes_after_the_request_are_not_consumed() {
        let mut input = request("/ws", "");
        let length = input.len();
        input.extend_from_slice(b"\x81\x85frame");
        let (_, consumed) = parse_upgrade(&input, "/ws", 8192).unwrap().unwrap();
        assert_eq!(consumed, length);
    }

    #[test]
    fn partial_requests_ask_for_more_until_the_limit() {
        let input = request("/ws", "");
        assert_eq!(parse_upgrade(&input[..20], "/ws", 8192), Ok(None));
        assert_eq!(
            parse_upgrade(&input[..20], "/ws", 20),
            Err(HandshakeError::TooLarge)
        );
    }

    #[test]
    fn a_plain_get_of_another_path_is_a_page_request_and_answered_whole() {
        let get = b"GET /app.js?v=2 HTTP/1.1\r\nHost: x\r\n\r\n";
        let page = PageRequest {
            path: "/app.js".into(),
            query: "v=2".into(),
        };
        assert_eq!(
            parse_request(get, "/ws", 8192),
            Ok(Some((Request::Page(page), get.len())))
        );
        let plain_ws = b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(
            parse_request(plain_ws, "/ws", 8192),
            Err(HandshakeError::UpgradeRequired)
        );
        let answer = String::from_utf8(page_answer()).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains("Content-Length: 5\r\n"), "{head}");
        assert!(head.contains("Content-Security-Policy: default-src 'self'"));
        assert_eq!(body, "hello");
    }

    fn page_answer() -> Vec<u8> {
        page("text/plain", b"hello")
    }

    #[test]
    fn refusals_name_their_status() {
        let wrong_path = request("/other", "");
        assert_eq!(
            parse_upgrade(&wrong_path, "/ws", 8192),
            Err(HandshakeError::NotFound)
        );
        let post = b"POST /ws HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(
            parse_upgrade(post, "/ws", 8192),
            Err(HandshakeError::MethodNotAllowed)
        );
        let plain = b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(
            parse_upgrade(plain, "/ws", 8192),
            Err(HandshakeError::UpgradeRequired)
        );
        assert!(matches!(
            parse_upgrade(b"\x00\x01garbage\r\n\r\n", "/ws", 8192),
            Err(HandshakeError::BadRequest(_))
        ));
        assert!(String::from_utf8(refusal(401, "Unauthorized", "bad token"))
            .unwrap()
            .starts_with("HTTP/1.1 401 Unauthorized\r\n"));
    }

    #[test]
    fn an_upgrade_needs_http_1_1_a_host_and_one_key() {
        let request = |first_line: &str, extra: &str| {
            format!(
                "{first_line}\r\n{extra}Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            )
        };
        let host = "Host: example\r\n";
        let ok = request("GET /ws HTTP/1.1", host);
        assert!(parse_upgrade(ok.as_bytes(), "/ws", 4096).unwrap().is_some());
        let http10 = request("GET /ws HTTP/1.0", host);
        assert!(matches!(
            parse_upgrade(http10.as_bytes(), "/ws", 4096),
            Err(HandshakeError::BadRequest(_))
        ));
        let no_host = request("GET /ws HTTP/1.1", "");
        assert!(matches!(
            parse_upgrade(no_host.as_bytes(), "/ws", 4096),
            Err(HandshakeError::BadRequest(_))
        ));
        let two_keys = request(
            "GET /ws HTTP/1.1",
            "Host: example\r\nSec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n",
        );
        assert!(matches!(
            parse_upgrade(two_keys.as_bytes(), "/ws", 4096),
            Err(HandshakeError::BadRequest(_))
        ));
    }
}
