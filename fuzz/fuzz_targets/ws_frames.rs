//! WebSocket frames as a client sends them: the decoder (headers, lengths,
//! masking, fragments, control frames, close codes) must never panic, never
//! consume more than it was given, and agree with `frame_length`.
#![no_main]
use chat_protocol::ws::{frame_length, Flow, WsDecoder};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    // The first byte picks the decoder (chat or echo) and the size limit.
    let binary = data[0] & 1 == 1;
    let limit = 1usize << (8 + (data[0] >> 1) % 10);
    let mut input = data[1..].to_vec();
    let _ = frame_length(&input);
    let mut decoder = if binary { WsDecoder::with_binary() } else { WsDecoder::default() };
    let total = input.len();
    // Twice over the same decoder: a partial frame left by the first call
    // must be handled by the next as a client's next read would be.
    let split = total / 2;
    let mut first = input[..split].to_vec();
    if let Ok(consumed) = decoder.decode(&mut first, limit, |_| Flow::Continue) {
        assert!(consumed <= split);
        let mut rest = first[consumed..].to_vec();
        rest.extend_from_slice(&input[split..]);
        if let Ok(consumed) = decoder.decode(&mut rest, limit, |_| Flow::Continue) {
            assert!(consumed <= rest.len());
        }
    }
    let mut fresh = WsDecoder::default();
    if let Ok(consumed) = fresh.decode(&mut input, limit, |_| Flow::Continue) {
        assert!(consumed <= total);
    }
});
