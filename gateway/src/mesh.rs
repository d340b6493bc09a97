//! Shard-to-shard messaging: one bounded queue per (sender, receiver) pair, built at start-up.
//!
//! Owns the queues, the per-receiver wake-up and the message types that cross
//! threads. Each queue has exactly one producer thread and one consumer thread,
//! so no two shards ever contend on a queue. A full queue hands the message back
//! to the sender (`Err(message)`), which decides: refuse with `overloaded`,
//! answer 503. Nothing here blocks or drops silently.
//!
//! Wake-up: the receiver registers its inbox task's waker in an `AtomicWaker`;
//! a sender wakes it after pushing. `AtomicWaker` hands the waker out once per
//! registration, so a burst of pushes costs one cross-thread wake (monoio's
//! eventfd unpark), not one per message.

use std::future::poll_fn;
use std::net::TcpStream;
use std::task::Poll;

use atomic_waker::AtomicWaker;
use bytes::Bytes;
use crossbeam_queue::ArrayQueue;
use crossbeam_utils::CachePadded;

/// Capacity of the queue for control messages from outside the shards (signals).
const EXTERNAL_QUEUE_CAPACITY: usize = 16;

/// Something one shard (or the node's control thread) asks another to do.
#[derive(Debug)]
pub enum ShardMessage {
    /// Take over an authenticated socket whose user is homed on the receiver.
    /// Boxed: hand-offs are rare next to deliveries, and a small enum keeps
    /// every queue slot small.
    Adopt(Box<Handoff>),
    /// Deliver an encoded frame to every device of a user homed on the receiver.
    Deliver(Delivery),
    /// Deliver one encoded frame to every device of several users homed on
    /// the receiver (a group's members there): one hand-off per shard, not
    /// one per member.
    DeliverMany(Box<ManyDelivery>),
    /// Deliver each addressed device of a user its own frame (a message
    /// with per-device ciphertexts).
    DeliverPerDevice(Box<PerDeviceDelivery>),
    /// A group's membership changed: forget its cached member list.
    GroupChanged(Box<str>),
    /// Stop accepting and close every connection over the drain window.
    Drain,
    /// Messages for this user reach this node now (it is the user's home,
    /// or registered there): its devices' connect-time syncs may start
    /// (they would otherwise race a message published just before).
    InterestActive(Box<str>),
    /// The backplane was away and is back: sync every device, spread out,
    /// from the messages made since `since_unix_ms`.
    Resync { since_unix_ms: u64 },
    /// Revoke a device (or all of a user's devices) of a user homed on the
    /// receiver: store it first when `order` is set (an operator asked this
    /// node), then close the revoked devices' connections here (and, when
    /// the order says so, delete the account).
    Revoke(Box<Revocation>),
    /// This user's home node moved and the fleet has seen it: its devices
    /// here sync every message made since `since_unix_ms` (a sender using
    /// the old home may have sent some meanwhile).
    ResyncUser { user: Box<str>, since_unix_ms: u64 },
}

/// A revocation on its way to the user's home shard.
#[derive(Debug)]
pub struct Revocation {
    pub user: Box<str>,
    /// `None`: every device of the user.
    pub device: Option<Box<str>>,
    /// Present when this node stores the revocation and answers the
    /// operator; absent when another node stored it (close connections only).
    pub order: Option<RevokeOrder>,
}

/// What the admin thread waits for.
#[derive(Debug)]
pub struct RevokeOrder {
    pub at_unix_ms: u64,
    /// Delete the account too (every device; `Revocation::device` is
    /// `None`): once the revocation is stored and the connections closed,
    /// every other row of the user goes.
    pub delete_account: bool,
    pub answer: std::sync::mpsc::SyncSender<Result<RevokeOutcome, String>>,
}

#[derive(Debug, Clone, Copy)]
pub struct RevokeOutcome {
    /// Devices whose keys left the key directory.
    pub keys_removed: u32,
    /// Connections of the revoked devices closed on this node.
    pub closed_here: usize,
    /// Rows of the account removed (0 unless it was deleted).
    pub rows_removed: u64,
}

/// An authenticated connection in transit to its user's home shard. The 101
/// response has not been written yet: the home shard writes it.
#[derive(Debug)]
pub struct Handoff {
    pub socket: TcpStream,
    pub user_id: String,
    pub device_id: String,
    pub accept_key: String,
    /// Bytes the client sent after its upgrade request (its first frames).
    pub early_bytes: Vec<u8>,
    /// The connection's TLS session, handshake done (`wss://` listener).
    pub tls: Option<Box<rustls::ServerConnection>>,
}

#[derive(Debug)]
pub struct Delivery {
    pub to_user: Box<str>,
    /// Lets a device that is syncing drop a live copy it already got from storage.
    pub message_id: u64,
    /// A complete WebSocket text frame, shared by every device it goes to.
    pub frame: Bytes,
}

#[derive(Debug)]
pub struct ManyDelivery {
    pub to_users: Vec<Box<str>>,
    pub message_id: u64,
    pub frame: Bytes,
}

#[derive(Debug)]
pub struct PerDeviceDelivery {
    pub to_user: Box<str>,
    pub message_id: u64,
    /// (device, its complete WebSocket frame).
    pub frames: Vec<(Box<str>, Bytes)>,
}

/// The node's queues. Shared (`Arc`) by every shard thread.
pub struct Mesh {
    shard_count: usize,
    /// `lanes[receiver * (shard_count + 1) + sender]`; sender `shard_count` is external.
    lanes: Vec<ArrayQueue<ShardMessage>>,
    wakers: Vec<CachePadded<AtomicWaker>>,
}

/// Who is sending: a shard, or the node's control thread.
#[derive(Debug, Clone, Copy)]
pub enum Sender {
    Shard(usize),
    External,
}

impl Mesh {
    pub fn new(shard_count: usize, capacity: usize) -> Self {
        assert!(shard_count > 0 && capacity > 0);
        let senders = shard_count + 1;
        let lanes = (0..shard_count * senders)
            .map(|index| {
                let external = index % senders == shard_count;
                ArrayQueue::new(if external {
                    EXTERNAL_QUEUE_CAPACITY
                } else {
                    capacity
                })
            })
            .collect();
        let wakers = (0..shard_count)
            .map(|_| CachePadded::new(AtomicWaker::new()))
            .collect();
        Self {
            shard_count,
            lanes,
            wakers,
        }
    }

    pub fn shard_count(&self) -> usize {
        self.shard_count
    }

    fn lane(&self, receiver: usize, sender: Sender) -> &ArrayQueue<ShardMessage> {
        let sender = match sender {
            Sender::Shard(index) => index,
            Sender::External => self.shard_count,
        };
        &self.lanes[receiver * (self.shard_count + 1) + sender]
    }

    /// Queues `message` for `receiver` and wakes it. A full queue gives the message back.
    pub fn send(
        &self,
        sender: Sender,
        receiver: usize,
        message: ShardMessage,
    ) -> Result<(), ShardMessage> {
        self.lane(receiver, sender).push(message)?;
        self.wakers[receiver].wake();
        Ok(())
    }

    /// Whether `sender`'s lane to `receiver` can take one more message. Each
    /// lane has one producer, so for that producer a true answer holds until
    /// it sends.
    pub fn has_room(&self, sender: Sender, receiver: usize) -> bool {
        !self.lane(receiver, sender).is_full()
    }

    /// Waits until `receiver` has something queued.
    pub async fn wait(&self, receiver: usize) {
        poll_fn(|cx| {
            self.wakers[receiver].register(cx.waker());
            if self.depth(receiver) > 0 {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// Takes up to `budget` messages for `receiver`, round-robin over senders so
    /// one busy sender cannot starve the others. Returns how many it took.
    pub fn drain(
        &self,
        receiver: usize,
        budget: usize,
        mut handle: impl FnMut(ShardMessage),
    ) -> usize {
        let mut taken = 0;
        loop {
            let before = taken;
            for sender in (0..self.shard_count)
                .map(Sender::Shard)
                .chain([Sender::External])
            {
                if taken == budget {
                    return taken;
                }
                if let Some(message) = self.lane(receiver, sender).pop() {
                    handle(message);
                    taken += 1;
                }
            }
            if taken == before {
                return taken;
            }
        }
    }

    /// Messages waiting for `receiver`, for /metrics and the wait condition.
    pub fn depth(&self, receiver: usize) -> usize {
        let start = receiver * (self.shard_count + 1);
        self.lanes[start..start + self.shard_count + 1]
            .iter()
            .map(ArrayQueue::len)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(to: &str) -> ShardMessage {
        ShardMessage::Deliver(Delivery {
            to_user: to.into(),
            message_id: 1,
            frame: Bytes::new(),
        })
    }

    #[test]
    fn a_full_queue_hands_the_message_back() {
        let mesh = Mesh::new(2, 16);
        for _ in 0..16 {
            mesh.send(Sender::Shard(0), 1, delivery("bob")).unwrap();
        }
        let refused = mesh
            .send(Sender::Shard(0), 1, delivery("carol"))
            .unwrap_err();
        assert!(matches!(refused, ShardMessage::Deliver(d) if &*d.to_user == "carol"));
        // Another sender's lane to the same receiver is unaffected.
        mesh.send(Sender::Shard(1), 1, delivery("dave")).unwrap();
        assert_eq!(mesh.depth(1), 17);
    }

    #[test]
    fn drain_keeps_each_senders_order_and_respects_the_budget() {
        let mesh = Mesh::new(2, 64);
        for index in 0..10 {
            mesh.send(Sender::Shard(0), 1, delivery(&format!("a{index}")))
                .unwrap();
        }
        let mut seen = Vec::new();
        let taken = mesh.drain(1, 4, |message| {
            if let ShardMessage::Deliver(d) = message {
                seen.push(d.to_user.to_string());
            }
        });
        assert_eq!(taken, 4);
        assert_eq!(seen, ["a0", "a1", "a2", "a3"]);
        assert_eq!(mesh.drain(1, 100, |_| {}), 6);
        assert_eq!(mesh.depth(1), 0);
    }

    #[test]
    fn messages_cross_threads_in_order() {
        let mesh = std::sync::Arc::new(Mesh::new(2, 1024));
        let producer = {
            let mesh = mesh.clone();
            std::thread::spawn(move || {
                for index in 0..10_000u32 {
                    let mut message = delivery(&index.to_string());
                    while let Err(back) = mesh.send(Sender::Shard(0), 1, message) {
                        message = back;
                        std::thread::yield_now();
                    }
                }
            })
        };
        let mut expected = 0u32;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while expected < 10_000 && std::time::Instant::now() < deadline {
            mesh.drain(1, 256, |message| {
                let ShardMessage::Deliver(d) = message else {
                    panic!("only deliveries were sent")
                };
                assert_eq!(d.to_user.parse::<u32>().unwrap(), expected);
                expected += 1;
            });
        }
        producer.join().unwrap();
        assert_eq!(expected, 10_000);
    }
}
