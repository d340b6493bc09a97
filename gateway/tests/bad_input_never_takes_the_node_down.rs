//! Bad input gets a clear error frame or a documented close code, and never
//! affects anyone else: malformed JSON, unknown types, bad fields, oversized
//! bodies and frames, binary and unmasked frames, invalid UTF-8, abuse.

use testkit::gateway as support;

use serde_json::json;
use support::{raw_frame, Gateway};

const TEXT: u8 = 0x81;
const BINARY: u8 = 0x82;
const MASK: Option<[u8; 4]> = Some([1, 2, 3, 4]);

#[test]
fn malformed_frames_get_error_frames_and_the_connection_stays() {
    let gateway = Gateway::start(&[]);
    let mut client = gateway.connect("alice", "phone");

    client.send_text("{not json");
    let error = client.recv();
    assert_eq!(
        (error["type"].as_str(), error["code"].as_str()),
        (Some("error"), Some("malformed_json"))
    );
    assert!(error["message"].as_str().unwrap().contains("JSON"));

    client.send(json!({"type": "teleport"}));
    assert_eq!(client.recv()["code"], "unknown_type");

    client.send(json!({"type": "send", "id": "c-7", "to": "bob"}));
    let missing_body = client.recv();
    assert_eq!(
        (missing_body["code"].as_str(), missing_body["id"].as_str()),
        (Some("invalid_field"), Some("c-7"))
    );

    client.send(json!({"type": "send", "id": "c-8", "to": "not a user!", "body": "x"}));
    assert_eq!(client.recv()["code"], "invalid_field");

    client
        .send(json!({"type": "send", "id": "c-9", "to": "bob", "body": "x".repeat(64 * 1024 + 1)}));
    let too_big = client.recv();
    assert_eq!(
        (too_big["code"].as_str(), too_big["id"].as_str()),
        (Some("body_too_large"), Some("c-9"))
    );

    client.ping();
    client.send(json!({"type": "send", "id": "c-10", "to": "bob", "body": "fine"}));
    assert_eq!(client.recv()["type"], "sent");
    assert_eq!(
        gateway.metric("gateway_errors_total", &["code=\"malformed_json\""]),
        1
    );
}

fn expect_close_after_raw(gateway: &Gateway, bytes: &[u8], code: u16) {
    let mut client = gateway.connect("mallory", "raw");
    client.send_raw(bytes);
    assert_eq!(client.expect_close(10), Some(code));
}

#[test]
fn framing_violations_close_with_their_documented_codes() {
    let gateway = Gateway::start(&[]);
    let body = json!({"type": "ping"}).to_string();
    expect_close_after_raw(&gateway, &raw_frame(TEXT, body.as_bytes(), None), 1002);
    expect_close_after_raw(
        &gateway,
        &raw_frame(TEXT | 0x40, body.as_bytes(), MASK),
        1002,
    );
    expect_close_after_raw(&gateway, &raw_frame(BINARY, b"\x00\x01", MASK), 1003);
    expect_close_after_raw(&gateway, &raw_frame(TEXT, b"\"\xff\xfe\"", MASK), 1007);
    // A frame larger than message_bytes_max closes with 1009, refused from its header.
    expect_close_after_raw(
        &gateway,
        &raw_frame(TEXT, &vec![b' '; 200 * 1024], MASK),
        1009,
    );
    assert!(gateway.metric("gateway_closes_total", &["code=\"1009\""]) >= 1);
    gateway.connect("alice", "phone").ping();
}

#[test]
fn an_oversized_frame_from_a_real_client_closes_with_1009() {
    let gateway = Gateway::start(&["--message-bytes-max", "70000"]);
    let mut client = gateway.connect("alice", "phone");
    client.send_text(&format!(
        "{{\"type\":\"ping\",\"pad\":\"{}\"}}",
        "x".repeat(80_000)
    ));
    assert_eq!(client.expect_close(5), Some(1009));
}

#[test]
fn repeated_protocol_abuse_closes_with_1008() {
    let gateway = Gateway::start(&["--protocol-errors-max", "5"]);
    let mut client = gateway.connect("mallory", "phone");
    for _ in 0..6 {
        client.send_text("nonsense");
    }
    for _ in 0..5 {
        assert_eq!(client.recv()["code"], "malformed_json");
    }
    assert_eq!(client.expect_close(5), Some(1008));
    // Everyone else is unaffected.
    gateway.connect("alice", "phone").ping();
}

#[test]
fn fragmented_messages_are_joined() {
    let gateway = Gateway::start(&[]);
    let mut client = gateway.connect("alice", "phone");
    let text = json!({"type": "send", "id": "frag", "to": "bob", "body": "in pieces"}).to_string();
    let (head, tail) = text.as_bytes().split_at(10);
    let mut bytes = raw_frame(0x01, head, MASK); // text, not final
    bytes.extend(raw_frame(0x89, b"mid", MASK)); // a ping between fragments
    bytes.extend(raw_frame(0x80, tail, MASK)); // continuation, final
    client.send_raw(&bytes);
    assert_eq!(client.recv_type("sent")["id"], "frag");
}
