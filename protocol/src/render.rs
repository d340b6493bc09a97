//! What a device is shown of a stored message: the pure mapping from a ring
//! record to the JSON frame that live delivery, sync and history send.
//!
//! Owns `message_frame` (a record as a `message`, with its group and its
//! membership event), the choice between `message` and `receipts`, and
//! which ciphertext a device of a per-device message gets. Never decides
//! who receives a message (that is the gateway's shard) and never reads a
//! body: ciphertexts are copied as they are.

use crate::frames::{self, GroupEventJson, IdText, MessageFrame};
use crate::ids;
use crate::records::{Event, MessageRecord};
use crate::social_frames;

/// The `message` frame of a stored (or just stored) message: a group's
/// names its group, and a membership change its event. `body` is the
/// shared body (empty for a per-device message: see `frame_for_device`).
pub fn message_frame<'a>(message: &'a MessageRecord<'a>) -> MessageFrame<'a> {
    let group = ids::group_of_conversation(message.conversation);
    MessageFrame {
        kind: "message",
        message_id: IdText(message.message_id),
        conversation: message.conversation,
        from: message.from,
        from_device: message.from_device,
        to: message.to,
        body: message.body,
        ts: message.ts,
        media: message.media.clone(),
        bodies: None,
        group: group.map(|_| message.to),
        event: match &message.event {
            Some(Event::Group { action, members }) => Some(GroupEventJson {
                action: action.as_str(),
                members,
            }),
            _ => None,
        },
        deletes: message.deletes().map(IdText),
        deleted: message.is_tombstone(),
    }
}

/// The JSON that carries a just-stored record between nodes: receipts as
/// `receipts`, everything else as `message` with every device's ciphertext
/// (the receiving node gives each device its own).
pub fn encode_for_nodes(message: &MessageRecord<'_>) -> Vec<u8> {
    if let Some(json) = encode_receipts(message) {
        return json;
    }
    frames::encode_message(&MessageFrame {
        bodies: (!message.bodies.is_empty()).then_some(frames::BodiesJson(&message.bodies)),
        ..message_frame(message)
    })
}

/// The frame `user`'s `device` gets for a stored record: `receipts` for a
/// batch of receipts, `message` for everything else with the device's own
/// ciphertext; `None` when a per-device message has none for it.
pub fn encode_for_device(message: &MessageRecord<'_>, user: &str, device: &str) -> Option<Vec<u8>> {
    if let Some(json) = encode_receipts(message) {
        return Some(json);
    }
    let mut frame = message_frame(message);
    frame.body = message.body_for(user, device)?;
    Some(frames::encode_message(&frame))
}

/// `message`, as `device` of a history page shows it: a per-device message
/// shows this device's ciphertext, or an empty body.
pub fn history_frame<'a>(
    message: &'a MessageRecord<'a>,
    user: &str,
    device: &str,
) -> MessageFrame<'a> {
    MessageFrame {
        body: message.body_for(user, device).unwrap_or(""),
        ..message_frame(message)
    }
}

fn encode_receipts(message: &MessageRecord<'_>) -> Option<Vec<u8>> {
    match &message.event {
        Some(Event::Receipts {
            conversation,
            receipts,
        }) => Some(social_frames::encode_receipts(
            message.message_id,
            conversation,
            receipts,
            message.ts,
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{Receipt, ReceiptStatus};

    fn record<'a>(bodies: Vec<(&'a str, &'a str)>) -> MessageRecord<'a> {
        MessageRecord {
            message_id: 7,
            ts: 1_000,
            conversation: "dm:alice:bob",
            from: "alice",
            from_device: "phone",
            to: "bob",
            client_msg_id: "c1",
            body: if bodies.is_empty() { "hi" } else { "" },
            media: None,
            event: None,
            recipients: Vec::new(),
            bodies,
        }
    }

    #[test]
    fn each_device_of_a_per_device_message_gets_only_its_own_ciphertext() {
        let message = record(vec![
            ("alice/laptop", "for-laptop"),
            ("bob/phone", "for-bob"),
        ]);
        let bob = String::from_utf8(encode_for_device(&message, "bob", "phone").unwrap()).unwrap();
        assert!(bob.contains(r#""body":"for-bob""#), "{bob}");
        assert!(!bob.contains("for-laptop"), "{bob}");
        assert_eq!(encode_for_device(&message, "bob", "tablet"), None);
        let between_nodes = String::from_utf8(encode_for_nodes(&message)).unwrap();
        assert!(between_nodes.contains("for-laptop") && between_nodes.contains("for-bob"));
        assert!(history_frame(&message, "bob", "tablet").body.is_empty());
    }

    #[test]
    fn a_shared_message_is_the_same_frame_for_every_device() {
        let message = record(Vec::new());
        let one = encode_for_device(&message, "bob", "phone").unwrap();
        assert_eq!(
            Some(one.clone()),
            encode_for_device(&message, "alice", "laptop")
        );
        assert_eq!(
            one,
            encode_for_nodes(&message),
            "no bodies map between nodes either"
        );
        let text = String::from_utf8(one).unwrap();
        assert!(
            text.contains(r#""type":"message""#) && !text.contains("group"),
            "{text}"
        );
    }

    #[test]
    fn a_receipt_batch_is_a_receipts_frame() {
        let mut message = record(Vec::new());
        let receipts = vec![Receipt {
            user: "bob",
            device: "phone",
            status: ReceiptStatus::Read,
            up_to: 5,
        }];
        message.event = Some(Event::Receipts {
            conversation: "dm:alice:bob",
            receipts,
        });
        let text =
            String::from_utf8(encode_for_device(&message, "alice", "phone").unwrap()).unwrap();
        assert!(text.contains(r#""type":"receipts""#), "{text}");
        assert_eq!(encode_for_nodes(&message), text.into_bytes());
    }
}
