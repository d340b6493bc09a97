//! The records a shard appends to its ring and the storage-writer stores.
//!
//! Owns the binary layout of each record kind (a kind byte, a version byte,
//! then fields; see `binary`) so the gateway and the writer, two processes,
//! agree byte for byte. A stored message is its `Message` record unchanged,
//! so reading history needs no second format. Never interprets bodies: they
//! are opaque ciphertext to the server.

use crate::binary::{DecodeError, Decoder, Encoder};

/// Version of every record kind's field list; a reader refuses others.
pub const RECORD_VERSION: u8 = 1;

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
        if decoder.u8()? != RECORD_VERSION {
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
