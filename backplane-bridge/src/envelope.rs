//! The wire format between nodes: a compact binary envelope with a version byte.
//!
//! Owns encoding and decoding of everything one node sends another: a durable
//! message for some users' devices (carried as the JSON `message` frame those
//! devices receive, so a node never re-encodes it), a node's heartbeat, an
//! exception's registration at its user's home, a revocation, and a home's
//! request that registered nodes resync users after it lost NATS. Never JSON on the outside,
//! never trusted: every field is length-checked on decode, and counts are
//! bounded before anything is allocated.

use bytes::Bytes;
use chat_protocol::binary::{DecodeError, Decoder, Encoder};

/// Version of the envelope layout; a node refuses others (and counts them).
/// Version 2: subjects per node (version 1 was one envelope per user subject).
pub const ENVELOPE_VERSION: u8 = 2;
const KIND_DELIVER: u8 = 1;
const KIND_HEARTBEAT: u8 = 2;
const KIND_REGISTER: u8 = 3;
const KIND_UNREGISTER: u8 = 4;
const KIND_REVOKE: u8 = 5;
const KIND_RESYNC: u8 = 6;
/// Users one `Deliver` may name: a group's members homed on one node, at
/// most the group size bound (`chat_protocol::limits`), with room to spare.
pub const DELIVER_USERS_MAX: usize = 4_096;

/// How a `Deliver` travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    /// From the sending node to the users' home: the home delivers to its
    /// own devices and forwards to the other nodes that have some.
    ToHome,
    /// From a home to a node that has devices of the users: delivered there,
    /// never forwarded again (so a disagreement about homes cannot loop).
    Forwarded,
}

/// A message for the devices of `users` on the node it is published to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deliver {
    /// The node that published this envelope (a home never forwards a
    /// message back to the node that sent it: its devices have it).
    pub origin_node: u16,
    pub hop: Hop,
    pub users: Vec<Box<str>>,
    pub message_id: u64,
    /// The `message` frame's JSON, exactly as local devices got it.
    pub json: Bytes,
}

/// What a node says about itself, on the fleet's membership subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    pub node: u16,
    /// Random per process start: a node that restarted with the same id
    /// lost the exceptions it held, and the others register again.
    pub incarnation: u64,
    /// False when the node is draining or stopping: it leaves at once.
    pub serving: bool,
    /// Where clients reach this node (`public_url`); empty when not set.
    pub url: Box<str>,
}

/// Longest `public_url` a heartbeat carries.
pub const URL_BYTES_MAX: usize = 512;

/// Every envelope kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Envelope {
    Deliver(Deliver),
    Heartbeat(Heartbeat),
    /// `node` has devices of `user`, whose home receives this: forward to it.
    /// Sent as a request; the home answers once it will forward.
    Register {
        node: u16,
        user: Box<str>,
    },
    /// `node` no longer has devices of `user`.
    Unregister {
        node: u16,
        user: Box<str>,
    },
    /// `user`'s `device` (every device when empty) was revoked: close it.
    /// Travels like a `Deliver` (to the home, which forwards).
    Revoke {
        origin_node: u16,
        hop: Hop,
        user: Box<str>,
        device: Box<str>,
    },
    /// From a home that lost NATS: what it should have forwarded meanwhile
    /// was lost, so the devices of `users` on the receiving node resync
    /// what was made since `since_unix_ms`.
    Resync {
        users: Vec<Box<str>>,
        since_unix_ms: u64,
    },
}

impl Envelope {
    pub fn encode(&self) -> Vec<u8> {
        let mut encoder = Encoder::with_capacity(64);
        encoder.u8(ENVELOPE_VERSION);
        match self {
            Envelope::Deliver(deliver) => {
                let users_len: usize = deliver.users.iter().map(|u| u.len() + 2).sum();
                encoder.bytes.reserve(users_len + deliver.json.len() + 24);
                encoder
                    .u8(KIND_DELIVER)
                    .u16(deliver.origin_node)
                    .u8(hop_byte(deliver.hop))
                    .u64(deliver.message_id)
                    .u16(u16::try_from(deliver.users.len()).expect("bounded by DELIVER_USERS_MAX"));
                for user in &deliver.users {
                    encoder.str(user);
                }
                encoder.bytes(&deliver.json);
            }
            Envelope::Heartbeat(heartbeat) => {
                encoder
                    .u8(KIND_HEARTBEAT)
                    .u16(heartbeat.node)
                    .u64(heartbeat.incarnation)
                    .u8(u8::from(heartbeat.serving))
                    .str(&heartbeat.url);
            }
            Envelope::Register { node, user } => {
                encoder.u8(KIND_REGISTER).u16(*node).str(user);
            }
            Envelope::Unregister { node, user } => {
                encoder.u8(KIND_UNREGISTER).u16(*node).str(user);
            }
            Envelope::Revoke {
                origin_node,
                hop,
                user,
                device,
            } => {
                encoder
                    .u8(KIND_REVOKE)
                    .u16(*origin_node)
                    .u8(hop_byte(*hop))
                    .str(user)
                    .str(device);
            }
            Envelope::Resync {
                users,
                since_unix_ms,
            } => {
                encoder
                    .u8(KIND_RESYNC)
                    .u64(*since_unix_ms)
                    .u16(u16::try_from(users.len()).expect("bounded by DELIVER_USERS_MAX"));
                for user in users {
                    encoder.str(user);
                }
            }
        }
        encoder.bytes
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut decoder = Decoder::new(bytes);
        if decoder.u8()? != ENVELOPE_VERSION {
            return Err(DecodeError("unknown envelope version"));
        }
        let envelope = match decoder.u8()? {
            KIND_DELIVER => {
                let origin_node = decoder.u16()?;
                let hop = hop_of(decoder.u8()?)?;
                let message_id = decoder.u64()?;
                let users = users(&mut decoder)?;
                Envelope::Deliver(Deliver {
                    origin_node,
                    hop,
                    users,
                    message_id,
                    json: Bytes::copy_from_slice(decoder.bytes()?),
                })
            }
            KIND_HEARTBEAT => Envelope::Heartbeat(Heartbeat {
                node: decoder.u16()?,
                incarnation: decoder.u64()?,
                serving: match decoder.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(DecodeError("bad serving flag")),
                },
                url: match decoder.str()? {
                    url if url.len() <= URL_BYTES_MAX => url.into(),
                    _ => return Err(DecodeError("url too long")),
                },
            }),
            KIND_REGISTER => Envelope::Register {
                node: decoder.u16()?,
                user: decoder.str()?.into(),
            },
            KIND_UNREGISTER => Envelope::Unregister {
                node: decoder.u16()?,
                user: decoder.str()?.into(),
            },
            KIND_REVOKE => Envelope::Revoke {
                origin_node: decoder.u16()?,
                hop: hop_of(decoder.u8()?)?,
                user: decoder.str()?.into(),
                device: decoder.str()?.into(),
            },
            KIND_RESYNC => {
                let since_unix_ms = decoder.u64()?;
                Envelope::Resync {
                    users: users(&mut decoder)?,
                    since_unix_ms,
                }
            }
            _ => return Err(DecodeError("unknown envelope kind")),
        };
        decoder.finish()?;
        Ok(envelope)
    }
}

/// A count, checked before anything is allocated, then that many users.
fn users(decoder: &mut Decoder<'_>) -> Result<Vec<Box<str>>, DecodeError> {
    let count = usize::from(decoder.u16()?);
    if count == 0 || count > DELIVER_USERS_MAX {
        return Err(DecodeError("bad user count"));
    }
    let mut users = Vec::with_capacity(count);
    for _ in 0..count {
        users.push(decoder.str()?.into());
    }
    Ok(users)
}

fn hop_byte(hop: Hop) -> u8 {
    match hop {
        Hop::ToHome => 0,
        Hop::Forwarded => 1,
    }
}

fn hop_of(byte: u8) -> Result<Hop, DecodeError> {
    match byte {
        0 => Ok(Hop::ToHome),
        1 => Ok(Hop::Forwarded),
        _ => Err(DecodeError("unknown hop")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_kind() -> Vec<Envelope> {
        vec![
            Envelope::Deliver(Deliver {
                origin_node: 17,
                hop: Hop::Forwarded,
                users: vec!["bob".into(), "carol".into()],
                message_id: 42,
                json: Bytes::from_static(br#"{"type":"message"}"#),
            }),
            Envelope::Heartbeat(Heartbeat {
                node: 4095,
                incarnation: u64::MAX - 3,
                serving: false,
                url: "wss://node-4095.chat.example:443/ws".into(),
            }),
            Envelope::Register {
                node: 3,
                user: "bob".into(),
            },
            Envelope::Unregister {
                node: 9,
                user: "a.b".into(),
            },
            Envelope::Revoke {
                origin_node: 2,
                hop: Hop::ToHome,
                user: "alice".into(),
                device: "".into(),
            },
            Envelope::Resync {
                users: vec!["alice".into(), "bob".into()],
                since_unix_ms: 1_764_300_000_000,
            },
        ]
    }

    #[test]
    fn every_kind_round_trips_and_damaged_ones_are_refused() {
        for envelope in every_kind() {
            let bytes = envelope.encode();
            assert_eq!(Envelope::decode(&bytes), Ok(envelope.clone()));
            let mut other_version = bytes.clone();
            other_version[0] = 1;
            assert!(Envelope::decode(&other_version).is_err());
            assert!(Envelope::decode(&bytes[..bytes.len() - 1]).is_err());
            let mut trailing = bytes.clone();
            trailing.push(0);
            assert!(Envelope::decode(&trailing).is_err());
            let mut other_kind = bytes;
            other_kind[1] = 99;
            assert!(Envelope::decode(&other_kind).is_err());
        }
        assert!(Envelope::decode(&[]).is_err());
    }

    #[test]
    fn a_deliver_with_no_users_or_too_many_is_refused_before_allocating() {
        let with_count = |count: u16| {
            let mut encoder = Encoder::default();
            encoder
                .u8(ENVELOPE_VERSION)
                .u8(KIND_DELIVER)
                .u16(1)
                .u8(0)
                .u64(7)
                .u16(count);
            encoder.bytes
        };
        assert!(Envelope::decode(&with_count(0)).is_err());
        assert_eq!(
            Envelope::decode(&with_count(u16::MAX)),
            Err(DecodeError("bad user count"))
        );
    }
}
