//! Groups: sends to a group, membership changes, the member list, typing.
//!
//! Owns what makes a send a group message (stored once under `grp:<id>`
//! with every member as a recipient) and the membership rules: a change is
//! itself a message in the group, recorded with every member it concerns
//! (before and after) as a recipient, so every device sees changes in order
//! with the messages; a change is always checked against the list in
//! storage, never a cached one; after it, this shard's cache holds the new
//! list and every other shard and node forgets its copy. Roles: the
//! creator is an admin; only admins add, remove, promote, and restrict
//! posting to admins or open it again (any member of a group with no admin
//! may); roles are read from storage with the list for every change; in a
//! restricted group only admins post. A change's record is made and
//! stored by `send::group_change` (also used for a deleted account's
//! `left`); storing and answering a send is the pipeline's. Never imports another feature, and never
//! holds a `RefCell` borrow across an await.

use std::collections::BTreeSet;
use std::rc::Rc;

use chat_protocol::codes::ErrorCode;
use chat_protocol::frames::{self, GroupChangeFrame, SendFrame};
use chat_protocol::records::{GroupAction, MessageRecord};
use chat_protocol::store_wire::MemberRole;
use chat_protocol::{ids, social_frames};

use crate::metrics::bump;
use crate::shard::send::deliver::deliver_ephemeral;
use crate::shard::send::group_change::{self, Change};
use crate::shard::send::members::{cached, cached_posters, member_roles, members, Roles};
use crate::shard::send::pipeline::{self, Outgoing};
use crate::shard::send::reply;
use crate::shard::state::conn::Conn;
use crate::shard::state::group_cache::{is_member, Members};
use crate::shard::state::store_client::StoreError;
use crate::shard::state::users::Allowance;
use crate::shard::state::Shard;

const NOT_A_MEMBER: &str = "not a member of this group";

/// A send to a group: answered at once when the member list is cached and
/// the id needs no storage look-up; otherwise the connection's frames wait
/// while storage is asked (so their order is kept).
pub fn on_send(shard: &Rc<Shard>, conn: &Rc<Conn>, send: SendFrame<'_>) {
    if !reply::take_send_allowance(shard, conn, &send.client_msg_id) {
        return;
    }
    if !pipeline::needs_look_up(shard, conn, &send.client_msg_id) {
        if let Some(members) = cached(shard, &send.to) {
            accept_send(shard, conn, &send, &members);
            return;
        }
    }
    conn.pause();
    monoio::spawn(load_then_send(
        shard.clone(),
        conn.clone(),
        send.into_owned(),
    ));
}

async fn load_then_send(shard: Rc<Shard>, conn: Rc<Conn>, send: SendFrame<'static>) {
    let conversation = ids::group_conversation_id(&send.to);
    let looked_up = pipeline::ensure_known(&shard, &conn, &send.client_msg_id, &conversation).await;
    match members(&shard, &send.to, false).await {
        Ok(members) if looked_up => accept_send(&shard, &conn, &send, &members),
        Ok(_) | Err(StoreError::Unavailable) => {
            reply::not_answered(&shard, &conn, &send.client_msg_id);
        }
        Err(error) => reply::storage_error(&shard, &conn, "send", error),
    }
    conn.resume();
}

/// Stores a group message once, with every member's inbox as a recipient,
/// and fans it out.
fn accept_send(shard: &Shard, conn: &Rc<Conn>, send: &SendFrame<'_>, members: &Members) {
    let replayed = pipeline::replay_if_known(shard, conn, &send.client_msg_id);
    let conversation = ids::group_conversation_id(&send.to);
    let record_with = |id| MessageRecord {
        recipients: members.iter().map(|m| &**m).collect(),
        ..pipeline::record_of_send(conn, send, &conversation, id)
    };
    if let Some(replayed) = replayed {
        if replayed.from_storage && is_member(members, &conn.user_id) {
            let record = record_with((replayed.message_id, replayed.ts));
            pipeline::deliver_again(shard, conn, &record, &record.recipients);
        }
        return;
    }
    if !is_member(members, &conn.user_id) {
        return reply::forbidden(shard, conn, Some(&send.client_msg_id), NOT_A_MEMBER);
    }
    match cached_posters(shard, &send.to) {
        Some(None) => {}
        Some(Some(admins)) if is_member(&admins, &conn.user_id) => {}
        Some(Some(_)) => {
            let message = "only the group's admins post in this group";
            return reply::forbidden(shard, conn, Some(&send.client_msg_id), message);
        }
        // The entry was loaded just before; gone only if the cache was cleared.
        None => return reply::not_answered(shard, conn, &send.client_msg_id),
    }
    if !pipeline::delete_in_window(shard, conn, send) {
        return;
    }
    let record = record_with(pipeline::next_message_id(shard));
    let out = Outgoing {
        record: &record,
        users: &record.recipients,
        sender: Some(conn),
        notice: None,
        hand_off: pipeline::hand_off_of(send),
    };
    if pipeline::store_and_deliver(shard, out).is_ok() {
        bump(&shard.metrics().group_messages, 1);
    }
}

/// `group_create`, `group_add`, `group_remove`, `group_leave`: always
/// against the member list in storage (never a cached one), with the
/// connection's frames waiting meanwhile.
pub fn on_change(shard: &Rc<Shard>, conn: &Rc<Conn>, change: GroupChangeFrame<'_>) {
    if !reply::take_send_allowance(shard, conn, &change.client_msg_id) {
        return;
    }
    if pipeline::replay_if_known(shard, conn, &change.client_msg_id).is_some() {
        return;
    }
    conn.pause();
    monoio::spawn(change_group(
        shard.clone(),
        conn.clone(),
        change.into_owned(),
    ));
}

async fn change_group(shard: Rc<Shard>, conn: Rc<Conn>, change: GroupChangeFrame<'static>) {
    // A retry of a change older than the warm-up is found in storage.
    if !pipeline::ensure_known(&shard, &conn, &change.client_msg_id, "").await {
        reply::not_answered(&shard, &conn, &change.client_msg_id);
        conn.resume();
        return;
    }
    let current = match &change.group {
        None => Ok(Roles {
            members: Vec::new(),
            admins_only: false,
        }),
        Some(group) => member_roles(&shard, group).await,
    };
    match current {
        Ok(current) => apply_change(&shard, &conn, &change, &current),
        Err(StoreError::Unavailable) => reply::not_answered(&shard, &conn, &change.client_msg_id),
        Err(error) => reply::storage_error(&shard, &conn, "group change", error),
    }
    conn.resume();
}

/// Whether `user` may add, remove and promote: an admin, or any member of a
/// group with no admin (a group from before roles, or whose admins left).
fn may_manage(current: &[MemberRole], user: &str) -> bool {
    let has_admins = current.iter().any(|member| member.admin);
    current
        .iter()
        .any(|member| *member.user == *user && (member.admin || !has_admins))
}

fn apply_change(shard: &Shard, conn: &Rc<Conn>, change: &GroupChangeFrame<'_>, roles: &Roles) {
    let current = roles.members.as_slice();
    let client_msg_id = Some(&*change.client_msg_id);
    let fail = |code: ErrorCode, message: &str| {
        reply::send_error(shard, conn, client_msg_id, code, message, None);
    };
    if pipeline::replay_if_known(shard, conn, &change.client_msg_id).is_some() {
        return;
    }
    let user: &str = &conn.user_id;
    let now: BTreeSet<&str> = current.iter().map(|m| m.user.as_str()).collect();
    if change.action != GroupAction::Create && !now.contains(user) {
        return fail(ErrorCode::Forbidden, NOT_A_MEMBER);
    }
    let manages = !matches!(change.action, GroupAction::Create | GroupAction::Leave);
    if manages && !may_manage(current, user) {
        return fail(
            ErrorCode::Forbidden,
            "only the group's admins add, remove and promote members and restrict posting",
        );
    }
    let listed: BTreeSet<&str> = change.members.iter().map(|m| &**m).collect();
    // Who the event names, and who the group has after it.
    let (named, after): (Vec<&str>, BTreeSet<&str>) = match change.action {
        GroupAction::Create => {
            let mut all = listed.clone();
            all.insert(user);
            (all.iter().copied().collect(), all)
        }
        GroupAction::Add => {
            let added: Vec<&str> = listed.difference(&now).copied().collect();
            if added.is_empty() {
                return fail(
                    ErrorCode::InvalidField,
                    "every listed user is already a member",
                );
            }
            (added, now.union(&listed).copied().collect())
        }
        GroupAction::Remove => {
            let removed: Vec<&str> = listed.intersection(&now).copied().collect();
            if removed.is_empty() {
                return fail(ErrorCode::InvalidField, "no listed user is a member");
            }
            (removed, now.difference(&listed).copied().collect())
        }
        GroupAction::Leave => (
            vec![user],
            now.iter().copied().filter(|m| *m != user).collect(),
        ),
        GroupAction::Promote => {
            if let Some(stranger) = listed.iter().find(|m| !now.contains(**m)) {
                return fail(
                    ErrorCode::InvalidField,
                    &format!("{stranger} is not a member"),
                );
            }
            let promoted: Vec<&str> = listed
                .iter()
                .copied()
                .filter(|m| !current.iter().any(|c| c.user == *m && c.admin))
                .collect();
            if promoted.is_empty() {
                return fail(
                    ErrorCode::InvalidField,
                    "every listed user is an admin already",
                );
            }
            (promoted, now.clone())
        }
        GroupAction::Restrict | GroupAction::Open => {
            let restrict = change.action == GroupAction::Restrict;
            if roles.admins_only == restrict {
                let already = if restrict {
                    "only admins post in this group already"
                } else {
                    "every member posts in this group already"
                };
                return fail(ErrorCode::InvalidField, already);
            }
            (Vec::new(), now.clone())
        }
    };
    let max = shard.config.group_members_max;
    if after.len() > max {
        return fail(
            ErrorCode::GroupFull,
            &format!("a group has at most {max} members"),
        );
    }
    let id = pipeline::next_message_id(shard);
    let group = match &change.group {
        Some(group) => group.to_string(),
        None => ids::new_group_id(id.0),
    };
    let change = Change {
        group: &group,
        action: change.action,
        named,
        // Everyone concerned hears of it: members before and after.
        recipients: now.union(&after).copied().collect(),
        from: user,
        from_device: &conn.device_id,
        client_msg_id: &change.client_msg_id,
        id,
    };
    // Refused: the pipeline told the sender.
    let _ = group_change::store(shard, change, Some(conn));
}

/// `group_members`: the list, for members only.
pub async fn list_members(shard: Rc<Shard>, conn: Rc<Conn>, group: String) {
    match members(&shard, &group, false).await {
        Ok(members) if is_member(&members, &conn.user_id) => {
            let names: Vec<&str> = members.iter().map(|m| &**m).collect();
            reply::send_json(&conn, &social_frames::encode_group_members(&group, &names));
        }
        Ok(_) => reply::forbidden(&shard, &conn, None, NOT_A_MEMBER),
        Err(error) => reply::storage_error(&shard, &conn, "group_members", error),
    }
}

/// `typing` in a group: to every other member's devices, ephemeral (dropped
/// where a queue is full, never stored), members only.
pub fn on_typing(shard: &Rc<Shard>, conn: &Rc<Conn>, group: &str) {
    let message = "too many typing frames by this user";
    if !reply::take_allowance(shard, conn, Allowance::Typing, None, message, false) {
        return;
    }
    match cached(shard, group) {
        Some(members) => typing_to_members(shard, conn, group, &members),
        None => {
            let (shard, conn, group) = (shard.clone(), conn.clone(), group.to_owned());
            monoio::spawn(async move {
                match members(&shard, &group, false).await {
                    Ok(members) => typing_to_members(&shard, &conn, &group, &members),
                    Err(error) => reply::storage_error(&shard, &conn, "typing", error),
                }
            });
        }
    }
}

fn typing_to_members(shard: &Shard, conn: &Conn, group: &str, members: &Members) {
    if !is_member(members, &conn.user_id) {
        return reply::forbidden(shard, conn, None, NOT_A_MEMBER);
    }
    let conversation = ids::group_conversation_id(group);
    let json = frames::encode_typing(&frames::TypingFrame {
        kind: "typing",
        conversation: &conversation,
        from: &conn.user_id,
        from_device: &conn.device_id,
        expires_ms: shard.config.typing_expires_ms,
    });
    let others: Vec<&str> = members
        .iter()
        .map(|m| &**m)
        .filter(|m| *m != &*conn.user_id)
        .collect();
    deliver_ephemeral(shard, &others, json);
    bump(&shard.metrics().typing, 1);
}
