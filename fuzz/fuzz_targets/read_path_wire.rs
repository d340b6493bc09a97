//! The read path between a shard and its storage-writer (postcard): the
//! frame length prefix, requests and answers must never panic on bytes
//! from a broken or hostile peer.
#![no_main]
use chat_protocol::store_wire::{frame_len, Request, Response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = frame_len(data);
    if let Ok(request) = Request::decode(data) {
        let _ = format!("{request:?}");
    }
    if let Ok(response) = Response::decode(data) {
        let _ = format!("{response:?}");
    }
});
