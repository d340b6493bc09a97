//! Direct (1:1) messages and direct typing.
//!
//! Owns what makes a send a 1:1 message: its conversation id, its record,
//! and who gets it (every device of the recipient and the sender's other
//! devices). A send with per-device `bodies` first waits for the key
//! directory's check (`send::devices`); a send whose id the warm-up cannot
//! vouch for first waits for storage; either way the connection's later
//! frames wait too, so their order is kept. Everything after (append,
//! deliver, `sent`) is the pipeline's. Never imports another feature.

use std::rc::Rc;

use chat_protocol::frames::{self, SendFrame, TypingFrame};
use chat_protocol::ids;
use chat_protocol::records::MessageRecord;

use crate::metrics::bump;
use crate::shard::send::deliver::deliver_ephemeral;
use crate::shard::send::pipeline::{self, Outgoing};
use crate::shard::send::{devices, reply};
use crate::shard::state::conn::Conn;
use crate::shard::state::users::Allowance;
use crate::shard::state::Shard;

/// `send` with `to`: answered at once unless it must wait for storage.
pub fn on_send(shard: &Rc<Shard>, conn: &Rc<Conn>, send: SendFrame<'_>) {
    if !reply::take_send_allowance(shard, conn, &send.client_msg_id) {
        return;
    }
    if !send.bodies.is_empty() {
        let mut send = send.into_owned();
        devices::normalise(&mut send);
        conn.pause();
        monoio::spawn(check_devices_then_accept(shard.clone(), conn.clone(), send));
        return;
    }
    if pipeline::needs_look_up(shard, conn, &send.client_msg_id) {
        conn.pause();
        monoio::spawn(look_up_then_accept(
            shard.clone(),
            conn.clone(),
            send.into_owned(),
        ));
        return;
    }
    accept(shard, conn, &send);
}

/// The id may be an older send: storage is asked first.
async fn look_up_then_accept(shard: Rc<Shard>, conn: Rc<Conn>, send: SendFrame<'static>) {
    let conversation = ids::direct_conversation_id(&conn.user_id, &send.to);
    if pipeline::ensure_known(&shard, &conn, &send.client_msg_id, &conversation).await {
        accept(&shard, &conn, &send);
    } else {
        reply::not_answered(&shard, &conn, &send.client_msg_id);
    }
    conn.resume();
}

/// A per-device send: refused with the list when it leaves out a current
/// device of either user, else accepted like any other.
async fn check_devices_then_accept(shard: Rc<Shard>, conn: Rc<Conn>, send: SendFrame<'static>) {
    match devices::missing(&shard, &conn, &send).await {
        Ok(missing) if missing.is_empty() => {
            let conversation = ids::direct_conversation_id(&conn.user_id, &send.to);
            if pipeline::ensure_known(&shard, &conn, &send.client_msg_id, &conversation).await {
                accept(&shard, &conn, &send);
            } else {
                reply::not_answered(&shard, &conn, &send.client_msg_id);
            }
        }
        Ok(missing) => devices::refuse_missing(&shard, &conn, &send.client_msg_id, &missing),
        Err(_) => reply::not_answered(&shard, &conn, &send.client_msg_id),
    }
    conn.resume();
}

/// Accepts a send whose id is either known (a replay) or certainly new.
fn accept(shard: &Shard, conn: &Rc<Conn>, send: &SendFrame<'_>) {
    let replayed = pipeline::replay_if_known(shard, conn, &send.client_msg_id);
    let conversation = ids::direct_conversation_id(&conn.user_id, &send.to);
    // The recipient's devices, and the sender's other devices.
    let both = [&*send.to, &*conn.user_id];
    let users = if *send.to == *conn.user_id {
        &both[..1]
    } else {
        &both[..]
    };
    let record_with = |id| MessageRecord {
        bodies: send.bodies.iter().map(|(d, b)| (&**d, &**b)).collect(),
        ..pipeline::record_of_send(conn, send, &conversation, id)
    };
    if let Some(replayed) = replayed {
        if replayed.from_storage {
            let record = record_with((replayed.message_id, replayed.ts));
            pipeline::deliver_again(shard, conn, &record, users);
        }
        return;
    }
    if !pipeline::delete_in_window(shard, conn, send) {
        return;
    }
    let record = record_with(pipeline::next_message_id(shard));
    let out = Outgoing {
        record: &record,
        users,
        sender: Some(conn),
        notice: None,
        hand_off: pipeline::hand_off_of(send),
    };
    let _ = pipeline::store_and_deliver(shard, out);
}

/// Tells the other user's devices, on every node, that this user is typing.
/// Ephemeral: never stored, never held for a syncing device, dropped rather
/// than queued when any queue on the way is full.
pub fn on_typing(shard: &Shard, conn: &Rc<Conn>, to: &str) {
    if *to == *conn.user_id {
        return reply::invalid(shard, conn, None, "`to` must be another user");
    }
    let message = "too many typing frames by this user";
    if !reply::take_allowance(shard, conn, Allowance::Typing, None, message, false) {
        return;
    }
    let conversation = ids::direct_conversation_id(&conn.user_id, to);
    let json = frames::encode_typing(&TypingFrame {
        kind: "typing",
        conversation: &conversation,
        from: &conn.user_id,
        from_device: &conn.device_id,
        expires_ms: shard.config.typing_expires_ms,
    });
    deliver_ephemeral(shard, &[to], json);
    bump(&shard.metrics().typing, 1);
}
