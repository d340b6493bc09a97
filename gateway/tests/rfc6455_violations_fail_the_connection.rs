//! RFC 6455 as the gateway enforces it, against the real binary over a real
//! socket: a close frame with a code a peer may not send fails the
//! connection with 1002 (§7.4); an upgrade over HTTP/1.0, without `Host`, or
//! with two `Sec-WebSocket-Key`s is refused with 400 (§4.1, §4.2.1); a
//! 64-bit length with its top bit set is 1002 (§5.2); and floods of pings,
//! unsolicited pongs or empty fragments count against the frame allowance.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use testkit::gateway::{raw_frame, token, Gateway, WAIT};

const MASK: Option<[u8; 4]> = Some([0x11, 0x22, 0x33, 0x44]);
const CLOSE: u8 = 0x88;

fn close_with(code: u16) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(b"bye");
    raw_frame(CLOSE, &payload, MASK)
}

#[test]
fn close_codes_a_peer_may_not_send_fail_the_connection_with_1002() {
    let gateway = Gateway::start(&[]);
    for code in [
        0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000,
    ] {
        let mut client = gateway.connect("alice", "phone");
        client.send_raw(&close_with(code));
        assert_eq!(client.expect_close(10), Some(1002), "close code {code}");
    }
    for code in [1000u16, 1001, 3000, 4999] {
        let mut client = gateway.connect("alice", "phone");
        client.send_raw(&close_with(code));
        assert_eq!(client.expect_close(10), Some(1000), "close code {code}");
    }
}

#[test]
fn a_64_bit_length_with_its_top_bit_set_is_a_protocol_error() {
    let gateway = Gateway::start(&[]);
    let mut client = gateway.connect("alice", "phone");
    client.send_raw(&[0x81, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4]);
    assert_eq!(client.expect_close(10), Some(1002));
}

/// Sends a raw upgrade request and returns the status line's code.
fn status_of(gateway: &Gateway, request: &str) -> u16 {
    let mut stream = TcpStream::connect(gateway.ws).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let mut chunk = [0u8; 1024];
    while !answer.windows(2).any(|w| w == b"\r\n") {
        let read = stream.read(&mut chunk).unwrap();
        assert!(read > 0, "no answer");
        answer.extend_from_slice(&chunk[..read]);
    }
    let line = String::from_utf8_lossy(&answer);
    line.split(' ').nth(1).unwrap().parse().unwrap()
}

#[test]
fn upgrades_without_http_1_1_a_host_or_one_key_are_refused_with_400() {
    let gateway = Gateway::start(&[]);
    let request = |first_line: &str, headers: &str| {
        format!(
            "{first_line}\r\n{headers}Authorization: Bearer {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            token("alice", "phone")
        )
    };
    let host = "Host: 127.0.0.1\r\n";
    assert_eq!(status_of(&gateway, &request("GET /ws HTTP/1.1", host)), 101);
    assert_eq!(status_of(&gateway, &request("GET /ws HTTP/1.0", host)), 400);
    assert_eq!(status_of(&gateway, &request("GET /ws HTTP/1.1", "")), 400);
    let two_keys = format!("{host}Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n");
    assert_eq!(
        status_of(&gateway, &request("GET /ws HTTP/1.1", &two_keys)),
        400
    );
}

#[test]
fn floods_of_pongs_or_empty_fragments_are_rate_limited_and_then_closed() {
    let gateway = Gateway::start(&["--frames-per-s", "5", "--frames-burst", "5"]);
    for flood in [
        raw_frame(0x8a, b"", MASK), // unsolicited pong
        raw_frame(0x00, b"", MASK), // empty continuation, not final
    ] {
        let mut client = gateway.connect("alice", "phone");
        let mut bytes = Vec::new();
        if flood[0] == 0x00 {
            bytes.extend(raw_frame(0x01, b"{", MASK)); // a text message begins
        }
        for _ in 0..200 {
            bytes.extend_from_slice(&flood);
        }
        client.send_raw(&bytes);
        client.set_timeout(Duration::from_secs(5));
        let limited = client.recv_type("error");
        assert_eq!(limited["code"], "rate_limited", "{limited}");
        assert_eq!(
            client.expect_close(1000),
            Some(1008),
            "past the abuse limit"
        );
    }
}
