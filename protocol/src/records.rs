//! The records a shard appends to its ring and the storage-writer stores.
//!
//! Owns the binary layout of each record kind (a kind byte, a version byte,
//! then fields; see `binary`) so the gateway and the writer, two processes,
//! agree byte for byte. A stored message is its `Message` record unchanged,
//! so reading history needs no second format. Never interprets bodies: they
//! are opaque ciphertext to the server.

use std::borrow::Cow;

use crate::binary::{DecodeError, Decoder, Encoder};
use crate::media::Media;

/// Version of the record field lists this build writes. Version 2 added an
/// optional media reference to messages, version 3 an optional event (a
/// group membership change or a batch of receipts) and the recipient list of
/// a group message. Versions 1 and 2 are still read, so a ring written by a
/// previous build drains. Others are refused.
pub const RECORD_VERSION: u8 = 3;
/// The oldest version this build reads.
pub const RECORD_VERSION_MIN: u8 = 1;

const KIND_MESSAGE: u8 = 1;
const KIND_ACK: u8 = 2;
const KIND_PRESENCE: u8 = 3;

pub use crate::limits::{PRESENCE_RECORD_USERS_MAX, RECEIPTS_PER_RECORD_MAX, RECIPIENTS_MAX};

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
    /// What this message is when it is not a client's text: a membership
    /// change of its group, or receipts for `to`.
    pub event: Option<Event<'a>>,
    /// Group messages only: every user whose inbox gets it (the members when
    /// it was sent). Empty for a 1:1 message (`to` and `from` get it). Never
    /// stored with the message: the writer strips it.
    pub recipients: Vec<&'a str>,
    /// Per-device ciphertexts (`<user>/<device>`, body), sorted by key,
    /// instead of `body`; each device is given only its own.
    pub bodies: Vec<(&'a str, &'a str)>,
}

/// A server-made message: what happened, in order with the conversation's messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<'a> {
    /// Group membership changed: `members` were created with, added to,
    /// removed from the group, or left it.
    Group {
        action: GroupAction,
        members: Vec<&'a str>,
    },
    /// Receipts for messages of `conversation` sent by `to`, batched.
    Receipts {
        conversation: &'a str,
        receipts: Vec<Receipt<'a>>,
    },
    /// Delete for everyone: the sender withdraws its message `target` of
    /// the same conversation. Stored in place of the target too, as its
    /// tombstone: a record whose `Delete` names its own id is a message
    /// that was deleted (no body, no media, no ciphertexts).
    Delete { target: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupAction {
    Create = 1,
    Add = 2,
    Remove = 3,
    Leave = 4,
    /// Members become admins (who may add, remove and promote).
    Promote = 5,
    /// From now on only admins post in the group (names no members).
    Restrict = 6,
    /// Every member posts again (names no members).
    Open = 7,
}

impl GroupAction {
    pub fn as_str(self) -> &'static str {
        match self {
            GroupAction::Create => "created",
            GroupAction::Add => "added",
            GroupAction::Remove => "removed",
            GroupAction::Leave => "left",
            GroupAction::Promote => "promoted",
            GroupAction::Restrict => "restricted",
            GroupAction::Open => "opened",
        }
    }

    /// Whether the members join (rather than leave) the group.
    pub fn joins(self) -> bool {
        matches!(self, GroupAction::Create | GroupAction::Add)
    }

    fn from_u8(value: u8) -> Result<Self, DecodeError> {
        Ok(match value {
            1 => GroupAction::Create,
            2 => GroupAction::Add,
            3 => GroupAction::Remove,
            4 => GroupAction::Leave,
            5 => GroupAction::Promote,
            6 => GroupAction::Restrict,
            7 => GroupAction::Open,
            _ => return Err(DecodeError("unknown group action")),
        })
    }
}

/// `user`'s `device` received (or `user` read) messages up to `up_to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt<'a> {
    pub user: &'a str,
    pub device: &'a str,
    pub status: ReceiptStatus,
    pub up_to: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ReceiptStatus {
    Delivered = 1,
    Read = 2,
}

impl ReceiptStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ReceiptStatus::Delivered => "delivered",
            ReceiptStatus::Read => "read",
        }
    }

    fn from_u8(value: u8) -> Result<Self, DecodeError> {
        match value {
            1 => Ok(ReceiptStatus::Delivered),
            2 => Ok(ReceiptStatus::Read),
            _ => Err(DecodeError("unknown receipt status")),
        }
    }
}

/// Users online on a shard now, or gone offline at `last_seen_ms`: written
/// debounced, so presence costs storage a record per interval, not per
/// connect. Kept per node: a user with devices on two nodes is online while
/// either says so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceRecord<'a> {
    pub node: u16,
    pub entries: Vec<PresenceEntry<'a>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresenceEntry<'a> {
    pub user: &'a str,
    pub online: bool,
    /// Unix milliseconds: when it was last seen online (now, when online).
    pub last_seen_ms: u64,
}

/// A device acknowledged a message it received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckRecord<'a> {
    pub user: &'a str,
    pub device: &'a str,
    pub message_id: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
// Decoded one at a time on the stack and consumed at once: boxing the
// message variant would cost an allocation per record for nothing.
#[allow(clippy::large_enum_variant)]
pub enum Record<'a> {
    Message(MessageRecord<'a>),
    Ack(AckRecord<'a>),
    Presence(PresenceRecord<'a>),
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
        match &self.event {
            None => {
                encoder.u8(0);
            }
            Some(Event::Group { action, members }) => {
                encoder.u8(1).u8(*action as u8).u32(members.len() as u32);
                for member in members {
                    encoder.str(member);
                }
            }
            Some(Event::Receipts {
                conversation,
                receipts,
            }) => {
                encoder.u8(2).str(conversation).u32(receipts.len() as u32);
                for receipt in receipts {
                    encoder
                        .str(receipt.user)
                        .str(receipt.device)
                        .u8(receipt.status as u8)
                        .u64(receipt.up_to);
                }
            }
            Some(Event::Delete { target }) => {
                encoder.u8(3).u64(*target);
            }
        }
        encoder.u32(self.recipients.len() as u32);
        for recipient in &self.recipients {
            encoder.str(recipient);
        }
        encoder.u32(self.bodies.len() as u32);
        for (device, body) in &self.bodies {
            encoder.str(device).long_str(body);
        }
        encoder.bytes
    }
}

impl<'a> MessageRecord<'a> {
    /// The body `user`'s `device` is given: its own ciphertext when the
    /// message has one per device (none when it was not addressed), else
    /// the one body.
    pub fn body_for(&self, user: &str, device: &str) -> Option<&'a str> {
        if self.bodies.is_empty() {
            return Some(self.body);
        }
        let key = format!("{user}/{device}");
        self.bodies
            .binary_search_by(|(k, _)| (*k).cmp(key.as_str()))
            .ok()
            .map(|i| self.bodies[i].1)
    }

    /// The ciphertexts addressed to `user`'s devices: (device, body).
    pub fn bodies_of<'s>(&'s self, user: &'s str) -> impl Iterator<Item = (&'a str, &'a str)> + 's {
        self.bodies.iter().filter_map(move |(key, body)| {
            let (owner, device) = key.split_once('/')?;
            (owner == user).then_some((device, *body))
        })
    }

    /// The message this one deletes for everyone, if it is such a delete.
    pub fn deletes(&self) -> Option<u64> {
        match self.event {
            Some(Event::Delete { target }) if target != self.message_id => Some(target),
            _ => None,
        }
    }

    /// Whether this is the tombstone of a message its sender deleted.
    pub fn is_tombstone(&self) -> bool {
        matches!(self.event, Some(Event::Delete { target }) if target == self.message_id)
    }

    /// This message's tombstone, stored in its place once its sender
    /// deleted it for everyone: the same ids, sender and time, nothing of
    /// what it said.
    pub fn tombstone(&self) -> Vec<u8> {
        MessageRecord {
            body: "",
            media: None,
            event: Some(Event::Delete {
                target: self.message_id,
            }),
            recipients: Vec::new(),
            bodies: Vec::new(),
            ..self.clone()
        }
        .encode()
    }

    /// The record as stored in its conversation: without the recipient list.
    pub fn stored(&self) -> Vec<u8> {
        MessageRecord {
            recipients: Vec::new(),
            ..self.clone()
        }
        .encode()
    }
}

impl PresenceRecord<'_> {
    pub fn encode(&self) -> Vec<u8> {
        let mut encoder = Encoder::with_capacity(8 + self.entries.len() * 24);
        encoder
            .u8(KIND_PRESENCE)
            .u8(RECORD_VERSION)
            .u16(self.node)
            .u32(self.entries.len() as u32);
        for entry in &self.entries {
            encoder
                .str(entry.user)
                .u8(entry.online as u8)
                .u64(entry.last_seen_ms);
        }
        encoder.bytes
    }
}

/// A count of list items, refused past `max` (a corrupt length must not allocate).
fn count(decoder: &mut Decoder<'_>, max: usize) -> Result<usize, DecodeError> {
    let count = decoder.u32()? as usize;
    if count > max {
        return Err(DecodeError("list longer than its bound"));
    }
    Ok(count)
}

fn decode_event<'a>(decoder: &mut Decoder<'a>) -> Result<Option<Event<'a>>, DecodeError> {
    Ok(match decoder.u8()? {
        0 => None,
        1 => {
            let action = GroupAction::from_u8(decoder.u8()?)?;
            let n = count(decoder, RECIPIENTS_MAX)?;
            let mut members = Vec::with_capacity(n);
            for _ in 0..n {
                members.push(decoder.str()?);
            }
            Some(Event::Group { action, members })
        }
        2 => {
            let conversation = decoder.str()?;
            let n = count(decoder, RECEIPTS_PER_RECORD_MAX)?;
            let mut receipts = Vec::with_capacity(n);
            for _ in 0..n {
                receipts.push(Receipt {
                    user: decoder.str()?,
                    device: decoder.str()?,
                    status: ReceiptStatus::from_u8(decoder.u8()?)?,
                    up_to: decoder.u64()?,
                });
            }
            Some(Event::Receipts {
                conversation,
                receipts,
            })
        }
        3 => Some(Event::Delete {
            target: decoder.u64()?,
        }),
        _ => return Err(DecodeError("bad event flag")),
    })
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
                event: match version {
                    1 | 2 => None,
                    _ => decode_event(&mut decoder)?,
                },
                recipients: match version {
                    1 | 2 => Vec::new(),
                    _ => {
                        let n = count(&mut decoder, RECIPIENTS_MAX)?;
                        let mut recipients = Vec::with_capacity(n);
                        for _ in 0..n {
                            recipients.push(decoder.str()?);
                        }
                        recipients
                    }
                },
                bodies: match version {
                    1 | 2 => Vec::new(),
                    _ => {
                        let n = count(&mut decoder, RECIPIENTS_MAX)?;
                        let mut bodies = Vec::with_capacity(n);
                        for _ in 0..n {
                            bodies.push((decoder.str()?, decoder.long_str()?));
                        }
                        bodies
                    }
                },
            }),
            KIND_ACK => Record::Ack(AckRecord {
                user: decoder.str()?,
                device: decoder.str()?,
                message_id: decoder.u64()?,
            }),
            KIND_PRESENCE => {
                let node = decoder.u16()?;
                let n = count(&mut decoder, PRESENCE_RECORD_USERS_MAX)?;
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    entries.push(PresenceEntry {
                        user: decoder.str()?,
                        online: decoder.u8()? != 0,
                        last_seen_ms: decoder.u64()?,
                    });
                }
                Record::Presence(PresenceRecord { node, entries })
            }
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
        _ => Err(DecodeError("expected a message record")),
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
            event: None,
            recipients: Vec::new(),
            bodies: Vec::new(),
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
        // Versions 1 and 2: the same fields, without the later flags
        // (event flag 1 byte, recipient count 4 bytes; then the media flag).
        let mut v2 = message().encode();
        v2.truncate(v2.len() - 9);
        v2[1] = 2;
        assert_eq!(Record::decode(&v2), Ok(Record::Message(message())));
        let mut v1 = v2.clone();
        v1.pop();
        v1[1] = 1;
        assert_eq!(Record::decode(&v1), Ok(Record::Message(message())));
    }

    #[test]
    fn events_recipients_and_presence_round_trip() {
        let change = MessageRecord {
            conversation: "grp:g1",
            to: "g1",
            body: "",
            event: Some(Event::Group {
                action: GroupAction::Add,
                members: vec!["carol", "dave"],
            }),
            recipients: vec!["alice", "bob", "carol", "dave"],
            ..message()
        };
        let bytes = change.encode();
        assert_eq!(Record::decode(&bytes), Ok(Record::Message(change.clone())));
        // Stored without its recipients, event kept.
        let stored_bytes = change.stored();
        let stored = decode_message(&stored_bytes).unwrap();
        assert!(stored.recipients.is_empty());
        assert_eq!(stored.event, change.event);

        let receipts = MessageRecord {
            event: Some(Event::Receipts {
                conversation: "dm:alice:bob",
                receipts: vec![Receipt {
                    user: "bob",
                    device: "phone",
                    status: ReceiptStatus::Read,
                    up_to: 42,
                }],
            }),
            recipients: vec!["alice"],
            ..message()
        };
        let bytes = receipts.encode();
        assert_eq!(Record::decode(&bytes), Ok(Record::Message(receipts)));

        let presence = PresenceRecord {
            node: 3,
            entries: vec![PresenceEntry {
                user: "bob",
                online: false,
                last_seen_ms: 7,
            }],
        };
        let bytes = presence.encode();
        assert_eq!(Record::decode(&bytes), Ok(Record::Presence(presence)));

        let per_device = MessageRecord {
            body: "",
            bodies: vec![("alice/laptop", "c-laptop"), ("bob/phone", "c-phone")],
            ..message()
        };
        let bytes = per_device.encode();
        assert_eq!(
            Record::decode(&bytes),
            Ok(Record::Message(per_device.clone()))
        );
        assert_eq!(per_device.body_for("bob", "phone"), Some("c-phone"));
        assert_eq!(per_device.body_for("alice", "phone"), None);
        assert_eq!(
            per_device.bodies_of("alice").collect::<Vec<_>>(),
            [("laptop", "c-laptop")]
        );
        assert_eq!(message().body_for("bob", "tablet"), Some("ciphertext ✓"));
    }

    #[test]
    fn a_corrupt_list_length_is_refused_before_it_allocates() {
        let mut bytes = message().encode();
        let len = bytes.len();
        bytes[len - 4..].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Record::decode(&bytes).is_err());
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
