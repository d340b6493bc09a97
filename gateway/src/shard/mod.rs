//! A shard: one pinned thread running one monoio runtime, owning its
//! listener, its connections and the user table of the users homed on it.
//!
//! The folder reads bottom to top; each layer imports only the layers below:
//!
//! | layer | files | owns |
//! |---|---|---|
//! | state | `state/` | `Shard` and what it holds: `Conn`, the user table, allowances, idempotency, the ring, the read-path client, the group/receipt/presence caches |
//! | send | `send/reply`, `send/deliver`, `send/members`, `send/devices`, `send/pipeline` | answers to clients; queuing frames to devices here, on other shards and nodes; member lists; the per-device check; **the one send pipeline** |
//! | features | `features/` | direct messages, groups, receipts, presence, keys, sync/history/ack: what a frame means; never each other |
//! | dispatch | `dispatch.rs` | a decoded client frame to its feature, nothing else |
//! | socket | `socket.rs` | one connection's read/write task |
//! | accept | `accept.rs`, `echo.rs` | accept, handshake, hand-off to the home shard, adoption; the test-only echo endpoint |
//! | runtime | `runtime.rs` | the thread, the runtime, the long-lived tasks, drain |
//!
//! Everything here is touched only by its shard's thread (`Rc`, `RefCell`,
//! never `Arc<Mutex>`); other threads reach a shard only through `Mesh`.

mod accept;
mod dispatch;
mod echo;
mod features;
mod runtime;
mod send;
mod socket;
mod state;

pub use runtime::{run, ShardSetup, WRITER_SOCKET};
