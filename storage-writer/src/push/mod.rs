//! Push for devices that are not connected: after a message is durable,
//! each recipient device with a push target that has not acknowledged it
//! within `ack_wait` is woken through APNs, FCM or Web Push.
//!
//! The files: the settings (`settings.rs`), the bounded hand-off from the
//! commit thread and starting it all (`handle.rs`: `PushHandle::offer` never
//! blocks, a full queue is counted), the per-provider counters
//! (`stats.rs`), a push and its outcome (`job.rs`). The deciding (`worker.rs`: waits, checks
//! acknowledgements, coalesces, prunes) runs on its own thread with its own
//! storage handle; the sending (`send.rs` and one file per provider) on its
//! own thread's async runtime. Neither ever touches the commit path beyond
//! the offer, and no credential is ever logged.

mod apns;
mod fcm;
mod handle;
mod job;
mod send;
mod settings;
mod stats;
mod webpush;
mod worker;

pub use handle::{start, PushHandle};
pub use settings::PushArgs;
pub use stats::{ProviderStats, PushStats, FAILURES, PROVIDERS};
