//! The server frames of groups, receipts and presence.
//!
//! Owns their JSON shapes (documented in `docs/protocol.md`); the client
//! frames that ask for them are decoded in `frames`. Never decides who may
//! see what: the gateway checks membership before it encodes any of these.

use serde::Serialize;

use crate::frames::IdText;
use crate::records::Receipt;

/// `sent` for a group change: as a send's, plus the group (the only way a
/// creator learns the id of the group it created).
#[derive(Serialize)]
struct GroupSentFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    id: &'a str,
    message_id: IdText,
    conversation: &'a str,
    group: &'a str,
    ts: u64,
}

pub fn encode_group_sent(
    client_msg_id: &str,
    message_id: u64,
    conversation: &str,
    group: &str,
    ts: u64,
) -> Vec<u8> {
    to_json(&GroupSentFrame {
        kind: "sent",
        id: client_msg_id,
        message_id: IdText(message_id),
        conversation,
        group,
        ts,
    })
}

/// `{"type":"group_members","group":...,"members":[...]}`
#[derive(Serialize)]
struct GroupMembersFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    group: &'a str,
    members: &'a [&'a str],
}

pub fn encode_group_members(group: &str, members: &[&str]) -> Vec<u8> {
    to_json(&GroupMembersFrame {
        kind: "group_members",
        group,
        members,
    })
}

#[derive(Serialize)]
struct ReceiptJson<'a> {
    user: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    device: &'a str,
    status: &'static str,
    up_to: IdText,
}

/// `{"type":"receipts","message_id":...,"conversation":...,"receipts":[...]}`:
/// a batch for one conversation. Acknowledged like a message (by `message_id`).
#[derive(Serialize)]
struct ReceiptsFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    message_id: IdText,
    conversation: &'a str,
    receipts: Vec<ReceiptJson<'a>>,
    ts: u64,
}

pub fn encode_receipts(
    message_id: u64,
    conversation: &str,
    receipts: &[Receipt<'_>],
    ts: u64,
) -> Vec<u8> {
    to_json(&ReceiptsFrame {
        kind: "receipts",
        message_id: IdText(message_id),
        conversation,
        receipts: receipts
            .iter()
            .map(|r| ReceiptJson {
                user: r.user,
                device: r.device,
                status: r.status.as_str(),
                up_to: IdText(r.up_to),
            })
            .collect(),
        ts,
    })
}

#[derive(Serialize)]
struct DeviceJson<'a> {
    user: &'a str,
    device: &'a str,
}

#[derive(Serialize)]
struct MissingDevicesFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    id: &'a str,
    code: &'static str,
    message: &'a str,
    devices: Vec<DeviceJson<'a>>,
}

/// The `error` refusing a per-device send that left out `devices`
/// ((user, device) pairs): fetch their keys and send again.
pub fn encode_missing_devices(client_msg_id: &str, devices: &[(String, String)]) -> Vec<u8> {
    to_json(&MissingDevicesFrame {
        kind: "error",
        id: client_msg_id,
        code: crate::codes::ErrorCode::MissingDevices.as_str(),
        message: "`bodies` must have a ciphertext for every listed device; fetch their keys",
        devices: devices
            .iter()
            .map(|(user, device)| DeviceJson { user, device })
            .collect(),
    })
}

/// One user's presence as the asker may see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PresenceJson<'a> {
    pub user: &'a str,
    pub online: bool,
    /// Unix milliseconds; absent when the user was never seen.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<u64>,
}

#[derive(Serialize)]
struct PresenceFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    users: &'a [PresenceJson<'a>],
}

pub fn encode_presence(users: &[PresenceJson<'_>]) -> Vec<u8> {
    to_json(&PresenceFrame {
        kind: "presence",
        users,
    })
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("server frames always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::ReceiptStatus;

    #[test]
    fn frames_have_their_documented_shapes() {
        let json = encode_group_sent("c1", 5, "grp:g5", "g5", 9);
        assert_eq!(
            std::str::from_utf8(&json).unwrap(),
            r#"{"type":"sent","id":"c1","message_id":"5","conversation":"grp:g5","group":"g5","ts":9}"#
        );
        let json = encode_receipts(
            7,
            "dm:alice:bob",
            &[Receipt {
                user: "bob",
                device: "",
                status: ReceiptStatus::Read,
                up_to: 3,
            }],
            9,
        );
        assert_eq!(
            std::str::from_utf8(&json).unwrap(),
            r#"{"type":"receipts","message_id":"7","conversation":"dm:alice:bob","receipts":[{"user":"bob","status":"read","up_to":"3"}],"ts":9}"#
        );
        let json = encode_presence(&[
            PresenceJson {
                user: "bob",
                online: true,
                last_seen: None,
            },
            PresenceJson {
                user: "carol",
                online: false,
                last_seen: Some(100),
            },
        ]);
        assert_eq!(
            std::str::from_utf8(&json).unwrap(),
            r#"{"type":"presence","users":[{"user":"bob","online":true},{"user":"carol","online":false,"last_seen":100}]}"#
        );
        let json = encode_group_members("g1", &["alice", "bob"]);
        assert_eq!(
            std::str::from_utf8(&json).unwrap(),
            r#"{"type":"group_members","group":"g1","members":["alice","bob"]}"#
        );
    }
}
