//! The JSON frames of protocol v1: decoding what clients send, encoding what the server sends.
//!
//! Owns the frame shapes, field rules and the choice of error code for bad input.
//! Decoding borrows from the input where it can (no allocation for a body with
//! no escapes). Never decides routing: that is the gateway's shard.

use std::borrow::Cow;

use serde::{Deserialize, Serialize, Serializer};

use crate::codes::ErrorCode;
use crate::ids::is_valid_id;

/// A frame a client sent, validated.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientFrame<'a> {
    Send(SendFrame<'a>),
    Ping,
}

/// `{"type":"send","id":...,"to":...,"body":...}`
#[derive(Debug, PartialEq, Eq)]
pub struct SendFrame<'a> {
    /// The client's message id (idempotency key), valid id grammar.
    pub client_msg_id: Cow<'a, str>,
    /// Recipient user id, valid id grammar.
    pub to: Cow<'a, str>,
    /// Opaque to the server (clients put ciphertext here).
    pub body: Cow<'a, str>,
}

/// Why a client frame was refused; becomes an `error` frame.
#[derive(Debug, PartialEq, Eq)]
pub struct FrameError {
    /// The frame's `id`, when it had a readable one.
    pub client_msg_id: Option<String>,
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Deserialize)]
struct RawFrame<'a> {
    #[serde(rename = "type", default, borrow, deserialize_with = "string_field")]
    kind: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "string_field")]
    id: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "string_field")]
    to: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "string_field")]
    body: Option<Cow<'a, str>>,
}

/// A present string field, borrowed from the input unless it has escapes.
/// (serde's own `Option<Cow<str>>` always copies.)
fn string_field<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Cow<'de, str>>, D::Error> {
    struct StringVisitor;
    impl<'de> serde::de::Visitor<'de> for StringVisitor {
        type Value = Cow<'de, str>;
        fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
            formatter.write_str("a string")
        }
        fn visit_borrowed_str<E: serde::de::Error>(
            self,
            value: &'de str,
        ) -> Result<Self::Value, E> {
            Ok(Cow::Borrowed(value))
        }
        fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Self::Value, E> {
            Ok(Cow::Owned(value.to_owned()))
        }
        fn visit_string<E: serde::de::Error>(self, value: String) -> Result<Self::Value, E> {
            Ok(Cow::Owned(value))
        }
    }
    deserializer.deserialize_str(StringVisitor).map(Some)
}

/// Decodes and validates one text message from a client.
pub fn decode_client_frame(
    text: &[u8],
    body_bytes_max: usize,
) -> Result<ClientFrame<'_>, FrameError> {
    let raw: RawFrame<'_> = match serde_json::from_slice(text) {
        Ok(raw) => raw,
        Err(_) => return Err(explain_undecodable(text)),
    };
    let client_msg_id = raw.id.as_deref().map(str::to_owned);
    let fail = |code: ErrorCode, message: String| FrameError {
        client_msg_id: client_msg_id.clone(),
        code,
        message,
    };
    match raw.kind.as_deref() {
        Some("ping") => Ok(ClientFrame::Ping),
        Some("send") => {
            let id = raw
                .id
                .ok_or_else(|| fail(ErrorCode::InvalidField, "`id` is required".into()))?;
            if !is_valid_id(&id) {
                return Err(fail(
                    ErrorCode::InvalidField,
                    "`id` must be 1-64 characters of [A-Za-z0-9_.-]".into(),
                ));
            }
            let to = raw
                .to
                .ok_or_else(|| fail(ErrorCode::InvalidField, "`to` is required".into()))?;
            if !is_valid_id(&to) {
                return Err(fail(
                    ErrorCode::InvalidField,
                    "`to` must be a user id".into(),
                ));
            }
            let body = raw
                .body
                .ok_or_else(|| fail(ErrorCode::InvalidField, "`body` is required".into()))?;
            if body.len() > body_bytes_max {
                return Err(fail(
                    ErrorCode::BodyTooLarge,
                    format!(
                        "`body` is {} bytes; the limit is {body_bytes_max}",
                        body.len()
                    ),
                ));
            }
            Ok(ClientFrame::Send(SendFrame {
                client_msg_id: id,
                to,
                body,
            }))
        }
        Some(other) => Err(fail(
            ErrorCode::UnknownType,
            format!("unknown frame type `{}`", truncate(other)),
        )),
        None => Err(fail(ErrorCode::UnknownType, "`type` is required".into())),
    }
}

/// The frame did not fit `RawFrame`: say precisely why, off the hot path.
fn explain_undecodable(text: &[u8]) -> FrameError {
    let value: serde_json::Value = match serde_json::from_slice(text) {
        Ok(value) => value,
        Err(error) => {
            return FrameError {
                client_msg_id: None,
                code: ErrorCode::MalformedJson,
                message: format!("not valid JSON: {error}"),
            }
        }
    };
    let Some(object) = value.as_object() else {
        return FrameError {
            client_msg_id: None,
            code: ErrorCode::MalformedJson,
            message: "a frame must be a JSON object".into(),
        };
    };
    let client_msg_id = object
        .get("id")
        .and_then(|id| id.as_str())
        .map(str::to_owned);
    let wrong = ["type", "id", "to", "body"]
        .into_iter()
        .find(|field| object.get(*field).is_some_and(|v| !v.is_string()))
        .unwrap_or("type");
    let code = if wrong == "type" {
        ErrorCode::UnknownType
    } else {
        ErrorCode::InvalidField
    };
    FrameError {
        client_msg_id,
        code,
        message: format!("`{wrong}` must be a string"),
    }
}

fn truncate(text: &str) -> &str {
    let mut end = text.len().min(32);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// A 64-bit id written as a decimal string (browsers cannot hold 64-bit integers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdText(pub u64);

impl Serialize for IdText {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

/// `sent`: the server has the message; sent only to the sending device.
#[derive(Serialize)]
pub struct SentFrame<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub id: &'a str,
    pub message_id: IdText,
    pub conversation: &'a str,
    pub ts: u64,
}

/// `message`: delivered to every device of the recipient and the sender's other devices.
#[derive(Serialize)]
pub struct MessageFrame<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub message_id: IdText,
    pub conversation: &'a str,
    pub from: &'a str,
    pub from_device: &'a str,
    pub to: &'a str,
    pub body: &'a str,
    pub ts: u64,
}

/// `hello`: first frame on every connection, once it is registered for delivery.
#[derive(Serialize)]
pub struct HelloFrame<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub protocol: u32,
    pub user: &'a str,
    pub device: &'a str,
    pub heartbeat_interval_ms: u64,
    pub heartbeat_timeout_ms: u64,
    pub body_bytes_max: usize,
    pub message_bytes_max: usize,
}

#[derive(Serialize)]
struct ErrorFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    code: &'static str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_ms: Option<u64>,
}

pub fn encode_sent(client_msg_id: &str, message_id: u64, conversation: &str, ts: u64) -> Vec<u8> {
    to_json(&SentFrame {
        kind: "sent",
        id: client_msg_id,
        message_id: IdText(message_id),
        conversation,
        ts,
    })
}

pub fn encode_message(frame: &MessageFrame<'_>) -> Vec<u8> {
    to_json(frame)
}

pub fn encode_hello(frame: &HelloFrame<'_>) -> Vec<u8> {
    to_json(frame)
}

pub fn encode_error(
    client_msg_id: Option<&str>,
    code: ErrorCode,
    message: &str,
    retry_after_ms: Option<u64>,
) -> Vec<u8> {
    to_json(&ErrorFrame {
        kind: "error",
        id: client_msg_id,
        code: code.as_str(),
        message,
        retry_after_ms,
    })
}

pub const PONG_JSON: &[u8] = br#"{"type":"pong"}"#;

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("server frames always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 16;

    #[test]
    fn a_send_decodes_and_borrows_its_fields() {
        let text = br#"{"type":"send","id":"c1","to":"bob","body":"hi","extra":1}"#;
        let frame = decode_client_frame(text, MAX).unwrap();
        let ClientFrame::Send(send) = frame else {
            panic!("not a send")
        };
        assert_eq!(
            (&*send.client_msg_id, &*send.to, &*send.body),
            ("c1", "bob", "hi")
        );
        assert!(matches!(send.body, Cow::Borrowed(_)));
    }

    #[test]
    fn ping_decodes() {
        assert_eq!(
            decode_client_frame(br#"{"type":"ping"}"#, MAX),
            Ok(ClientFrame::Ping)
        );
    }

    fn error_of(text: &[u8]) -> FrameError {
        decode_client_frame(text, MAX).unwrap_err()
    }

    #[test]
    fn bad_frames_get_the_documented_codes() {
        assert_eq!(error_of(b"{not json").code, ErrorCode::MalformedJson);
        assert_eq!(error_of(b"[1,2]").code, ErrorCode::MalformedJson);
        assert_eq!(error_of(br#"{"id":"x"}"#).code, ErrorCode::UnknownType);
        assert_eq!(
            error_of(br#"{"type":"dance"}"#).code,
            ErrorCode::UnknownType
        );
        assert_eq!(error_of(br#"{"type":7}"#).code, ErrorCode::UnknownType);
        assert_eq!(
            error_of(br#"{"type":"send","id":"c1","body":"x"}"#).code,
            ErrorCode::InvalidField
        );
        assert_eq!(
            error_of(br#"{"type":"send","id":"c 1","to":"bob","body":"x"}"#).code,
            ErrorCode::InvalidField
        );
        let wrong_type = error_of(br#"{"type":"send","id":"c1","to":"bob","body":5}"#);
        assert_eq!(
            (wrong_type.code, wrong_type.client_msg_id.as_deref()),
            (ErrorCode::InvalidField, Some("c1"))
        );
        let too_big =
            error_of(br#"{"type":"send","id":"c2","to":"bob","body":"0123456789abcdefg"}"#);
        assert_eq!(
            (too_big.code, too_big.client_msg_id.as_deref()),
            (ErrorCode::BodyTooLarge, Some("c2"))
        );
    }

    #[test]
    fn server_frames_write_ids_as_strings() {
        let sent = String::from_utf8(encode_sent("c1", u64::MAX >> 1, "dm:a:b", 5)).unwrap();
        assert_eq!(
            sent,
            r#"{"type":"sent","id":"c1","message_id":"9223372036854775807","conversation":"dm:a:b","ts":5}"#
        );
        let error = String::from_utf8(encode_error(None, ErrorCode::Overloaded, "busy", Some(100)))
            .unwrap();
        assert_eq!(
            error,
            r#"{"type":"error","code":"overloaded","message":"busy","retry_after_ms":100}"#
        );
    }
}
