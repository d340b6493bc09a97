//! The HTTP upgrade request (and page requests) a client sends before any
//! WebSocket frame: parsing must never panic, and a complete request's
//! length is within the input.
#![no_main]
use chat_protocol::handshake::parse_request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((_, length))) = parse_request(data, "/ws", 8 * 1024) {
        assert!(length <= data.len());
    }
});
