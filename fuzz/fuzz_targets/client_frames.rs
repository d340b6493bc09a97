//! A client's JSON text frames (every frame type, `bodies`, media, push
//! targets, group changes): decoding must never panic, and whatever it
//! accepts, it accepted within the body limit.
#![no_main]
use chat_protocol::frames::decode_client_frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode_client_frame(data, 4096);
});
