//! Slowloris: a client that never finishes its upgrade request is answered
//! 408 and disconnected after the handshake timeout; an oversized request gets 431.

use testkit::gateway as support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::Gateway;

fn response_of(stream: &mut TcpStream) -> String {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
}

#[test]
fn an_unfinished_request_gets_408_after_the_timeout() {
    let gateway = Gateway::start(&["--handshake-timeout-ms", "300"]);
    let mut stream = TcpStream::connect(gateway.ws).unwrap();
    stream
        .write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let started = Instant::now();
    let response = response_of(&mut stream);
    assert!(response.starts_with("HTTP/1.1 408"), "{response:?}");
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert_eq!(
        gateway.metric("gateway_sockets_open", &[]),
        0,
        "the slot is released"
    );
}

#[test]
fn an_oversized_request_gets_431() {
    let gateway = Gateway::start(&[]);
    let mut stream = TcpStream::connect(gateway.ws).unwrap();
    let padding = "x".repeat(10_000);
    let _ = write!(
        stream,
        "GET /ws HTTP/1.1\r\nHost: x\r\nX-Pad: {padding}\r\n\r\n"
    );
    let response = response_of(&mut stream);
    assert!(response.starts_with("HTTP/1.1 431"), "{response:?}");
}
