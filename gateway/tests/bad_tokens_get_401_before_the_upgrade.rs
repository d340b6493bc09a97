//! Authentication happens before the upgrade: a missing, malformed, foreign or
//! expired token gets HTTP 401; a token in the query string works.

use testkit::gateway as support;

use std::net::TcpStream;

use support::{unix_s, Gateway, SECRET};

#[test]
fn bad_tokens_get_401() {
    let gateway = Gateway::start(&[]);
    let expired = chat_protocol::token::mint(
        SECRET.as_bytes(),
        "alice",
        "phone",
        unix_s() - 120,
        unix_s() - 60,
    )
    .unwrap();
    let foreign = chat_protocol::token::mint(
        b"some-other-secret-0123456789abcdef",
        "alice",
        "phone",
        unix_s(),
        unix_s() + 60,
    )
    .unwrap();
    for token in ["", "garbage", "a.b.c", &expired, &foreign] {
        assert_eq!(
            gateway.connect_with_token(token).err(),
            Some(401),
            "token {token:?}"
        );
    }
    let no_header = gateway.upgrade("/ws", None, TcpStream::connect(gateway.ws).unwrap());
    assert_eq!(no_header.err(), Some(401));
    assert!(
        gateway.metric(
            "gateway_handshakes_refused_total",
            &["reason=\"unauthorized\""]
        ) >= 6
    );
    // The node is unharmed.
    gateway.connect("alice", "phone").ping();
}

#[test]
fn a_token_in_the_query_string_is_accepted() {
    let gateway = Gateway::start(&[]);
    let token = support::token("alice", "browser");
    let mut client = gateway
        .upgrade(
            &format!("/ws?token={token}"),
            None,
            TcpStream::connect(gateway.ws).unwrap(),
        )
        .expect("query token accepted");
    assert_eq!(client.recv()["device"], "browser");
}

#[test]
fn other_paths_get_404() {
    let gateway = Gateway::start(&[]);
    let token = support::token("alice", "phone");
    assert_eq!(
        gateway
            .upgrade(
                "/chat",
                Some(&token),
                TcpStream::connect(gateway.ws).unwrap()
            )
            .err(),
        Some(404)
    );
}
