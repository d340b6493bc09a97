//! The read-path protocol between a gateway shard and the storage-writer, over a Unix socket.
//!
//! Owns the frames both processes exchange: the shard's `Hello` (which ring
//! it writes), its read requests (sync pages, history, recent sends for
//! idempotency), and the writer's answers plus `Durable` notices (the ring
//! position up to which records are committed, which releases `sent`).
//! Every frame is `[len u32 LE][body]`, bounded by `READ_FRAME_BYTES_MAX`; the
//! body is the `postcard` encoding of a `Request` or a `Response`, so each
//! message's fields are written once, in its type (the ring's records, the
//! stored format, stay hand-laid in `records`). Both ends are one build;
//! `Hello` carries `READ_PATH_VERSION` and stays the first variant with the
//! version its first field, so a mismatch is named rather than misread.
//! Never carries JSON: the gateway turns stored records into client frames.

use serde::{Deserialize, Serialize};

use crate::binary::DecodeError;
use crate::keys::Bundle;

pub use crate::limits::{READ_FRAME_BYTES_MAX, READ_USERS_MAX};

/// The read path's version. 2: postcard bodies (1 was a hand-laid layout).
pub const READ_PATH_VERSION: u16 = 9;

/// Where a sync page starts in a user's inbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncFrom {
    /// After everything this device acknowledged.
    Cursor,
    /// After the inbox entry of this message id (the client's `after`).
    AfterMessage(u64),
    /// After this inbox sequence number, skipping what the device
    /// acknowledged (the next page of a `Cursor` sync).
    AfterSeq(u64),
    /// After this inbox sequence number, acknowledged or not (the next page
    /// of an `AfterMessage` or `MadeSince` sync).
    AfterSeqAll(u64),
    /// Every message with an id of at least this one (made at or after its
    /// time), acknowledged or not: a resync after the backplane may have
    /// lost messages that the device's cumulative acks then covered.
    MadeSince(u64),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// First on every connection: which shard this is and which ring it
    /// writes. Must stay the first variant, `version` its first field.
    Hello {
        version: u16,
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
        /// Who reads: a name signed in again after its account was deleted
        /// reads nothing the deleted account could.
        asker: String,
        conversation: String,
        /// Only messages with a smaller id; `None` for the newest.
        before: Option<u64>,
        /// Only messages with this id or a larger one (a group member's
        /// history starts where they joined); `None` for no bound.
        since: Option<u64>,
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
    KeysFetch { req: u32, user: String },
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
    /// The current members of a group with their roles.
    MemberRoles { req: u32, group: String },
    /// The devices of each of `users` in the key directory.
    Devices { req: u32, users: Vec<String> },
    /// Presence of `users` as `asker` may see it: only users it shares a
    /// conversation with (a direct message either way, or a group).
    Presence {
        req: u32,
        asker: String,
        users: Vec<String>,
    },
    /// Revoke `user`'s `device` (every device when `None`) as of
    /// `at_unix_ms`: tokens issued earlier are refused from now on, and the
    /// revoked devices' keys leave the key directory. Durable before the
    /// answer.
    Revoke {
        req: u32,
        user: String,
        device: Option<String>,
        at_unix_ms: u64,
    },
    /// When `user`'s `device` was last revoked (itself or all the user's).
    RevokedAt {
        req: u32,
        user: String,
        device: String,
    },
    /// Set (or with `None`, remove) the device's push target: a
    /// `push::PushTarget` in its stored form. Durable before the answer.
    PutPushTarget {
        req: u32,
        user: String,
        device: String,
        #[serde(with = "serde_bytes")]
        target: Option<Vec<u8>>,
    },
    /// Delete `user`'s account: their devices are revoked as of
    /// `at_unix_ms` (kept, so older tokens stay refused), then, once every
    /// record already in the rings is committed, every other row of theirs
    /// goes. The caller closes their connections between the two. Durable
    /// before the answer; asking again removes nothing more.
    DeleteAccount {
        req: u32,
        user: String,
        at_unix_ms: u64,
    },
    /// `user`'s `device` connected or left at `at_unix_ms`: its per-device
    /// rows stay until it is not seen for the writer's device retention.
    /// Not made durable on its own (the next commit carries it): a time
    /// lost in a crash only makes the device look older by one connection.
    DeviceSeen {
        req: u32,
        user: String,
        device: String,
        at_unix_ms: u64,
    },
    /// The groups `user` is a member of, sorted, at most
    /// `MEMBERSHIP_READ_MAX` of the storage-writer's (a page).
    GroupsOf { req: u32, user: String },
}

/// What storage knows of one user's presence, for one asker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

/// A group member's role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRole {
    pub user: String,
    /// May add, remove and promote members.
    pub admin: bool,
    /// The id of the change that added them (their history starts there);
    /// 0 for members from before roles were recorded.
    pub joined_id: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncEntry {
    /// Position in the user's inbox.
    pub seq: u64,
    /// The stored `Message` record.
    #[serde(with = "serde_bytes")]
    pub record: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecentSend {
    pub client_msg_id: String,
    pub message_id: u64,
    pub conversation: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
        /// Entries the page passed over that the device had not
        /// acknowledged and retention removed: missed for good.
        expired: u64,
    },
    /// Stored `Message` records, newest first.
    Messages {
        req: u32,
        #[serde(with = "byte_strings")]
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
    /// A group's members with their roles, sorted by user, and whether
    /// only its admins post.
    MemberRoles {
        req: u32,
        members: Vec<MemberRole>,
        admins_only: bool,
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
    /// The revocation is stored; `keys_removed` devices left the key directory.
    Revoked {
        req: u32,
        keys_removed: u32,
    },
    /// The answer to `RevokedAt`: `None` when never revoked.
    RevokedAt {
        req: u32,
        at_unix_ms: Option<u64>,
    },
    /// The push target is stored (or removed).
    PushTargetStored {
        req: u32,
    },
    /// The read was not answered. `retryable`: storage is behind or failing
    /// (try again later); otherwise the request itself is wrong.
    Failed {
        req: u32,
        reason: String,
        retryable: bool,
    },
    /// A notice, like `Durable`: the writer's last commit failed and it is
    /// retrying (a full disk, a database away). Repeated while it fails; the
    /// next `Durable` says commits go through again.
    Stalled {
        reason: String,
    },
    /// A notice, sent before the `Durable` that covers the record: the
    /// message `message_id` of this shard's ring was not stored (a group
    /// change that would take its group past the bound, checked by the
    /// writer against every writer's changes). Its sender is told, and it
    /// is delivered to no one.
    Refused {
        message_id: u64,
        reason: String,
    },
    /// The account is deleted: `rows` rows went, and the user left `groups`.
    AccountDeleted {
        req: u32,
        rows: u64,
        groups: Vec<String>,
    },
    /// The answer to `DeviceSeen`.
    DeviceSeenStored {
        req: u32,
    },
    /// The answer to `GroupsOf`.
    Groups {
        req: u32,
        groups: Vec<String>,
    },
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

/// `[len][postcard body]`.
fn encode_frame(message: &impl Serialize) -> Vec<u8> {
    let mut frame =
        postcard::to_extend(message, vec![0u8; 4]).expect("read-path messages always serialise");
    let len = u32::try_from(frame.len() - 4).expect("frames are bounded");
    assert!(
        len as usize <= READ_FRAME_BYTES_MAX,
        "a read-path frame over its bound"
    );
    frame[..4].copy_from_slice(&len.to_le_bytes());
    frame
}

/// A frame's body, all of it (trailing bytes are refused).
fn decode_body<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, DecodeError> {
    match postcard::take_from_bytes(body) {
        Ok((message, [])) => Ok(message),
        Ok(_) => Err(DecodeError("trailing bytes after a read-path frame")),
        Err(_) => Err(DecodeError("malformed read-path frame")),
    }
}

impl Request {
    pub fn encode(&self) -> Vec<u8> {
        encode_frame(self)
    }

    /// Decodes a frame's body (after the length prefix). A `Hello` of
    /// another read-path version is refused by name.
    pub fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        let request: Request = decode_body(body).map_err(|error| match hello_version(body) {
            Some(version) if version != READ_PATH_VERSION => {
                DecodeError("the gateway speaks another read-path version (upgrade both together)")
            }
            _ => error,
        })?;
        if let Request::Hello { version, .. } = request {
            if version != READ_PATH_VERSION {
                return Err(DecodeError(
                    "the gateway speaks another read-path version (upgrade both together)",
                ));
            }
        }
        Ok(request)
    }
}

/// The version of a `Hello` body, read from its fixed prefix (variant 0,
/// then the version), whatever follows.
fn hello_version(body: &[u8]) -> Option<u16> {
    match postcard::take_from_bytes::<(u8, u16)>(body) {
        Ok(((0, version), _)) => Some(version),
        _ => None,
    }
}

impl Response {
    pub fn encode(&self) -> Vec<u8> {
        encode_frame(self)
    }

    /// Decodes a frame's body (after the length prefix).
    pub fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        decode_body(body)
    }
}

/// Many byte strings as one sequence of bytes fields (not of integers).
mod byte_strings {
    use serde::{Deserialize, Deserializer, Serializer};
    use serde_bytes::{ByteBuf, Bytes};

    pub fn serialize<S: Serializer>(values: &[Vec<u8>], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(values.iter().map(|value| Bytes::new(value)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<Vec<u8>>, D::Error> {
        let values = Vec::<ByteBuf>::deserialize(deserializer)?;
        Ok(values.into_iter().map(ByteBuf::into_vec).collect())
    }
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
            version: READ_PATH_VERSION,
            shard: 3,
            ring: "/run/chat/shard-3.ring".into(),
        });
        for from in [
            SyncFrom::Cursor,
            SyncFrom::AfterMessage(5),
            SyncFrom::AfterSeq(9),
            SyncFrom::AfterSeqAll(11),
            SyncFrom::MadeSince(13),
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
            asker: "a".into(),
            conversation: "dm:a:b".into(),
            before: Some(77),
            since: Some(12),
            limit: 50,
        });
        round_trip_request(Request::History {
            req: 2,
            asker: "b".into(),
            conversation: "dm:a:b".into(),
            before: None,
            since: None,
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
        round_trip_request(Request::MemberRoles {
            req: 9,
            group: "g1".into(),
        });
        round_trip_request(Request::GroupsOf {
            req: 10,
            user: "alice".into(),
        });
        round_trip_response(Response::Groups {
            req: 10,
            groups: vec!["g1".into(), "g2".into()],
        });
        round_trip_response(Response::MemberRoles {
            req: 9,
            members: vec![MemberRole {
                user: "alice".into(),
                admin: true,
                joined_id: 12,
            }],
            admins_only: true,
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
        round_trip_request(Request::Revoke {
            req: 14,
            user: "alice".into(),
            device: Some("phone".into()),
            at_unix_ms: 1_800_000_000_000,
        });
        round_trip_request(Request::Revoke {
            req: 15,
            user: "alice".into(),
            device: None,
            at_unix_ms: 1,
        });
        round_trip_request(Request::PutPushTarget {
            req: 12,
            user: "alice".into(),
            device: "phone".into(),
            target: Some(br#"{"kind":"fcm","token":"t"}"#.to_vec()),
        });
        round_trip_request(Request::PutPushTarget {
            req: 13,
            user: "alice".into(),
            device: "phone".into(),
            target: None,
        });
        round_trip_response(Response::PushTargetStored { req: 13 });
        round_trip_request(Request::RevokedAt {
            req: 16,
            user: "alice".into(),
            device: "phone".into(),
        });
        round_trip_response(Response::Revoked {
            req: 14,
            keys_removed: 2,
        });
        round_trip_response(Response::RevokedAt {
            req: 16,
            at_unix_ms: Some(7),
        });
        round_trip_request(Request::DeleteAccount {
            req: 17,
            user: "alice".into(),
            at_unix_ms: 1_800_000_000_000,
        });
        round_trip_response(Response::AccountDeleted {
            req: 17,
            rows: 42,
            groups: vec!["g1".into(), "g2".into()],
        });
        round_trip_request(Request::DeviceSeen {
            req: 18,
            user: "alice".into(),
            device: "phone".into(),
            at_unix_ms: 1_800_000_000_000,
        });
        round_trip_response(Response::DeviceSeenStored { req: 18 });
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
            expired: 3,
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
        round_trip_response(Response::Stalled {
            reason: "No space left on device (os error 28)".into(),
        });
        round_trip_response(Response::Refused {
            message_id: 1 << 40,
            reason: "a group has at most 1024 members".into(),
        });
    }

    #[test]
    fn bad_lengths_and_kinds_are_refused() {
        assert!(frame_len(&[0, 0, 0, 0]).is_err());
        assert!(frame_len(&u32::MAX.to_le_bytes()).is_err());
        assert_eq!(frame_len(&[1, 0]), Ok(None));
        assert!(Request::decode(&[99]).is_err());
        let durable = Response::Durable { position: 1 << 40 }.encode();
        assert!(
            Response::decode(&durable[4..durable.len() - 1]).is_err(),
            "truncated"
        );
        let mut longer = durable[4..].to_vec();
        longer.push(0);
        assert!(Response::decode(&longer).is_err(), "trailing bytes");
    }

    #[test]
    fn a_hello_of_another_version_is_refused_by_name() {
        let hello = Request::Hello {
            version: READ_PATH_VERSION + 1,
            shard: 0,
            ring: "/run/chat/shard-0.ring".into(),
        }
        .encode();
        let error = Request::decode(&hello[4..]).unwrap_err();
        assert!(error.0.contains("read-path version"), "{error:?}");
    }

    #[test]
    fn a_sync_page_carries_its_records_as_bytes() {
        let record = vec![7u8; 1000];
        let page = Response::SyncPage {
            req: 1,
            entries: vec![SyncEntry {
                seq: 1,
                record: record.clone(),
            }],
            last_seq: 1,
            more: false,
            expired: 0,
        }
        .encode();
        // A bytes field: the record, its length and a few bytes of framing,
        // not one integer per byte.
        assert!(page.len() < record.len() + 32, "{} bytes", page.len());
    }
}
