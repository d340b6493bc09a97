//! The read-path protocol between a gateway shard and the storage-writer, over a Unix socket.
//!
//! Owns the frames both processes exchange: the shard's `Hello` (which ring
//! it writes), its read requests (sync pages, history, recent sends for
//! idempotency), and the writer's answers plus `Durable` notices (the ring
//! position up to which records are committed, which releases `sent`).
//! Every frame is `[len u32][kind u8][fields]`, bounded by `READ_FRAME_BYTES_MAX`.
//! Never carries JSON: the gateway turns stored records into client frames.

use crate::binary::{DecodeError, Decoder, Encoder};
use crate::keys::Bundle;

pub use crate::limits::{READ_FRAME_BYTES_MAX, READ_USERS_MAX};

/// Where a sync page starts in a user's inbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncFrom {
    /// After everything this device acknowledged.
    Cursor,
    /// After the inbox entry of this message id (the client's `after`).
    AfterMessage(u64),
    /// After this inbox sequence number, skipping what the device
    /// acknowledged (the next page of a `Cursor` sync).
    AfterSeq(u64),
    /// After this inbox sequence number, acknowledged or not (the next page
    /// of an `AfterMessage` sync).
    AfterSeqAll(u64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Hello {
        shard: u16,
        ring: String,
    },
    Sync {
        req: u32,
        user: String,
        device: String,
        from: SyncFrom,
        limit: u16,
        bytes_max: u32,
    },
    History {
        req: u32,
        conversation: String,
        /// Only messages with a smaller id; `None` for the newest.
        before: Option<u64>,
        limit: u16,
    },
    /// Store a device's public keys (replacing its identity and signed
    /// prekey, adding one-time prekeys).
    KeysUpload {
        req: u32,
        user: String,
        device: String,
        identity_key: String,
        signed_prekey: String,
        signed_prekey_signature: String,
        one_time_prekeys: Vec<String>,
    },
    /// A bundle per device of `user`, each consuming one one-time prekey.
    KeysFetch {
        req: u32,
        user: String,
    },
    /// The message id first stored under this idempotency key, if any.
    SendOf {
        req: u32,
        user: String,
        device: String,
        client_msg_id: String,
    },
    /// The device's latest sends since `since_unix_ms`, to warm idempotency.
    Recent {
        req: u32,
        user: String,
        device: String,
        since_unix_ms: u64,
        limit: u16,
    },
    /// The current members of a group.
    Members {
        req: u32,
        group: String,
    },
    /// The devices of each of `users` in the key directory.
    Devices {
        req: u32,
        users: Vec<String>,
    },
    /// Presence of `users` as `asker` may see it: only users it shares a
    /// conversation with (a direct message either way, or a group).
    Presence {
        req: u32,
        asker: String,
        users: Vec<String>,
    },
}

/// What storage knows of one user's presence, for one asker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceAnswer {
    pub user: String,
    /// The asker shares a conversation with this user; when false the rest is empty.
    pub shared: bool,
    /// Marked online by its node's latest presence record.
    pub online: bool,
    /// When the latest record about it was written (unix ms).
    pub updated_ms: u64,
    /// When it was last seen online (unix ms), if ever.
    pub last_seen_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncEntry {
    /// Position in the user's inbox.
    pub seq: u64,
    /// The stored `Message` record.
    pub record: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecentSend {
    pub client_msg_id: String,
    pub message_id: u64,
    pub conversation: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// Every record before `position` in the shard's ring is committed.
    Durable {
        position: u64,
    },
    SyncPage {
        req: u32,
        entries: Vec<SyncEntry>,
        /// The inbox sequence the page ended at (the next page starts after it).
        last_seq: u64,
        /// More entries remain after this page.
        more: bool,
    },
    /// Stored `Message` records, newest first.
    Messages {
        req: u32,
        records: Vec<Vec<u8>>,
    },
    RecentSends {
        req: u32,
        sends: Vec<RecentSend>,
    },
    /// One-time prekeys the device now has stored.
    KeysUploaded {
        req: u32,
        stored: u32,
    },
    /// The answer to `SendOf`.
    SendOf {
        req: u32,
        message_id: Option<u64>,
    },
    /// Bundles, and how many one-time prekeys each device has left.
    Keys {
        req: u32,
        bundles: Vec<(Bundle, u32)>,
    },
    /// A group's members, sorted; empty when there is no such group.
    Members {
        req: u32,
        members: Vec<String>,
    },
    Presence {
        req: u32,
        users: Vec<PresenceAnswer>,
    },
    /// (user, device) for every device that uploaded keys.
    Devices {
        req: u32,
        devices: Vec<(String, String)>,
    },
    /// The read was not answered. `retryable`: storage is behind or failing
    /// (try again later); otherwise the request itself is wrong.
    Failed {
        req: u32,
        reason: String,
        retryable: bool,
    },
}

const HELLO: u8 = 1;
const SYNC: u8 = 2;
const HISTORY: u8 = 3;
const RECENT: u8 = 4;
const KEYS_UPLOAD: u8 = 5;
const KEYS_FETCH: u8 = 6;
const SEND_OF: u8 = 7;
const MEMBERS: u8 = 8;
const PRESENCE: u8 = 9;
const DEVICES: u8 = 20;
const DURABLE: u8 = 10;
const SYNC_PAGE: u8 = 11;
const MESSAGES: u8 = 12;
const RECENT_SENDS: u8 = 13;
const FAILED: u8 = 14;
const KEYS_UPLOADED: u8 = 15;
const KEYS: u8 = 16;
const SEND_OF_ANSWER: u8 = 17;
const MEMBERS_ANSWER: u8 = 18;
const PRESENCE_ANSWER: u8 = 19;
const DEVICES_ANSWER: u8 = 21;

/// Starts a frame: room for the length, filled in by `finish`.
fn start(kind: u8) -> Encoder {
    let mut encoder = Encoder::with_capacity(64);
    encoder.u32(0).u8(kind);
    encoder
}

fn finish(encoder: Encoder) -> Vec<u8> {
    let mut bytes = encoder.bytes;
    let len = u32::try_from(bytes.len() - 4).expect("frames are bounded");
    bytes[..4].copy_from_slice(&len.to_le_bytes());
    bytes
}

/// The length of the frame at the front of `buffer`, once its prefix is in.
/// Errors when the prefix announces more than `READ_FRAME_BYTES_MAX`.
pub fn frame_len(buffer: &[u8]) -> Result<Option<usize>, DecodeError> {
    let Some(prefix) = buffer.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes(prefix.try_into().expect("4")) as usize;
    if len == 0 || len > READ_FRAME_BYTES_MAX {
        return Err(DecodeError("frame length out of bounds"));
    }
    Ok(Some(4 + len))
}

impl Request {
    pub fn encode(&self) -> Vec<u8> {
        let encoder = match self {
            Request::Hello { shard, ring } => {
                let mut e = start(HELLO);
                e.u16(*shard).long_str(ring);
                e
            }
            Request::Sync {
                req,
                user,
                device,
                from,
                limit,
                bytes_max,
            } => {
                let mut e = start(SYNC);
                e.u32(*req).str(user).str(device);
                match from {
                    SyncFrom::Cursor => e.u8(0).u64(0),
                    SyncFrom::AfterMessage(id) => e.u8(1).u64(*id),
                    SyncFrom::AfterSeq(seq) => e.u8(2).u64(*seq),
                    SyncFrom::AfterSeqAll(seq) => e.u8(3).u64(*seq),
                };
                e.u16(*limit).u32(*bytes_max);
                e
            }
            Request::History {
                req,
                conversation,
                before,
                limit,
            } => {
                let mut e = start(HISTORY);
                e.u32(*req)
                    .str(conversation)
                    .u64(before.unwrap_or(0))
                    .u16(*limit);
                e
            }
            Request::KeysUpload {
                req,
                user,
                device,
                identity_key,
                signed_prekey,
                signed_prekey_signature,
                one_time_prekeys,
            } => {
                let mut e = start(KEYS_UPLOAD);
                e.u32(*req)
                    .str(user)
                    .str(device)
                    .str(identity_key)
                    .str(signed_prekey)
                    .str(signed_prekey_signature)
                    .u16(one_time_prekeys.len() as u16);
                for key in one_time_prekeys {
                    e.str(key);
                }
                e
            }
            Request::KeysFetch { req, user } => {
                let mut e = start(KEYS_FETCH);
                e.u32(*req).str(user);
                e
            }
            Request::SendOf {
                req,
                user,
                device,
                client_msg_id,
            } => {
                let mut e = start(SEND_OF);
                e.u32(*req).str(user).str(device).str(client_msg_id);
                e
            }
            Request::Recent {
                req,
                user,
                device,
                since_unix_ms,
                limit,
            } => {
                let mut e = start(RECENT);
                e.u32(*req)
                    .str(user)
                    .str(device)
                    .u64(*since_unix_ms)
                    .u16(*limit);
                e
            }
            Request::Members { req, group } => {
                let mut e = start(MEMBERS);
                e.u32(*req).str(group);
                e
            }
            Request::Devices { req, users } => {
                let mut e = start(DEVICES);
                e.u32(*req).u32(users.len() as u32);
                for user in users {
                    e.str(user);
                }
                e
            }
            Request::Presence { req, asker, users } => {
                let mut e = start(PRESENCE);
                e.u32(*req).str(asker).u32(users.len() as u32);
                for user in users {
                    e.str(user);
                }
                e
            }
        };
        finish(encoder)
    }

    /// Decodes one frame body (without the length prefix).
    pub fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        let mut d = Decoder::new(body);
        let request = match d.u8()? {
            HELLO => Request::Hello {
                shard: d.u16()?,
                ring: d.long_str()?.to_owned(),
            },
            SYNC => Request::Sync {
                req: d.u32()?,
                user: d.str()?.to_owned(),
                device: d.str()?.to_owned(),
                from: match (d.u8()?, d.u64()?) {
                    (0, _) => SyncFrom::Cursor,
                    (1, id) => SyncFrom::AfterMessage(id),
                    (2, seq) => SyncFrom::AfterSeq(seq),
                    (3, seq) => SyncFrom::AfterSeqAll(seq),
                    _ => return Err(DecodeError("unknown sync start")),
                },
                limit: d.u16()?,
                bytes_max: d.u32()?,
            },
            HISTORY => Request::History {
                req: d.u32()?,
                conversation: d.str()?.to_owned(),
                before: Some(d.u64()?).filter(|id| *id != 0),
                limit: d.u16()?,
            },
            KEYS_UPLOAD => Request::KeysUpload {
                req: d.u32()?,
                user: d.str()?.to_owned(),
                device: d.str()?.to_owned(),
                identity_key: d.str()?.to_owned(),
                signed_prekey: d.str()?.to_owned(),
                signed_prekey_signature: d.str()?.to_owned(),
                one_time_prekeys: {
                    let count = usize::from(d.u16()?);
                    let mut keys = Vec::with_capacity(count.min(1024));
                    for _ in 0..count {
                        keys.push(d.str()?.to_owned());
                    }
                    keys
                },
            },
            KEYS_FETCH => Request::KeysFetch {
                req: d.u32()?,
                user: d.str()?.to_owned(),
            },
            SEND_OF => Request::SendOf {
                req: d.u32()?,
                user: d.str()?.to_owned(),
                device: d.str()?.to_owned(),
                client_msg_id: d.str()?.to_owned(),
            },
            RECENT => Request::Recent {
                req: d.u32()?,
                user: d.str()?.to_owned(),
                device: d.str()?.to_owned(),
                since_unix_ms: d.u64()?,
                limit: d.u16()?,
            },
            MEMBERS => Request::Members {
                req: d.u32()?,
                group: d.str()?.to_owned(),
            },
            DEVICES => {
                let req = d.u32()?;
                let count = bounded_count(d.u32()?)?;
                let mut users = Vec::with_capacity(count);
                for _ in 0..count {
                    users.push(d.str()?.to_owned());
                }
                Request::Devices { req, users }
            }
            PRESENCE => {
                let req = d.u32()?;
                let asker = d.str()?.to_owned();
                let count = bounded_count(d.u32()?)?;
                let mut users = Vec::with_capacity(count);
                for _ in 0..count {
                    users.push(d.str()?.to_owned());
                }
                Request::Presence { req, asker, users }
            }
            _ => return Err(DecodeError("unknown request kind")),
        };
        d.finish()?;
        Ok(request)
    }
}

impl Response {
    pub fn encode(&self) -> Vec<u8> {
        let encoder = match self {
            Response::Durable { position } => {
                let mut e = start(DURABLE);
                e.u64(*position);
                e
            }
            Response::SyncPage {
                req,
                entries,
                last_seq,
                more,
            } => {
                let mut e = start(SYNC_PAGE);
                e.u32(*req).u32(entries.len() as u32);
                for entry in entries {
                    e.u64(entry.seq).bytes(&entry.record);
                }
                e.u64(*last_seq).u8(u8::from(*more));
                e
            }
            Response::Messages { req, records } => {
                let mut e = start(MESSAGES);
                e.u32(*req).u32(records.len() as u32);
                for record in records {
                    e.bytes(record);
                }
                e
            }
            Response::RecentSends { req, sends } => {
                let mut e = start(RECENT_SENDS);
                e.u32(*req).u32(sends.len() as u32);
                for send in sends {
                    e.str(&send.client_msg_id)
                        .u64(send.message_id)
                        .str(&send.conversation);
                }
                e
            }
            Response::KeysUploaded { req, stored } => {
                let mut e = start(KEYS_UPLOADED);
                e.u32(*req).u32(*stored);
                e
            }
            Response::SendOf { req, message_id } => {
                let mut e = start(SEND_OF_ANSWER);
                e.u32(*req).u64(message_id.unwrap_or(0));
                e
            }
            Response::Keys { req, bundles } => {
                let mut e = start(KEYS);
                e.u32(*req).u32(bundles.len() as u32);
                for (bundle, remaining) in bundles {
                    e.str(&bundle.device)
                        .str(&bundle.identity_key)
                        .str(&bundle.signed_prekey)
                        .str(&bundle.signed_prekey_signature);
                    match &bundle.one_time_prekey {
                        Some(key) => e.u8(1).str(key),
                        None => e.u8(0),
                    };
                    e.u32(*remaining);
                }
                e
            }
            Response::Members { req, members } => {
                let mut e = start(MEMBERS_ANSWER);
                e.u32(*req).u32(members.len() as u32);
                for member in members {
                    e.str(member);
                }
                e
            }
            Response::Devices { req, devices } => {
                let mut e = start(DEVICES_ANSWER);
                e.u32(*req).u32(devices.len() as u32);
                for (user, device) in devices {
                    e.str(user).str(device);
                }
                e
            }
            Response::Presence { req, users } => {
                let mut e = start(PRESENCE_ANSWER);
                e.u32(*req).u32(users.len() as u32);
                for user in users {
                    e.str(&user.user)
                        .u8(u8::from(user.shared))
                        .u8(u8::from(user.online))
                        .u64(user.updated_ms)
                        .u64(user.last_seen_ms.unwrap_or(0));
                }
                e
            }
            Response::Failed {
                req,
                reason,
                retryable,
            } => {
                let mut e = start(FAILED);
                e.u32(*req).long_str(reason).u8(u8::from(*retryable));
                e
            }
        };
        finish(encoder)
    }

    pub fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        let mut d = Decoder::new(body);
        let response = match d.u8()? {
            DURABLE => Response::Durable { position: d.u64()? },
            SYNC_PAGE => {
                let req = d.u32()?;
                let count = bounded_count(d.u32()?)?;
                let mut entries = Vec::with_capacity(count);
                for _ in 0..count {
                    entries.push(SyncEntry {
                        seq: d.u64()?,
                        record: d.bytes()?.to_vec(),
                    });
                }
                Response::SyncPage {
                    req,
                    entries,
                    last_seq: d.u64()?,
                    more: d.u8()? != 0,
                }
            }
            MESSAGES => {
                let req = d.u32()?;
                let count = bounded_count(d.u32()?)?;
                let mut records = Vec::with_capacity(count);
                for _ in 0..count {
                    records.push(d.bytes()?.to_vec());
                }
                Response::Messages { req, records }
            }
            RECENT_SENDS => {
                let req = d.u32()?;
                let count = bounded_count(d.u32()?)?;
                let mut sends = Vec::with_capacity(count);
                for _ in 0..count {
                    sends.push(RecentSend {
                        client_msg_id: d.str()?.to_owned(),
                        message_id: d.u64()?,
                        conversation: d.str()?.to_owned(),
                    });
                }
                Response::RecentSends { req, sends }
            }
            KEYS_UPLOADED => Response::KeysUploaded {
                req: d.u32()?,
                stored: d.u32()?,
            },
            SEND_OF_ANSWER => Response::SendOf {
                req: d.u32()?,
                message_id: Some(d.u64()?).filter(|id| *id != 0),
            },
            KEYS => {
                let req = d.u32()?;
                let count = bounded_count(d.u32()?)?;
                let mut bundles = Vec::with_capacity(count);
                for _ in 0..count {
                    let bundle = Bundle {
                        device: d.str()?.to_owned(),
                        identity_key: d.str()?.to_owned(),
                        signed_prekey: d.str()?.to_owned(),
                        signed_prekey_signature: d.str()?.to_owned(),
                        one_time_prekey: match d.u8()? {
                            0 => None,
                            _ => Some(d.str()?.to_owned()),
                        },
                    };
                    bundles.push((bundle, d.u32()?));
                }
                Response::Keys { req, bundles }
            }
            MEMBERS_ANSWER => {
                let req = d.u32()?;
                let count = bounded_count(d.u32()?)?;
                let mut members = Vec::with_capacity(count);
                for _ in 0..count {
                    members.push(d.str()?.to_owned());
                }
                Response::Members { req, members }
            }
            DEVICES_ANSWER => {
                let req = d.u32()?;
                let count = bounded_count(d.u32()?)?;
                let mut devices = Vec::with_capacity(count);
                for _ in 0..count {
                    devices.push((d.str()?.to_owned(), d.str()?.to_owned()));
                }
                Response::Devices { req, devices }
            }
            PRESENCE_ANSWER => {
                let req = d.u32()?;
                let count = bounded_count(d.u32()?)?;
                let mut users = Vec::with_capacity(count);
                for _ in 0..count {
                    users.push(PresenceAnswer {
                        user: d.str()?.to_owned(),
                        shared: d.u8()? != 0,
                        online: d.u8()? != 0,
                        updated_ms: d.u64()?,
                        last_seen_ms: Some(d.u64()?).filter(|ms| *ms != 0),
                    });
                }
                Response::Presence { req, users }
            }
            FAILED => Response::Failed {
                req: d.u32()?,
                reason: d.long_str()?.to_owned(),
                retryable: d.u8()? != 0,
            },
            _ => return Err(DecodeError("unknown response kind")),
        };
        d.finish()?;
        Ok(response)
    }
}

/// A count read from the wire, before anything is allocated for it.
fn bounded_count(count: u32) -> Result<usize, DecodeError> {
    if count as usize > u16::MAX as usize {
        return Err(DecodeError("count out of bounds"));
    }
    Ok(count as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip_request(request: Request) {
        let bytes = request.encode();
        assert_eq!(frame_len(&bytes), Ok(Some(bytes.len())));
        assert_eq!(Request::decode(&bytes[4..]), Ok(request));
    }

    fn round_trip_response(response: Response) {
        let bytes = response.encode();
        assert_eq!(frame_len(&bytes), Ok(Some(bytes.len())));
        assert_eq!(Response::decode(&bytes[4..]), Ok(response));
    }

    #[test]
    fn every_frame_round_trips() {
        round_trip_request(Request::Hello {
            shard: 3,
            ring: "/run/chat/shard-3.ring".into(),
        });
        for from in [
            SyncFrom::Cursor,
            SyncFrom::AfterMessage(5),
            SyncFrom::AfterSeq(9),
            SyncFrom::AfterSeqAll(11),
        ] {
            round_trip_request(Request::Sync {
                req: 1,
                user: "bob".into(),
                device: "phone".into(),
                from,
                limit: 100,
                bytes_max: 1 << 20,
            });
        }
        round_trip_request(Request::History {
            req: 2,
            conversation: "dm:a:b".into(),
            before: Some(77),
            limit: 50,
        });
        round_trip_request(Request::History {
            req: 2,
            conversation: "dm:a:b".into(),
            before: None,
            limit: 50,
        });
        round_trip_request(Request::Recent {
            req: 3,
            user: "a".into(),
            device: "d".into(),
            since_unix_ms: 12,
            limit: 256,
        });
        round_trip_request(Request::KeysUpload {
            req: 5,
            user: "bob".into(),
            device: "phone".into(),
            identity_key: "aWs=".into(),
            signed_prekey: "c3Br".into(),
            signed_prekey_signature: "c2ln".into(),
            one_time_prekeys: vec!["b3Rw".into(), "b3Rx".into()],
        });
        round_trip_request(Request::KeysFetch {
            req: 6,
            user: "bob".into(),
        });
        round_trip_response(Response::KeysUploaded { req: 5, stored: 12 });
        round_trip_request(Request::SendOf {
            req: 7,
            user: "a".into(),
            device: "d".into(),
            client_msg_id: "c1".into(),
        });
        round_trip_response(Response::SendOf {
            req: 7,
            message_id: Some(9),
        });
        round_trip_response(Response::SendOf {
            req: 7,
            message_id: None,
        });
        round_trip_response(Response::Keys {
            req: 6,
            bundles: vec![(
                Bundle {
                    device: "phone".into(),
                    identity_key: "aWs=".into(),
                    signed_prekey: "c3Br".into(),
                    signed_prekey_signature: "c2ln".into(),
                    one_time_prekey: None,
                },
                0,
            )],
        });
        round_trip_request(Request::Members {
            req: 11,
            group: "g1".into(),
        });
        round_trip_response(Response::Members {
            req: 11,
            members: vec!["alice".into(), "bob".into()],
        });
        round_trip_request(Request::Devices {
            req: 13,
            users: vec!["bob".into(), "alice".into()],
        });
        round_trip_response(Response::Devices {
            req: 13,
            devices: vec![
                ("bob".into(), "phone".into()),
                ("alice".into(), "laptop".into()),
            ],
        });
        round_trip_request(Request::Presence {
            req: 12,
            asker: "alice".into(),
            users: vec!["bob".into(), "carol".into()],
        });
        round_trip_response(Response::Presence {
            req: 12,
            users: vec![
                PresenceAnswer {
                    user: "bob".into(),
                    shared: true,
                    online: false,
                    updated_ms: 5,
                    last_seen_ms: Some(4),
                },
                PresenceAnswer {
                    user: "carol".into(),
                    shared: false,
                    online: false,
                    updated_ms: 0,
                    last_seen_ms: None,
                },
            ],
        });
        round_trip_response(Response::Durable { position: 4096 });
        round_trip_response(Response::SyncPage {
            req: 1,
            entries: vec![SyncEntry {
                seq: 4,
                record: vec![1, 2, 3],
            }],
            last_seq: 4,
            more: true,
        });
        round_trip_response(Response::Messages {
            req: 2,
            records: vec![vec![9], vec![]],
        });
        round_trip_response(Response::RecentSends {
            req: 3,
            sends: vec![RecentSend {
                client_msg_id: "c1".into(),
                message_id: 8,
                conversation: "dm:a:b".into(),
            }],
        });
        round_trip_response(Response::Failed {
            req: 4,
            reason: "store unavailable".into(),
            retryable: true,
        });
    }

    #[test]
    fn bad_lengths_and_kinds_are_refused() {
        assert!(frame_len(&[0, 0, 0, 0]).is_err());
        assert!(frame_len(&u32::MAX.to_le_bytes()).is_err());
        assert_eq!(frame_len(&[1, 0]), Ok(None));
        assert!(Request::decode(&[99]).is_err());
        assert!(Response::decode(&[DURABLE, 1, 2]).is_err());
    }
}
