//! The JSON frames of protocol v1: decoding what clients send, encoding what the server sends.
//!
//! Owns the frame shapes, field rules and the choice of error code for bad input.
//! Decoding borrows from the input where it can (no allocation for a body with
//! no escapes). Never decides routing: that is the gateway's shard.

use std::borrow::Cow;

use serde::{Deserialize, Serialize, Serializer};

use crate::codes::ErrorCode;
use crate::ids::{self, is_valid_id};
use crate::keys::KeysUpload;
pub use crate::media::Media;
use crate::records::GroupAction;

/// A frame a client sent, validated.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientFrame<'a> {
    Send(SendFrame<'a>),
    Ping,
    /// `{"type":"keys_upload",...}`: this device's public keys.
    KeysUpload(KeysUpload<'a>),
    /// `{"type":"devices","user":"<user>"}`: the user's devices in the key
    /// directory (no prekey is taken).
    Devices {
        user: Cow<'a, str>,
    },
    /// `{"type":"keys_fetch","user":"<user>"}`: a bundle per device of `user`.
    KeysFetch {
        user: Cow<'a, str>,
    },
    /// `{"type":"typing","to":"<user>"}` or `"group":"<group>"`: ephemeral, never stored.
    Typing {
        to: Cow<'a, str>,
        group: bool,
    },
    /// `group_create`, `group_add`, `group_remove`, `group_leave`: a
    /// membership change, itself a message in the group.
    GroupChange(GroupChangeFrame<'a>),
    /// `{"type":"group_members","group":"<group>"}`.
    GroupMembers {
        group: Cow<'a, str>,
    },
    /// `{"type":"read","conversation":...,"up_to":"<message_id>"}` (and
    /// `"from"`, the sender, in a group): tells the sender it was read.
    Read(ReceiptFrame<'a>),
    /// `{"type":"presence","users":[...]}`: online or last seen, for users
    /// the asker shares a conversation with.
    Presence {
        users: Vec<Cow<'a, str>>,
    },
    /// `{"type":"sync"}` or `{"type":"sync","after":"<message_id>"}`.
    Sync {
        after: Option<u64>,
    },
    /// `{"type":"ack","message_id":"<id>"}`: this device has the message.
    /// With `conversation` and `from` (both copied from the message), its
    /// sender is told it was delivered.
    Ack {
        message_id: u64,
        receipt: Option<ReceiptFrame<'a>>,
    },
    /// `{"type":"history","conversation":...,"before":...,"limit":n}`.
    History {
        conversation: Cow<'a, str>,
        before: Option<u64>,
        limit: u16,
    },
    /// `{"type":"push_register","id":...,"push":{"kind":...}}`: wake this
    /// device through `target` while it is not connected (replacing any
    /// earlier target). The shape is checked; `problem` is the node's policy.
    PushRegister {
        client_id: Cow<'a, str>,
        target: crate::push::PushTarget,
    },
    /// `{"type":"push_unregister","id":...}`: no more pushes to this device.
    PushUnregister {
        client_id: Cow<'a, str>,
    },
    /// `{"type":"delete_account","user":"<own user id>"}`, with an optional
    /// `id` that the answer repeats: delete the asker's account (the user
    /// id is the confirmation; the gateway checks that it is the asker's).
    DeleteAccount {
        client_id: Option<Cow<'a, str>>,
        user: Cow<'a, str>,
    },
}

/// Whom a receipt is about: the sender `from` of messages of `conversation`
/// up to `up_to`. In a direct conversation `from` is the other user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptFrame<'a> {
    pub conversation: Cow<'a, str>,
    pub up_to: u64,
    pub from: Option<Cow<'a, str>>,
}

/// A group membership change asked for by a client.
#[derive(Debug, PartialEq, Eq)]
pub struct GroupChangeFrame<'a> {
    /// The client's id for this change (idempotency key, like a send's).
    pub client_msg_id: Cow<'a, str>,
    /// `None` for `group_create` (the server names the group).
    pub group: Option<Cow<'a, str>>,
    pub action: GroupAction,
    /// Who joins or leaves (empty for `group_leave`: the asker leaves).
    pub members: Vec<Cow<'a, str>>,
}

pub use crate::limits::{
    BODIES_DEVICES_MAX, GROUP_CHANGE_MEMBERS_MAX, HISTORY_LIMIT_DEFAULT, HISTORY_LIMIT_MAX,
    PRESENCE_QUERY_USERS_MAX,
};

/// `{"type":"send","id":...,"to":...,"body":...}`
#[derive(Debug, PartialEq, Eq)]
pub struct SendFrame<'a> {
    /// The client's message id (idempotency key), valid id grammar.
    pub client_msg_id: Cow<'a, str>,
    /// Recipient user id, or group id when `group`; valid id grammar.
    pub to: Cow<'a, str>,
    /// `to` names a group (the frame said `"group"` instead of `"to"`).
    pub group: bool,
    /// Opaque to the server (clients put ciphertext here). Empty when `bodies` is given.
    pub body: Cow<'a, str>,
    /// One ciphertext per device instead of `body`: each device gets only
    /// its own. A key is a recipient's device id, or `<user>/<device>` for
    /// any device (the sender's own other devices). Direct messages only.
    pub bodies: Vec<(Cow<'a, str>, Cow<'a, str>)>,
    /// An attachment stored elsewhere, by reference (its key is in the body).
    pub media: Option<Media<'a>>,
    /// Delete for everyone: the id of this user's message of the same
    /// conversation to withdraw (no body then).
    pub delete: Option<u64>,
}

impl SendFrame<'_> {
    /// The same send with every field owned, for a task that outlives the
    /// input buffer (a send that waits for storage).
    pub fn into_owned(self) -> SendFrame<'static> {
        SendFrame {
            client_msg_id: Cow::Owned(self.client_msg_id.into_owned()),
            to: Cow::Owned(self.to.into_owned()),
            group: self.group,
            body: Cow::Owned(self.body.into_owned()),
            bodies: self
                .bodies
                .into_iter()
                .map(|(device, body)| {
                    (
                        Cow::Owned(device.into_owned()),
                        Cow::Owned(body.into_owned()),
                    )
                })
                .collect(),
            media: self.media.map(Media::into_owned),
            delete: self.delete,
        }
    }
}

impl GroupChangeFrame<'_> {
    /// The same change with every field owned (it waits for storage).
    pub fn into_owned(self) -> GroupChangeFrame<'static> {
        GroupChangeFrame {
            client_msg_id: Cow::Owned(self.client_msg_id.into_owned()),
            group: self.group.map(|group| Cow::Owned(group.into_owned())),
            action: self.action,
            members: self
                .members
                .into_iter()
                .map(|member| Cow::Owned(member.into_owned()))
                .collect(),
        }
    }
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
    #[serde(default, borrow, deserialize_with = "string_field")]
    after: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "string_field")]
    message_id: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "string_field")]
    conversation: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "string_field")]
    before: Option<Cow<'a, str>>,
    #[serde(default)]
    limit: Option<u64>,
    #[serde(default, borrow)]
    media: Option<Media<'a>>,
    #[serde(default, borrow, deserialize_with = "string_field")]
    user: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "string_field")]
    identity_key: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "string_field")]
    signed_prekey: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "string_field")]
    signed_prekey_signature: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    one_time_prekeys: Option<Vec<Cow<'a, str>>>,
    #[serde(default, borrow, deserialize_with = "string_field")]
    group: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    members: Option<Vec<Cow<'a, str>>>,
    #[serde(default, borrow)]
    users: Option<Vec<Cow<'a, str>>>,
    #[serde(default, borrow, deserialize_with = "string_field")]
    up_to: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "string_field")]
    from: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    bodies: Option<std::collections::BTreeMap<Cow<'a, str>, Cow<'a, str>>>,
    /// `push_register`'s target, checked in `decode_push_register`.
    #[serde(default)]
    push: Option<serde_json::Value>,
    /// `send`'s message to delete for everyone.
    #[serde(default, borrow, deserialize_with = "string_field")]
    delete: Option<Cow<'a, str>>,
}

/// Exactly one of `to` (a user) and `group`: the target and whether it is a group.
fn target<'a>(
    to: Option<Cow<'a, str>>,
    group: Option<Cow<'a, str>>,
) -> Result<(Cow<'a, str>, bool), String> {
    match (to, group) {
        (Some(to), None) if is_valid_id(&to) => Ok((to, false)),
        (None, Some(group)) if is_valid_id(&group) => Ok((group, true)),
        (Some(_), Some(_)) => Err("give `to` or `group`, not both".into()),
        (Some(_), None) => Err("`to` must be a user id".into()),
        (None, Some(_)) => Err("`group` must be a group id".into()),
        (None, None) => Err("`to` (a user) or `group` is required".into()),
    }
}

/// A list of ids: present, 1..=`max` long (0 allowed when `empty_ok`), each valid.
fn id_list<'a>(
    list: Option<Vec<Cow<'a, str>>>,
    field: &str,
    max: usize,
    empty_ok: bool,
) -> Result<Vec<Cow<'a, str>>, String> {
    let list = list.unwrap_or_default();
    let min = usize::from(!empty_ok);
    if list.len() < min || list.len() > max {
        return Err(format!("`{field}` must list {min}-{max} ids"));
    }
    if let Some(bad) = list.iter().find(|id| !is_valid_id(id)) {
        return Err(format!("`{field}` has an invalid id `{}`", truncate(bad)));
    }
    Ok(list)
}

/// The receipt fields of `ack` and `read`: a conversation the sender of
/// `up_to` can be told about (`from` is required in a group).
fn receipt_fields<'a>(
    conversation: Cow<'a, str>,
    up_to: u64,
    from: Option<Cow<'a, str>>,
) -> Result<ReceiptFrame<'a>, String> {
    if let Some(from) = &from {
        if !is_valid_id(from) {
            return Err("`from` must be a user id".into());
        }
    }
    let direct = conversation.starts_with("dm:");
    if ids::group_of_conversation(&conversation).is_some() {
        if from.is_none() {
            return Err("`from` (the sender) is required in a group".into());
        }
    } else if !direct {
        return Err("`conversation` must be a direct or group conversation id".into());
    }
    Ok(ReceiptFrame {
        conversation,
        up_to,
        from,
    })
}

/// A key of `bodies`: a device id, or `<user>/<device>`.
fn is_device_key(key: &str) -> bool {
    match key.split_once('/') {
        Some((user, device)) => is_valid_id(user) && is_valid_id(device),
        None => is_valid_id(key),
    }
}

/// A message id as clients write it: a decimal string.
fn parse_message_id(text: &str) -> Option<u64> {
    if text.is_empty() || text.len() > 20 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok().filter(|id| *id != 0)
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
    let mut raw: RawFrame<'_> = match serde_json::from_slice(text) {
        Ok(raw) => raw,
        Err(_) => return Err(explain_undecodable(text)),
    };
    let client_msg_id = raw.id.as_deref().map(str::to_owned);
    let kind = raw.kind.take();
    let decoded = match kind.as_deref() {
        Some("ping") => Ok(ClientFrame::Ping),
        Some("send") => decode_send(raw, body_bytes_max),
        Some("ack") => decode_ack(raw),
        Some("read") => decode_read(raw),
        Some("sync") => decode_sync(raw),
        Some("history") => decode_history(raw),
        Some("typing") => target(raw.to, raw.group)
            .map(|(to, group)| ClientFrame::Typing { to, group })
            .map_err(invalid),
        Some(
            kind @ ("group_create" | "group_add" | "group_remove" | "group_leave" | "group_promote"
            | "group_restrict" | "group_open"),
        ) => decode_group_change(kind, raw),
        Some("group_members") => match raw.group {
            Some(group) if is_valid_id(&group) => Ok(ClientFrame::GroupMembers { group }),
            _ => Err(invalid("`group` must be a group id")),
        },
        Some("presence") => id_list(raw.users, "users", PRESENCE_QUERY_USERS_MAX, false)
            .map(|users| ClientFrame::Presence { users })
            .map_err(invalid),
        Some("keys_upload") => decode_keys_upload(raw),
        Some("devices") => user_field(raw).map(|user| ClientFrame::Devices { user }),
        Some("keys_fetch") => user_field(raw).map(|user| ClientFrame::KeysFetch { user }),
        Some("delete_account") => decode_delete_account(raw),
        Some("push_register") => decode_push_register(raw),
        Some("push_unregister") => match raw.id {
            Some(id) if is_valid_id(&id) => Ok(ClientFrame::PushUnregister { client_id: id }),
            _ => Err(invalid(ID_RULE)),
        },
        Some(other) => Err((
            ErrorCode::UnknownType,
            format!("unknown frame type `{}`", truncate(other)),
        )),
        None => Err((ErrorCode::UnknownType, "`type` is required".into())),
    };
    decoded.map_err(|(code, message)| FrameError {
        client_msg_id,
        code,
        message,
    })
}

/// Why one frame type refused its fields: the code and the message (the
/// caller adds the frame's `id`).
type Refused = (ErrorCode, String);

fn invalid(message: impl Into<String>) -> Refused {
    (ErrorCode::InvalidField, message.into())
}

const ID_RULE: &str = "`id` must be 1-64 characters of [A-Za-z0-9_.-]";

/// `send`: an id, a target (`to` or `group`), and `body` or per-device `bodies`.
fn decode_send(raw: RawFrame<'_>, body_bytes_max: usize) -> Result<ClientFrame<'_>, Refused> {
    let id = raw.id.ok_or_else(|| invalid("`id` is required"))?;
    if !is_valid_id(&id) {
        return Err(invalid(ID_RULE));
    }
    let (to, group) = target(raw.to, raw.group).map_err(invalid)?;
    if let Some(delete) = raw.delete {
        let target =
            parse_message_id(&delete).ok_or_else(|| invalid("`delete` must be a message id"))?;
        if raw.body.is_some() || raw.bodies.is_some() || raw.media.is_some() {
            return Err(invalid("a `delete` has no `body`, `bodies` or `media`"));
        }
        return Ok(ClientFrame::Send(SendFrame {
            client_msg_id: id,
            to,
            group,
            body: Cow::Borrowed(""),
            bodies: Vec::new(),
            media: None,
            delete: Some(target),
        }));
    }
    let (body, bodies) = match (raw.body, raw.bodies) {
        (Some(body), None) => (body, Vec::new()),
        (None, Some(bodies)) if !group => {
            if bodies.is_empty() || bodies.len() > BODIES_DEVICES_MAX {
                return Err(invalid(format!(
                    "`bodies` must name 1-{BODIES_DEVICES_MAX} devices"
                )));
            }
            if let Some((device, _)) = bodies.iter().find(|(d, _)| !is_device_key(d)) {
                return Err(invalid(format!(
                    "`bodies` keys are `<device>` or `<user>/<device>`, not `{}`",
                    truncate(device)
                )));
            }
            (Cow::Borrowed(""), bodies.into_iter().collect())
        }
        (None, Some(_)) => {
            return Err(invalid(
                "`bodies` is for direct messages; a group message has one `body`",
            ))
        }
        (Some(_), Some(_)) => return Err(invalid("give `body` or `bodies`, not both")),
        (None, None) => return Err(invalid("`body` is required")),
    };
    let longest = bodies
        .iter()
        .map(|(_, b)| b.len())
        .max()
        .unwrap_or(body.len());
    if longest > body_bytes_max {
        return Err((
            ErrorCode::BodyTooLarge,
            format!("`body` is {longest} bytes; the limit is {body_bytes_max}"),
        ));
    }
    if let Some(problem) = raw.media.as_ref().and_then(Media::problem) {
        return Err(invalid(problem));
    }
    Ok(ClientFrame::Send(SendFrame {
        client_msg_id: id,
        to,
        group,
        body,
        bodies,
        media: raw.media,
        delete: None,
    }))
}

/// `ack`: a message id, and optionally the delivered receipt's fields.
fn decode_ack(raw: RawFrame<'_>) -> Result<ClientFrame<'_>, Refused> {
    let message_id = raw
        .message_id
        .as_deref()
        .and_then(parse_message_id)
        .ok_or_else(|| invalid("`message_id` must be a message id"))?;
    let receipt = match (raw.conversation, raw.from) {
        (Some(conversation), Some(from)) => {
            Some(receipt_fields(conversation, message_id, Some(from)).map_err(invalid)?)
        }
        (None, None) => None,
        _ => {
            return Err(invalid(
                "a delivery receipt needs both `conversation` and `from`",
            ))
        }
    };
    Ok(ClientFrame::Ack {
        message_id,
        receipt,
    })
}

/// `read`: a conversation, the newest message read, and its sender in a group.
fn decode_read(raw: RawFrame<'_>) -> Result<ClientFrame<'_>, Refused> {
    let conversation = conversation_field(raw.conversation)?;
    let up_to = raw
        .up_to
        .as_deref()
        .and_then(parse_message_id)
        .ok_or_else(|| invalid("`up_to` must be a message id"))?;
    receipt_fields(conversation, up_to, raw.from)
        .map(ClientFrame::Read)
        .map_err(invalid)
}

/// `sync`, optionally `after` a message id.
fn decode_sync(raw: RawFrame<'_>) -> Result<ClientFrame<'_>, Refused> {
    match raw.after.as_deref() {
        None => Ok(ClientFrame::Sync { after: None }),
        Some(after) => parse_message_id(after)
            .map(|after| ClientFrame::Sync { after: Some(after) })
            .ok_or_else(|| invalid("`after` must be a message id")),
    }
}

/// `history`: a conversation, optionally `before` a message id, a `limit`.
fn decode_history(raw: RawFrame<'_>) -> Result<ClientFrame<'_>, Refused> {
    let conversation = conversation_field(raw.conversation)?;
    let before = match raw.before.as_deref() {
        None => None,
        Some(before) => {
            Some(parse_message_id(before).ok_or_else(|| invalid("`before` must be a message id"))?)
        }
    };
    let limit = match raw.limit {
        None => HISTORY_LIMIT_DEFAULT,
        Some(limit) if (1..=u64::from(HISTORY_LIMIT_MAX)).contains(&limit) => limit as u16,
        Some(_) => return Err(invalid(format!("`limit` must be 1-{HISTORY_LIMIT_MAX}"))),
    };
    Ok(ClientFrame::History {
        conversation,
        before,
        limit,
    })
}

/// `group_create`, `group_add`, `group_remove`, `group_leave`,
/// `group_promote`, `group_restrict`, `group_open`.
fn decode_group_change<'a>(kind: &str, raw: RawFrame<'a>) -> Result<ClientFrame<'a>, Refused> {
    let action = match kind {
        "group_create" => GroupAction::Create,
        "group_add" => GroupAction::Add,
        "group_remove" => GroupAction::Remove,
        "group_promote" => GroupAction::Promote,
        "group_restrict" => GroupAction::Restrict,
        "group_open" => GroupAction::Open,
        _ => GroupAction::Leave,
    };
    let id = raw
        .id
        .filter(|id| is_valid_id(id))
        .ok_or_else(|| invalid(ID_RULE))?;
    let group = match (action, raw.group) {
        (GroupAction::Create, None) => None,
        (GroupAction::Create, Some(_)) => {
            return Err(invalid("`group_create` names no `group`: the server does"))
        }
        (_, Some(group)) if is_valid_id(&group) => Some(group),
        _ => return Err(invalid("`group` must be a group id")),
    };
    let members = match action {
        GroupAction::Leave | GroupAction::Restrict | GroupAction::Open => Ok(Vec::new()),
        GroupAction::Create => id_list(raw.members, "members", GROUP_CHANGE_MEMBERS_MAX, true),
        _ => id_list(raw.members, "members", GROUP_CHANGE_MEMBERS_MAX, false),
    }
    .map_err(invalid)?;
    Ok(ClientFrame::GroupChange(GroupChangeFrame {
        client_msg_id: id,
        group,
        action,
        members,
    }))
}

/// `keys_upload`: the three keys are required; one-time prekeys optional.
fn decode_keys_upload(raw: RawFrame<'_>) -> Result<ClientFrame<'_>, Refused> {
    let missing =
        || invalid("`identity_key`, `signed_prekey` and `signed_prekey_signature` are required");
    let upload = KeysUpload {
        identity_key: raw.identity_key.ok_or_else(missing)?,
        signed_prekey: raw.signed_prekey.ok_or_else(missing)?,
        signed_prekey_signature: raw.signed_prekey_signature.ok_or_else(missing)?,
        one_time_prekeys: raw.one_time_prekeys.unwrap_or_default(),
    };
    match upload.problem() {
        Some(problem) => Err(invalid(problem)),
        None => Ok(ClientFrame::KeysUpload(upload)),
    }
}

/// `push_register`: an `id` and a `push` object whose `kind` is `apns`,
/// `fcm` or `webpush`, with that kind's fields and no others.
fn decode_push_register(raw: RawFrame<'_>) -> Result<ClientFrame<'_>, Refused> {
    let id = raw.id.ok_or_else(|| invalid("`id` is required"))?;
    if !is_valid_id(&id) {
        return Err(invalid(ID_RULE));
    }
    let push = raw.push.ok_or_else(|| {
        invalid("`push` is required: {\"kind\":\"apns\"|\"fcm\"|\"webpush\", ...}")
    })?;
    let target: crate::push::PushTarget = serde_json::from_value(push).map_err(|error| {
        invalid(format!(
            "`push` must be {{\"kind\":\"apns\",\"token\",\"topic\",\"sandbox\"}}, {{\"kind\":\"fcm\",\"token\"}} or {{\"kind\":\"webpush\",\"endpoint\",\"p256dh\",\"auth\"}}: {}",
            truncate(&error.to_string())
        ))
    })?;
    Ok(ClientFrame::PushRegister {
        client_id: id,
        target,
    })
}

/// `delete_account`: the asker's user id, and an optional `id`.
fn decode_delete_account(mut raw: RawFrame<'_>) -> Result<ClientFrame<'_>, Refused> {
    let client_id = raw.id.take();
    if client_id.as_deref().is_some_and(|id| !is_valid_id(id)) {
        return Err(invalid(ID_RULE));
    }
    let user = user_field(raw)?;
    Ok(ClientFrame::DeleteAccount { client_id, user })
}

/// The `user` of `devices`, `keys_fetch` and `delete_account`.
fn user_field(raw: RawFrame<'_>) -> Result<Cow<'_, str>, Refused> {
    match raw.user {
        Some(user) if is_valid_id(&user) => Ok(user),
        _ => Err(invalid("`user` must be a user id")),
    }
}

/// A `conversation` field: present, and at most 256 bytes.
fn conversation_field(conversation: Option<Cow<'_, str>>) -> Result<Cow<'_, str>, Refused> {
    conversation
        .filter(|c| !c.is_empty() && c.len() <= 256)
        .ok_or_else(|| invalid("`conversation` is required"))
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
    // A JSON object may repeat a key (RFC 8259 only says SHOULD NOT); a
    // `Value` keeps the last, so ask the typed decoder, which refuses it.
    if let Err(error) = serde_json::from_slice::<RawFrame<'_>>(text) {
        let error = error.to_string();
        if let Some(rest) = error.strip_prefix("duplicate field `") {
            let field = rest.split('`').next().unwrap_or("");
            return FrameError {
                client_msg_id,
                code: ErrorCode::InvalidField,
                message: format!(
                    "`{}` appears twice; each key may appear once",
                    truncate(field)
                ),
            };
        }
    }
    for list in ["one_time_prekeys", "members", "users"] {
        if object.get(list).is_some_and(|v| {
            !v.as_array()
                .is_some_and(|a| a.iter().all(|k| k.is_string()))
        }) {
            return FrameError {
                client_msg_id,
                code: ErrorCode::InvalidField,
                message: format!("`{list}` must be an array of strings"),
            };
        }
    }
    let strings = [
        "user",
        "identity_key",
        "signed_prekey",
        "signed_prekey_signature",
        "type",
        "id",
        "to",
        "body",
        "after",
        "message_id",
        "conversation",
        "before",
        "group",
        "up_to",
        "from",
    ];
    if object.get("bodies").is_some() {
        return FrameError {
            client_msg_id,
            code: ErrorCode::InvalidField,
            message: "`bodies` must be an object of device id to string".into(),
        };
    }
    if object.get("media").is_some() {
        return FrameError {
            client_msg_id,
            code: ErrorCode::InvalidField,
            message: "`media` must be {\"url\": string, \"size\": number, \"sha256\": string}"
                .into(),
        };
    }
    if object.get("limit").is_some_and(|v| !v.is_u64()) {
        return FrameError {
            client_msg_id,
            code: ErrorCode::InvalidField,
            message: format!("`limit` must be 1-{HISTORY_LIMIT_MAX}"),
        };
    }
    let wrong = strings
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub media: Option<Media<'a>>,
    /// The group, for a message of a group conversation (`to` is it too).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<&'a str>,
    /// A membership change, for a server-made message of a group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<GroupEventJson<'a>>,
    /// Delete for everyone: this message withdraws the sender's message
    /// with this id (show that one as deleted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deletes: Option<IdText>,
    /// This message was deleted by its sender: its tombstone, with no body.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
    /// Every device's ciphertext: only between nodes (the receiving node
    /// gives each device its own as `body`), never to a client.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bodies: Option<BodiesJson<'a>>,
}

/// `{"<device>":"<ciphertext>",...}`
#[derive(Clone, Copy)]
pub struct BodiesJson<'a>(pub &'a [(&'a str, &'a str)]);

impl Serialize for BodiesJson<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(device, body)| (device, body)))
    }
}

/// `"event":{"action":"added","members":[...]}`
#[derive(Serialize)]
pub struct GroupEventJson<'a> {
    pub action: &'static str,
    pub members: &'a [&'a str],
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
    /// In a fleet, when another node is this user's home and says where it
    /// is: reconnect there, at a random moment (this node serves the device
    /// fully meanwhile).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub home: Option<&'a str>,
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

/// `typing`: someone in a conversation of this user is typing (never stored).
#[derive(Serialize)]
pub struct TypingFrame<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub conversation: &'a str,
    pub from: &'a str,
    pub from_device: &'a str,
    /// Show the indicator for at most this long unless another `typing` comes.
    pub expires_ms: u64,
}

pub fn encode_typing(frame: &TypingFrame<'_>) -> Vec<u8> {
    to_json(frame)
}

/// `synced`: the device has everything it had not acknowledged, up to `last`.
#[derive(Serialize)]
pub struct SyncedFrame {
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The last message id sent by this sync; absent when there was nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last: Option<IdText>,
    /// Messages this sync sent.
    pub count: u64,
    /// True when the sync stopped at its bound; sync again with `after: last`.
    pub more: bool,
    /// Messages this device had not received that are older than the
    /// node's retention and were removed: missed for good (absent when 0).
    #[serde(skip_serializing_if = "is_zero")]
    pub expired: u64,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

/// `history`: a page of a conversation, newest first.
#[derive(Serialize)]
pub struct HistoryFrame<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub conversation: &'a str,
    pub messages: Vec<MessageFrame<'a>>,
}

pub fn encode_synced(last: Option<u64>, count: u64, more: bool, expired: u64) -> Vec<u8> {
    to_json(&SyncedFrame {
        kind: "synced",
        last: last.map(IdText),
        count,
        more,
        expired,
    })
}

pub fn encode_history(frame: &HistoryFrame<'_>) -> Vec<u8> {
    to_json(frame)
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

    #[test]
    fn delete_account_names_the_user_as_its_confirmation() {
        assert_eq!(
            decode_client_frame(br#"{"type":"delete_account","user":"alice"}"#, MAX),
            Ok(ClientFrame::DeleteAccount {
                client_id: None,
                user: Cow::Borrowed("alice")
            })
        );
        assert_eq!(
            decode_client_frame(
                br#"{"type":"delete_account","id":"d1","user":"alice"}"#,
                MAX
            ),
            Ok(ClientFrame::DeleteAccount {
                client_id: Some(Cow::Borrowed("d1")),
                user: Cow::Borrowed("alice")
            })
        );
        for text in [
            &br#"{"type":"delete_account"}"#[..],
            br#"{"type":"delete_account","user":"a b"}"#,
            br#"{"type":"delete_account","id":"d 1","user":"alice"}"#,
        ] {
            assert_eq!(error_of(text).code, ErrorCode::InvalidField);
        }
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

    #[test]
    fn a_repeated_key_is_refused_by_name() {
        let error = decode_client_frame(br#"{"type":"ping","type":"send"}"#, 1024).unwrap_err();
        assert_eq!(error.code, ErrorCode::InvalidField);
        assert!(
            error.message.contains("`type` appears twice"),
            "{}",
            error.message
        );
        let error = decode_client_frame(
            br#"{"type":"send","id":"c1","to":"b","body":"x","body":"y"}"#,
            1024,
        )
        .unwrap_err();
        assert!(
            error.message.contains("`body` appears twice"),
            "{}",
            error.message
        );
        assert_eq!(error.client_msg_id.as_deref(), Some("c1"));
    }
}

#[cfg(test)]
mod read_path_frame_tests {
    use super::*;

    #[test]
    fn sync_ack_and_history_decode_with_their_rules() {
        assert_eq!(
            decode_client_frame(br#"{"type":"sync"}"#, 16),
            Ok(ClientFrame::Sync { after: None })
        );
        assert_eq!(
            decode_client_frame(br#"{"type":"sync","after":"42"}"#, 16),
            Ok(ClientFrame::Sync { after: Some(42) })
        );
        assert_eq!(
            decode_client_frame(br#"{"type":"typing","to":"bob"}"#, 16),
            Ok(ClientFrame::Typing {
                to: "bob".into(),
                group: false
            })
        );
        assert_eq!(
            decode_client_frame(br#"{"type":"ack","message_id":"7"}"#, 16),
            Ok(ClientFrame::Ack {
                message_id: 7,
                receipt: None
            })
        );
        assert_eq!(
            decode_client_frame(br#"{"type":"history","conversation":"dm:a:b"}"#, 16),
            Ok(ClientFrame::History {
                conversation: "dm:a:b".into(),
                before: None,
                limit: HISTORY_LIMIT_DEFAULT
            })
        );
        assert_eq!(
            decode_client_frame(
                br#"{"type":"history","conversation":"dm:a:b","before":"9","limit":100}"#,
                16
            ),
            Ok(ClientFrame::History {
                conversation: "dm:a:b".into(),
                before: Some(9),
                limit: 100
            })
        );
        for bad in [
            &br#"{"type":"sync","after":"x1"}"#[..],
            br#"{"type":"sync","after":"0"}"#,
            br#"{"type":"ack"}"#,
            br#"{"type":"ack","message_id":"99999999999999999999999"}"#,
            br#"{"type":"history"}"#,
            br#"{"type":"history","conversation":"dm:a:b","limit":101}"#,
            br#"{"type":"history","conversation":"dm:a:b","limit":0}"#,
            br#"{"type":"history","conversation":"dm:a:b","limit":"5"}"#,
            br#"{"type":"ack","message_id":7}"#,
            br#"{"type":"typing"}"#,
            br#"{"type":"typing","to":"not a user"}"#,
        ] {
            let error = decode_client_frame(bad, 16).expect_err(std::str::from_utf8(bad).unwrap());
            assert_eq!(
                error.code,
                ErrorCode::InvalidField,
                "{}",
                std::str::from_utf8(bad).unwrap()
            );
        }
    }

    #[test]
    fn group_receipt_and_presence_frames_decode_with_their_rules() {
        let frame = decode_client_frame(
            br#"{"type":"group_create","id":"c1","members":["bob","carol"]}"#,
            16,
        );
        let Ok(ClientFrame::GroupChange(change)) = frame else {
            panic!("not a group change: {frame:?}")
        };
        assert_eq!(change.action, GroupAction::Create);
        assert_eq!(change.group, None);
        assert_eq!(change.members, ["bob", "carol"]);
        let frame = decode_client_frame(br#"{"type":"group_leave","id":"c2","group":"g9"}"#, 16);
        assert!(matches!(frame, Ok(ClientFrame::GroupChange(c)) if c.members.is_empty()));
        let text = br#"{"type":"send","id":"c3","group":"g9","body":"x"}"#;
        let frame = decode_client_frame(text, 16);
        assert!(matches!(frame, Ok(ClientFrame::Send(s)) if s.group && s.to == "g9"));
        let text = br#"{"type":"read","conversation":"dm:a:b","up_to":"12"}"#;
        let frame = decode_client_frame(text, 16);
        assert!(matches!(frame, Ok(ClientFrame::Read(r)) if r.up_to == 12 && r.from.is_none()));
        let text = br#"{"type":"ack","message_id":"12","conversation":"grp:g9","from":"bob"}"#;
        let frame = decode_client_frame(text, 16);
        assert!(
            matches!(frame, Ok(ClientFrame::Ack { receipt: Some(r), .. }) if r.from.as_deref() == Some("bob"))
        );

        for (text, field) in [
            (
                &br#"{"type":"send","id":"c","to":"bob","group":"g1","body":"x"}"#[..],
                "not both",
            ),
            (
                br#"{"type":"group_create","id":"c","group":"g1","members":[]}"#,
                "names no",
            ),
            (
                br#"{"type":"group_add","id":"c","group":"g1","members":[]}"#,
                "members",
            ),
            (
                br#"{"type":"group_add","id":"c","group":"g1","members":["a b"]}"#,
                "invalid id",
            ),
            (
                br#"{"type":"group_add","id":"c","group":"g1","members":[1]}"#,
                "array of strings",
            ),
            (
                br#"{"type":"read","conversation":"grp:g1","up_to":"5"}"#,
                "`from`",
            ),
            (
                br#"{"type":"read","conversation":"rcpt:bob","up_to":"5"}"#,
                "direct or group",
            ),
            (br#"{"type":"ack","message_id":"5","from":"bob"}"#, "both"),
            (br#"{"type":"presence","users":[]}"#, "users"),
        ] {
            let error = decode_client_frame(text, 16).unwrap_err();
            assert_eq!(error.code, ErrorCode::InvalidField, "{text:?}");
            assert!(
                error.message.contains(field),
                "{}: {}",
                field,
                error.message
            );
        }
        let many: Vec<String> = (0..=PRESENCE_QUERY_USERS_MAX)
            .map(|i| format!("\"u{i}\""))
            .collect();
        let text = format!(r#"{{"type":"presence","users":[{}]}}"#, many.join(","));
        assert_eq!(
            decode_client_frame(text.as_bytes(), 16).unwrap_err().code,
            ErrorCode::InvalidField
        );
    }

    #[test]
    fn a_delete_names_a_message_id_and_carries_nothing_else() {
        let good = br#"{"type":"send","id":"d1","to":"bob","delete":"1234"}"#;
        let ClientFrame::Send(send) = decode_client_frame(good, 16).unwrap() else {
            panic!("a send");
        };
        assert_eq!((send.delete, send.body.as_ref()), (Some(1234), ""));
        for bad in [
            &br#"{"type":"send","id":"d1","to":"bob","delete":"x"}"#[..],
            br#"{"type":"send","id":"d1","to":"bob","delete":"1234","body":"hi"}"#,
            br#"{"type":"send","id":"d1","to":"bob","delete":"1234","bodies":{"phone":"c"}}"#,
        ] {
            let Err(error) = decode_client_frame(bad, 16) else {
                panic!("accepted {}", String::from_utf8_lossy(bad));
            };
            assert_eq!(error.code, ErrorCode::InvalidField);
        }
    }

    #[test]
    fn media_references_are_checked_for_shape_and_limits_only() {
        let sha = "0f".repeat(32);
        let good = format!(
            r#"{{"type":"send","id":"c1","to":"bob","body":"k","media":{{"url":"https://cdn.example/x","size":42,"sha256":"{sha}"}}}}"#
        );
        let ClientFrame::Send(send) = decode_client_frame(good.as_bytes(), 16).unwrap() else {
            panic!("a send");
        };
        assert_eq!(send.media.unwrap().size, 42);
        for bad in [
            format!(r#"{{"type":"send","id":"c1","to":"bob","body":"k","media":{{"url":"http://x","size":1,"sha256":"{sha}"}}}}"#),
            format!(r#"{{"type":"send","id":"c1","to":"bob","body":"k","media":{{"url":"https://x","size":0,"sha256":"{sha}"}}}}"#),
            format!(r#"{{"type":"send","id":"c1","to":"bob","body":"k","media":{{"url":"https://x","size":3000000000,"sha256":"{sha}"}}}}"#),
            r#"{"type":"send","id":"c1","to":"bob","body":"k","media":{"url":"https://x","size":1,"sha256":"zz"}}"#.to_owned(),
            r#"{"type":"send","id":"c1","to":"bob","body":"k","media":{"url":"https://x","size":"1"}}"#.to_owned(),
            r#"{"type":"send","id":"c1","to":"bob","body":"k","media":"https://x"}"#.to_owned(),
        ] {
            let error = decode_client_frame(bad.as_bytes(), 16).expect_err(&bad);
            assert_eq!(error.code, ErrorCode::InvalidField, "{bad}");
            assert!(error.message.contains("media"), "{bad}: {}", error.message);
            assert_eq!(error.client_msg_id.as_deref(), Some("c1"));
        }
    }
}
