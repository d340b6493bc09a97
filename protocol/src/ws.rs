//! WebSocket framing (RFC 6455) for the server side, over caller-owned buffers.
//!
//! Owns frame validation, unmasking, fragment reassembly and frame encoding.
//! Header parsing and formatting come from `tungstenite`; buffering is ours so a
//! connection holds no read buffer while idle (see ARCHITECTURE.md, memory budget).
//! Never reads a socket: the caller hands in bytes and gets events back.

use std::io::Cursor;

use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

use crate::codes::CloseCode;

pub use crate::limits::{WS_CONTROL_PAYLOAD_MAX, WS_HEADER_BYTES_MAX};

/// One complete thing the peer said.
#[derive(Debug, PartialEq, Eq)]
pub enum WsEvent<'a> {
    /// A whole text message (fragments already joined), not yet checked as UTF-8.
    Text(&'a [u8]),
    /// A whole binary message (only from a decoder made `with_binary`; the
    /// chat protocol is text, so its decoder closes with 1003 instead).
    Binary(&'a [u8]),
    /// A ping; answer with a pong carrying the same payload.
    Ping(&'a [u8]),
    /// A pong (ignored apart from counting as activity and against the
    /// connection's frame allowance: an unsolicited flood costs the sender).
    Pong,
    /// A fragment of a text message that is not its last (counted like a
    /// frame: thousands of empty continuations are a flood, not a message).
    Fragment,
    /// A close frame, with the peer's code when it gave one.
    Close(Option<u16>),
}

/// What the caller's event handler wants next.
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Stop decoding (the connection is closing); the rest of the input is ignored.
    Stop,
}

/// Per-connection framing state. Holds no heap memory unless a fragmented
/// message is in progress.
#[derive(Debug, Default)]
pub struct WsDecoder {
    /// Payload of a fragmented message in progress.
    fragments: Vec<u8>,
    in_fragmented_message: bool,
    /// The message in progress is binary.
    fragments_binary: bool,
    /// Binary messages are accepted (the echo endpoint) instead of refused.
    binary: bool,
}

impl WsDecoder {
    /// A decoder that delivers binary messages too.
    pub fn with_binary() -> Self {
        Self {
            binary: true,
            ..Self::default()
        }
    }

    /// Decodes every complete frame at the start of `input`, unmasking in place,
    /// and calls `on_event` for each complete message or control frame.
    /// Returns how many bytes were consumed; the rest is an incomplete frame the
    /// caller keeps for the next call. An error names the close code to send.
    pub fn decode(
        &mut self,
        input: &mut [u8],
        message_bytes_max: usize,
        mut on_event: impl FnMut(WsEvent<'_>) -> Flow,
    ) -> Result<usize, CloseCode> {
        let mut consumed = 0;
        loop {
            let rest = &mut input[consumed..];
            let mut cursor = Cursor::new(&*rest);
            let (header, payload_len) = match FrameHeader::parse(&mut cursor) {
                Ok(Some(parsed)) => parsed,
                Ok(None) => return Ok(consumed),
                Err(_) => return Err(CloseCode::ProtocolError),
            };
            let header_len = cursor.position() as usize;
            check_header(&header, payload_len, message_bytes_max)?;
            if self.in_fragmented_message
                && (self.fragments.len() as u64 + payload_len) > message_bytes_max as u64
            {
                return Err(CloseCode::MessageTooBig);
            }
            let frame_len = header_len + payload_len as usize;
            if rest.len() < frame_len {
                return Ok(consumed);
            }
            let payload = &mut rest[header_len..frame_len];
            let mask = header.mask.expect("checked: client frames are masked");
            unmask(payload, mask);
            consumed += frame_len;

            let flow = match header.opcode {
                OpCode::Data(Data::Binary) if !self.binary => {
                    return Err(CloseCode::UnsupportedData)
                }
                OpCode::Data(data @ (Data::Text | Data::Binary)) if header.is_final => {
                    if self.in_fragmented_message {
                        return Err(CloseCode::ProtocolError);
                    }
                    if data == Data::Binary {
                        on_event(WsEvent::Binary(payload))
                    } else {
                        on_event(WsEvent::Text(payload))
                    }
                }
                OpCode::Data(data @ (Data::Text | Data::Binary)) => {
                    if self.in_fragmented_message {
                        return Err(CloseCode::ProtocolError);
                    }
                    self.in_fragmented_message = true;
                    self.fragments_binary = data == Data::Binary;
                    self.fragments.extend_from_slice(payload);
                    on_event(WsEvent::Fragment)
                }
                OpCode::Data(Data::Continue) => {
                    if !self.in_fragmented_message {
                        return Err(CloseCode::ProtocolError);
                    }
                    self.fragments.extend_from_slice(payload);
                    if header.is_final {
                        let flow = if self.fragments_binary {
                            on_event(WsEvent::Binary(&self.fragments))
                        } else {
                            on_event(WsEvent::Text(&self.fragments))
                        };
                        self.fragments = Vec::new();
                        self.in_fragmented_message = false;
                        flow
                    } else {
                        on_event(WsEvent::Fragment)
                    }
                }
                OpCode::Control(Control::Ping) => on_event(WsEvent::Ping(payload)),
                OpCode::Control(Control::Pong) => on_event(WsEvent::Pong),
                OpCode::Control(Control::Close) => {
                    on_event(WsEvent::Close(close_code_of(payload)?))
                }
                OpCode::Data(Data::Reserved(_)) | OpCode::Control(Control::Reserved(_)) => {
                    return Err(CloseCode::ProtocolError)
                }
            };
            if flow == Flow::Stop {
                return Ok(consumed);
            }
        }
    }

    /// True while a fragmented message is being reassembled.
    pub fn is_mid_message(&self) -> bool {
        self.in_fragmented_message
    }
}

/// The total length (header plus payload) of the frame at the start of `input`,
/// once its header is complete. Lets the caller size a buffer exactly.
pub fn frame_length(input: &[u8]) -> Option<usize> {
    let mut cursor = Cursor::new(input);
    match FrameHeader::parse(&mut cursor) {
        Ok(Some((_, payload_len))) => Some(cursor.position() as usize + payload_len as usize),
        _ => None,
    }
}

fn check_header(
    header: &FrameHeader,
    payload_len: u64,
    message_bytes_max: usize,
) -> Result<(), CloseCode> {
    if header.rsv1 || header.rsv2 || header.rsv3 {
        // No extension is negotiated, so reserved bits must be clear.
        return Err(CloseCode::ProtocolError);
    }
    if header.mask.is_none() {
        // RFC 6455 §5.1: a server must close on an unmasked client frame.
        return Err(CloseCode::ProtocolError);
    }
    if payload_len >> 63 != 0 {
        // §5.2: the most significant bit of a 64-bit length must be 0.
        return Err(CloseCode::ProtocolError);
    }
    if let OpCode::Control(_) = header.opcode {
        if !header.is_final || payload_len > WS_CONTROL_PAYLOAD_MAX {
            return Err(CloseCode::ProtocolError);
        }
    }
    if payload_len > message_bytes_max as u64 {
        return Err(CloseCode::MessageTooBig);
    }
    Ok(())
}

fn close_code_of(payload: &[u8]) -> Result<Option<u16>, CloseCode> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(CloseCode::ProtocolError),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !is_valid_close_code(code) {
                return Err(CloseCode::ProtocolError);
            }
            if std::str::from_utf8(&payload[2..]).is_err() {
                return Err(CloseCode::InvalidPayload);
            }
            Ok(Some(code))
        }
    }
}

/// Whether a peer may send `code` in a close frame (RFC 6455 §7.4): the
/// defined codes except those that only describe a connection (1004-1006,
/// 1015), the IANA-registered 1012-1014, and the ranges for libraries
/// (3000-3999) and applications (4000-4999). Anything else fails the
/// connection with 1002.
pub fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    for (index, byte) in payload.iter_mut().enumerate() {
        *byte ^= mask[index & 3];
    }
}

/// Appends one unmasked, final server frame to `output`.
pub fn encode_frame(opcode: OpCode, payload: &[u8], output: &mut Vec<u8>) {
    encode(opcode, payload, None, output);
}

/// Appends one final frame masked with `mask`, as a client must send it
/// (RFC 6455 §5.3): for clients, tests and the load generator.
pub fn encode_masked_frame(opcode: OpCode, payload: &[u8], mask: [u8; 4], output: &mut Vec<u8>) {
    encode(opcode, payload, Some(mask), output);
}

fn encode(opcode: OpCode, payload: &[u8], mask: Option<[u8; 4]>, output: &mut Vec<u8>) {
    let header = FrameHeader {
        is_final: true,
        rsv1: false,
        rsv2: false,
        rsv3: false,
        opcode,
        mask,
    };
    output.reserve(header.len(payload.len() as u64) + payload.len());
    header
        .format(payload.len() as u64, output)
        .expect("writing to a Vec cannot fail");
    let start = output.len();
    output.extend_from_slice(payload);
    if let Some(mask) = mask {
        unmask(&mut output[start..], mask);
    }
}

/// A complete text frame around `payload`.
pub fn text_frame(payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(WS_HEADER_BYTES_MAX + payload.len());
    encode_frame(OpCode::Data(Data::Text), payload, &mut frame);
    frame
}

/// Appends a message's frame to `output`: text, or binary when `binary`
/// (the echo endpoint sends both back).
pub fn encode_message(binary: bool, payload: &[u8], output: &mut Vec<u8>) {
    let data = if binary { Data::Binary } else { Data::Text };
    encode_frame(OpCode::Data(data), payload, output);
}

/// A close frame with any valid `code` and no reason.
pub fn close_frame_code(code: u16) -> Vec<u8> {
    let mut frame = Vec::with_capacity(4);
    encode_frame(
        OpCode::Control(Control::Close),
        &code.to_be_bytes(),
        &mut frame,
    );
    frame
}

/// A pong answering a ping with `payload`.
pub fn pong_frame(payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(2 + payload.len());
    encode_frame(OpCode::Control(Control::Pong), payload, &mut frame);
    frame
}

/// A close frame with the code and reason of `code`.
pub fn close_frame(code: CloseCode) -> Vec<u8> {
    let reason = code.reason().as_bytes();
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.code().to_be_bytes());
    payload.extend_from_slice(reason);
    let mut frame = Vec::with_capacity(4 + payload.len());
    encode_frame(OpCode::Control(Control::Close), &payload, &mut frame);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1024;

    /// A client frame as a browser would send it.
    fn client_frame(opcode: OpCode, is_final: bool, payload: &[u8]) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let header = FrameHeader {
            is_final,
            rsv1: false,
            rsv2: false,
            rsv3: false,
            opcode,
            mask: Some(mask),
        };
        let mut frame = Vec::new();
        header.format(payload.len() as u64, &mut frame).unwrap();
        let mut masked = payload.to_vec();
        unmask(&mut masked, mask);
        frame.extend_from_slice(&masked);
        frame
    }

    fn decode_all(
        decoder: &mut WsDecoder,
        input: &mut [u8],
    ) -> (Result<usize, CloseCode>, Vec<String>) {
        let mut events = Vec::new();
        let result = decoder.decode(input, MAX, |event| {
            if event == WsEvent::Fragment {
                // Counted by its own test; these tests look at messages.
                return Flow::Continue;
            }
            events.push(match event {
                WsEvent::Text(text) => format!("text:{}", String::from_utf8_lossy(text)),
                WsEvent::Binary(data) => format!("binary:{data:?}"),
                WsEvent::Ping(payload) => format!("ping:{}", String::from_utf8_lossy(payload)),
                WsEvent::Pong => "pong".into(),
                WsEvent::Close(code) => format!("close:{code:?}"),
                WsEvent::Fragment => unreachable!("skipped above"),
            });
            Flow::Continue
        });
        (result, events)
    }

    #[test]
    fn binary_messages_are_refused_unless_the_decoder_takes_them() {
        let mut input = client_frame(OpCode::Data(Data::Binary), false, b"\x01");
        input.extend(client_frame(OpCode::Data(Data::Continue), true, b"\x02"));
        let (result, _) = decode_all(&mut WsDecoder::default(), &mut input.clone());
        assert_eq!(result, Err(CloseCode::UnsupportedData));
        let (result, events) = decode_all(&mut WsDecoder::with_binary(), &mut input);
        assert_eq!(result, Ok(input.len()));
        assert_eq!(events, ["binary:[1, 2]"]);
    }

    #[test]
    fn masked_text_frames_decode_back_to_back() {
        let mut input = client_frame(OpCode::Data(Data::Text), true, b"hello");
        input.extend(client_frame(OpCode::Control(Control::Ping), true, b"p"));
        let total = input.len();
        let (result, events) = decode_all(&mut WsDecoder::default(), &mut input);
        assert_eq!(result, Ok(total));
        assert_eq!(events, vec!["text:hello", "ping:p"]);
    }

    #[test]
    fn a_partial_frame_is_left_for_the_next_call() {
        let frame = client_frame(OpCode::Data(Data::Text), true, b"hello world");
        for split in 0..frame.len() {
            let mut head = frame[..split].to_vec();
            let (result, events) = decode_all(&mut WsDecoder::default(), &mut head);
            assert_eq!(result, Ok(0), "split at {split}");
            assert!(events.is_empty());
        }
        assert_eq!(frame_length(&frame[..6]), Some(frame.len()));
        assert_eq!(frame_length(&frame[..5]), None);
        assert_eq!(frame_length(&frame[..1]), None);
    }

    #[test]
    fn fragments_are_joined_into_one_message() {
        let mut decoder = WsDecoder::default();
        let mut input = client_frame(OpCode::Data(Data::Text), false, b"hel");
        input.extend(client_frame(OpCode::Control(Control::Ping), true, b""));
        input.extend(client_frame(OpCode::Data(Data::Continue), true, b"lo"));
        let (result, events) = decode_all(&mut decoder, &mut input);
        assert!(result.is_ok());
        assert_eq!(events, vec!["ping:", "text:hello"]);
        assert!(!decoder.is_mid_message());
    }

    #[test]
    fn framing_violations_map_to_their_close_codes() {
        let cases: Vec<(Vec<u8>, CloseCode)> = vec![
            (text_frame(b"unmasked"), CloseCode::ProtocolError),
            (
                client_frame(OpCode::Data(Data::Binary), true, b"\x00"),
                CloseCode::UnsupportedData,
            ),
            (
                client_frame(OpCode::Data(Data::Continue), true, b"x"),
                CloseCode::ProtocolError,
            ),
            (
                client_frame(OpCode::Data(Data::Reserved(3)), true, b"x"),
                CloseCode::ProtocolError,
            ),
            (
                client_frame(OpCode::Control(Control::Ping), false, b"x"),
                CloseCode::ProtocolError,
            ),
            (
                client_frame(OpCode::Control(Control::Ping), true, &[0; 126]),
                CloseCode::ProtocolError,
            ),
            (
                client_frame(OpCode::Data(Data::Text), true, &vec![b'a'; MAX + 1]),
                CloseCode::MessageTooBig,
            ),
        ];
        for (mut input, expected) in cases {
            let (result, _) = decode_all(&mut WsDecoder::default(), &mut input);
            assert_eq!(result, Err(expected));
        }
    }

    #[test]
    fn an_oversized_frame_is_refused_from_its_header_alone() {
        // Only the header has arrived; we must not wait for 1 MB to refuse it.
        let full = client_frame(OpCode::Data(Data::Text), true, &vec![b'a'; 1 << 20]);
        let mut header_only = full[..14].to_vec();
        let (result, _) = decode_all(&mut WsDecoder::default(), &mut header_only);
        assert_eq!(result, Err(CloseCode::MessageTooBig));
    }

    #[test]
    fn fragments_adding_up_past_the_limit_are_refused() {
        let mut decoder = WsDecoder::default();
        let mut input = client_frame(OpCode::Data(Data::Text), false, &vec![b'a'; MAX - 10]);
        input.extend(client_frame(
            OpCode::Data(Data::Continue),
            true,
            &[b'a'; 11],
        ));
        let (result, _) = decode_all(&mut decoder, &mut input);
        assert_eq!(result, Err(CloseCode::MessageTooBig));
    }

    #[test]
    fn close_frames_carry_their_code() {
        let mut input = client_frame(
            OpCode::Control(Control::Close),
            true,
            &[0x03, 0xe8, b'o', b'k'],
        );
        let (_, events) = decode_all(&mut WsDecoder::default(), &mut input);
        assert_eq!(events, vec!["close:Some(1000)"]);
    }

    #[test]
    fn encoded_close_frame_has_code_then_reason() {
        let frame = close_frame(CloseCode::ServiceRestart);
        assert_eq!(frame[0], 0x88);
        assert_eq!(u16::from_be_bytes([frame[2], frame[3]]), 1012);
        assert_eq!(&frame[4..], CloseCode::ServiceRestart.reason().as_bytes());
    }

    #[test]
    fn a_masked_frame_decodes_back_to_its_payload() {
        let mut frame = Vec::new();
        encode_masked_frame(OpCode::Data(Data::Text), b"hello", [9, 8, 7, 6], &mut frame);
        assert_eq!(frame, client_frame_with_mask(b"hello", [9, 8, 7, 6]));
        let (result, events) = decode_all(&mut WsDecoder::default(), &mut frame);
        assert!(result.is_ok());
        assert_eq!(events, vec!["text:hello"]);
    }

    fn client_frame_with_mask(payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let header = FrameHeader {
            is_final: true,
            rsv1: false,
            rsv2: false,
            rsv3: false,
            opcode: OpCode::Data(Data::Text),
            mask: Some(mask),
        };
        let mut frame = Vec::new();
        header.format(payload.len() as u64, &mut frame).unwrap();
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        frame
    }

    #[test]
    fn long_text_frames_use_extended_lengths() {
        let frame = text_frame(&[b'x'; 70_000]);
        assert_eq!(frame[1], 127);
        assert_eq!(frame.len(), 10 + 70_000);
    }

    fn close_frame_with(code: u16) -> Vec<u8> {
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(b"bye");
        let mut frame = Vec::new();
        encode_masked_frame(
            OpCode::Control(Control::Close),
            &payload,
            [1, 2, 3, 4],
            &mut frame,
        );
        frame
    }

    #[test]
    fn only_codes_a_peer_may_send_are_accepted_in_a_close() {
        for code in [
            1000, 1001, 1002, 1003, 1007, 1010, 1011, 1012, 1014, 3000, 4999,
        ] {
            let mut frame = close_frame_with(code);
            let mut events = Vec::new();
            let result = WsDecoder::default().decode(&mut frame, 1024, |event| {
                events.push(format!("{event:?}"));
                Flow::Continue
            });
            assert!(result.is_ok(), "{code}");
            assert_eq!(events, [format!("Close(Some({code}))")]);
        }
        for code in [
            0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            let mut frame = close_frame_with(code);
            let result = WsDecoder::default().decode(&mut frame, 1024, |_| Flow::Continue);
            assert_eq!(result, Err(CloseCode::ProtocolError), "{code}");
        }
    }

    #[test]
    fn a_64_bit_length_with_its_top_bit_set_is_a_protocol_error() {
        // FIN + text, masked, 127: a 64-bit length follows, here 2^63.
        let mut frame = vec![0x81, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4];
        let result = WsDecoder::default().decode(&mut frame, 1024, |_| Flow::Continue);
        assert_eq!(result, Err(CloseCode::ProtocolError));
    }

    #[test]
    fn every_fragment_but_the_last_is_an_event_the_caller_can_count() {
        let mut input = Vec::new();
        let mut first = Vec::new();
        encode_masked_frame(OpCode::Data(Data::Text), b"he", [9, 9, 9, 9], &mut first);
        first[0] &= 0x7f; // not final
        input.extend_from_slice(&first);
        for _ in 0..3 {
            let mut empty = Vec::new();
            encode_masked_frame(OpCode::Data(Data::Continue), b"", [1, 1, 1, 1], &mut empty);
            empty[0] &= 0x7f;
            input.extend_from_slice(&empty);
        }
        let mut last = Vec::new();
        encode_masked_frame(
            OpCode::Data(Data::Continue),
            b"llo",
            [5, 5, 5, 5],
            &mut last,
        );
        input.extend_from_slice(&last);
        let mut events = Vec::new();
        WsDecoder::default()
            .decode(&mut input, 1024, |event| {
                events.push(format!("{event:?}"));
                Flow::Continue
            })
            .unwrap();
        let fragments = events.iter().filter(|e| *e == "Fragment").count();
        assert_eq!(fragments, 4);
        assert_eq!(
            events.last().unwrap(),
            &format!("{:?}", WsEvent::Text(b"hello"))
        );
    }
}
