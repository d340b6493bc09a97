//! The records a shard appends to its ring and the storage-writer stores.
//!
//! Owns the binary layout of each record kind (a kind byte, a version byte,
//! then fields; see `binary`) so the gateway and the writer, two processes,
//! agree byte for byte. A stored message is its `Message` record unchanged,
//! so reading history needs no second format. Never interprets bodies: they
//! are opaque ciphertext to the server.

use std::borrow::Cow;

use crate::binary::{DecodeError, Decoder, Encoder};
use crate::frames::Media;

/// Version of the record field lists this build writes. Version 2 added an
/// optional media reference to messages; version 1 records (no media) are
/// still read, so a ring written by the previous build drains. Others are refused.
pub const RECORD_VERSION: u8 = 2;
/// The oldest version this build reads.
pub const RECORD_VERSION_MIN: u8 = 1;

const KIND_MESSAGE: u8 = 1;
const KIND_ACK: u8 = 2;

/// One accepted `send`: stored in its conversation, indexed in the inbox of
/// the recipient and of the sender's user (for the sender's other devices),
/// and remembered under its idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRecord<'a> {
    pub message_id: u64,
    /// Unix milliseconds, as in the snowflake.
    pub ts: u64,
    pub conversation: &'a str,
    pub from: &'a str,
    pub from_device: &'a str,
    pub to: &'a str,
    pub client_msg_id: &'a str,
    pub body: &'a str,
    pub media: Option<Media<'a>>,
}

/// A device acknowledged a message it received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckRecord<'a> {
    pub user: &'a str,
    pub device: &'a str,
    pub message_id: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record<'a> {
    Message(MessageRecord<'a>),
    Ack(AckRecord<'a>),
}

impl MessageRecord<'_> {
    pub fn encode(&self) -> Vec<u8> {
        let mut encoder = Encoder::with_capacity(
            40 + self.conversation.len()
                + self.from.len()
                + self.from_device.len()
                + self.to.len()
                + self.client_msg_id.len()
                + self.body.len(),
        );
        encoder
            .u8(KIND_MESSAGE)
            .u8(RECORD_VERSION)
            .u64(self.message_id)
            .u64(self.ts)
            .str(self.conversation)
            .str(self.from)
            .str(self.from_device)
            .str(self.to)
            .str(self.client_msg_id)
            .long_str(self.body);
        match &self.media {
            None => {
                encoder.u8(0);
            }
            Some(media) => {
                encoder
                    .u8(1)
                    .long_str(&media.url)
                    .u64(media.size)
                    .str(&media.sha256);
            }
        }
        encoder.bytes
    }
}

impl AckRecord<'_> {
    pub fn encode(&self) -> Vec<u8> {
        let mut encoder = Encoder::with_capacity(16 + self.user.len() + self.device.len());
        encoder
            .u8(KIND_ACK)
            .u8(RECORD_VERSION)
            .str(self.user)
            .str(self.device)
            .u64(self.message_id);
        encoder.bytes
    }
}

impl<'a> Record<'a> {
    /// Decodes one record; any other kind, version or length is an error.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, DecodeError> {
        let mut decoder = Decoder::new(bytes);
        let kind = decoder.u8()?;
        let version = decoder.u8()?;
        if !(RECORD_VERSION_MIN..=RECORD_VERSION).contains(&version) {
            return Err(DecodeError("unknown record version"));
        }
        let record = match kind {
            KIND_MESSAGE => Record::Message(MessageRecord {
                message_id: decoder.u64()?,
                ts: decoder.u64()?,
                conversation: decoder.str()?,
                from: decoder.str()?,
                from_device: decoder.str()?,
                to: decoder.str()?,
                client_msg_id: decoder.str()?,
                body: decoder.long_str()?,
                media: match version {
                    1 => None,
                    _ => match decoder.u8()? {
                        0 => None,
                        1 => Some(Media {
                            url: Cow::Borrowed(decoder.long_str()?),
                            size: decoder.u64()?,
                            sha256: Cow::Borrowed(decoder.str()?),
                        }),
                        _ => return Err(DecodeError("bad media flag")),
                    },
                },
            }),
            KIND_ACK => Record::Ack(AckRecord {
                user: decoder.str()?,
                device: decoder.str()?,
                message_id: decoder.u64()?,
            }),
            _ => return Err(DecodeError("unknown record kind")),
        };
        decoder.finish()?;
        Ok(record)
    }
}

/// Decodes a stored message (a `Message` record).
pub fn decode_message(bytes: &[u8]) -> Result<MessageRecord<'_>, DecodeError> {
    match Record::decode(bytes)? {
        Record::Message(message) => Ok(message),
        Record::Ack(_) => Err(DecodeError("expected a message record")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message() -> MessageRecord<'static> {
        MessageRecord {
            message_id: 99,
            ts: 1_700_000_000_000,
            conversation: "dm:alice:bob",
            from: "alice",
            from_device: "phone",
            to: "bob",
            client_msg_id: "c-1",
            body: "ciphertext ✓",
            media: None,
        }
    }

    #[test]
    fn records_round_trip() {
        let bytes = message().encode();
        assert_eq!(Record::decode(&bytes), Ok(Record::Message(message())));
        let ack = AckRecord {
            user: "bob",
            device: "laptop",
            message_id: 99,
        };
        assert_eq!(Record::decode(&ack.encode()), Ok(Record::Ack(ack)));
    }

    #[test]
    fn media_round_trips_and_version_1_records_still_decode() {
        let with_media = MessageRecord {
            media: Some(Media {
                url: "https://cdn.example/a".into(),
                size: 10,
                sha256: "ab".repeat(32).into(),
            }),
            ..message()
        };
        let bytes = with_media.encode();
        assert_eq!(Record::decode(&bytes), Ok(Record::Message(with_media)));
        // A version 1 record: the same fields, without the media flag.
        let mut v1 = message().encode();
        v1.pop();
        v1[1] = 1;
        assert_eq!(Record::decode(&v1), Ok(Record::Message(message())));
    }

    #[test]
    fn other_versions_kinds_and_lengths_are_refused() {
        let mut bytes = message().encode();
        bytes[1] = RECORD_VERSION + 1;
        assert!(Record::decode(&bytes).is_err());
        let mut bytes = message().encode();
        bytes[0] = 9;
        assert!(Record::decode(&bytes).is_err());
        let mut bytes = message().encode();
        bytes.push(0);
        assert!(Record::decode(&bytes).is_err(), "trailing byte");
        let bytes = message().encode();
        assert!(Record::decode(&bytes[..bytes.len() - 1]).is_err());
    }
}
