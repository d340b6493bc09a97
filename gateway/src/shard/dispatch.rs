//! The dispatcher: a client's text frame, decoded, handed to its feature.
//!
//! Owns the order of the first checks every text frame passes (valid UTF-8,
//! else 1007; the connection's frame allowance, before parsing; a frame
//! that does not decode is answered with its error code) and the mapping
//! from each `ClientFrame` to the feature that handles it. Nothing else:
//! what a frame means is the feature's, and storing and answering is the
//! pipeline's.

use std::rc::Rc;

use chat_protocol::codes::CloseCode;
use chat_protocol::frames::{self, ClientFrame};
use chat_protocol::records::ReceiptStatus;

use super::features::{direct, groups, keys, presence, push, receipts, revocation, sync};
use super::send::reply;
use super::state::conn::Conn;
use super::state::Shard;

/// Handles one complete text message from `conn`.
pub fn on_text(shard: &Rc<Shard>, conn: &Rc<Conn>, text: &[u8]) {
    if std::str::from_utf8(text).is_err() {
        conn.request_close(CloseCode::InvalidPayload);
        return;
    }
    if !reply::take_frame(shard, conn) {
        return;
    }
    let frame = match frames::decode_client_frame(text, shard.config.body_bytes_max) {
        Ok(frame) => frame,
        Err(error) => return reply::frame_error(shard, conn, error),
    };
    match frame {
        ClientFrame::Ping => {
            conn.enqueue(shard.pong_frame.clone());
        }
        ClientFrame::Send(send) if send.group => groups::on_send(shard, conn, send),
        ClientFrame::Send(send) => direct::on_send(shard, conn, send),
        ClientFrame::Typing { to, group: false } => direct::on_typing(shard, conn, &to),
        ClientFrame::Typing { to, group: true } => groups::on_typing(shard, conn, &to),
        ClientFrame::GroupChange(change) => groups::on_change(shard, conn, change),
        ClientFrame::GroupMembers { group } => {
            let task = groups::list_members(shard.clone(), conn.clone(), group.into_owned());
            monoio::spawn(task);
        }
        ClientFrame::Ack {
            message_id,
            receipt,
        } => {
            sync::on_ack(shard, conn, message_id);
            if let Some(receipt) = receipt {
                receipts::on_receipt(shard, conn, receipt, ReceiptStatus::Delivered);
            }
        }
        ClientFrame::Read(receipt) => {
            receipts::on_receipt(shard, conn, receipt, ReceiptStatus::Read);
        }
        ClientFrame::Presence { users } => presence::on_query(shard, conn, users),
        ClientFrame::KeysUpload(upload) => keys::on_upload(shard, conn, upload),
        ClientFrame::Devices { user } => keys::on_devices(shard, conn, &user),
        ClientFrame::KeysFetch { user } => keys::on_fetch(shard, conn, &user),
        ClientFrame::Sync { after } => sync::on_request(shard, conn, after),
        ClientFrame::PushRegister { client_id, target } => {
            push::on_register(shard, conn, &client_id, target)
        }
        ClientFrame::PushUnregister { client_id } => push::on_unregister(shard, conn, &client_id),
        ClientFrame::History {
            conversation,
            before,
            limit,
        } => sync::on_history(shard, conn, &conversation, before, limit),
        ClientFrame::DeleteAccount { client_id, user } => {
            revocation::on_delete_account(shard, conn, client_id.as_deref(), &user)
        }
    }
}
