//! Storing a group membership change: the one way a change's record is
//! made and handed to the pipeline, whoever asks for it.
//!
//! Owns the shape of a change's record (a message in the group with an
//! `event`, no body, every member it concerns as a recipient), its notice
//! to other nodes, and what follows it on this node: the change counted and
//! every shard's cached list forgotten. A member's own change
//! (`features::groups`) is delivered only once durable, as the writer may
//! refuse it (a group past its bound); a change the server makes for a
//! user (a deleted account leaving its groups, `features::revocation`)
//! only ever shrinks a group, so the writer never refuses it and it is
//! delivered at once. Never decides whether a change is allowed: the
//! callers check that against the roles in storage.

use std::rc::Rc;

use backplane_bridge::Outbound;
use chat_protocol::ids;
use chat_protocol::records::{Event, GroupAction, MessageRecord};

use super::pipeline::{self, HandOff, Outgoing, Refused};
use crate::metrics::bump;
use crate::shard::state::conn::Conn;
use crate::shard::state::Shard;

/// One membership change, checked by the caller.
pub struct Change<'a> {
    pub group: &'a str,
    pub action: GroupAction,
    /// Who the event names (the added, the removed, the one who left...).
    pub named: Vec<&'a str>,
    /// Everyone it concerns: the members before and after.
    pub recipients: Vec<&'a str>,
    /// The member who makes it, and from which device.
    pub from: &'a str,
    pub from_device: &'a str,
    /// Its idempotency key, under `from` and `from_device`.
    pub client_msg_id: &'a str,
    /// Its id and time (`pipeline::next_message_id`).
    pub id: (u64, u64),
}

/// Stores `change` and delivers it. `sender`, the connection that asked,
/// is answered `sent`; `None` for a change the server makes.
pub fn store(shard: &Shard, change: Change<'_>, sender: Option<&Rc<Conn>>) -> Result<u64, Refused> {
    let conversation = ids::group_conversation_id(change.group);
    let (message_id, ts) = change.id;
    let record = MessageRecord {
        message_id,
        ts,
        conversation: &conversation,
        from: change.from,
        from_device: change.from_device,
        to: change.group,
        client_msg_id: change.client_msg_id,
        body: "",
        media: None,
        event: Some(Event::Group {
            action: change.action,
            members: change.named,
        }),
        recipients: change.recipients,
        bodies: Vec::new(),
    };
    let out = Outgoing {
        record: &record,
        users: &record.recipients,
        sender,
        notice: Some(Box::new(Outbound::GroupChanged {
            group: change.group.into(),
        })),
        // A member's change is seen by nobody until the writer has stored
        // it within the bound; the server's only shrinks the group.
        hand_off: match sender {
            Some(_) => HandOff::WhenDurable,
            None => HandOff::Required,
        },
    };
    let end = pipeline::store_and_deliver(shard, out)?;
    bump(&shard.metrics().group_changes, 1);
    // Every shard (and other nodes, once the change is durable) forgets its
    // list and reloads it, with the roles, from storage.
    shard.forget_group_everywhere(change.group);
    Ok(end)
}
