//! Every limit of the wire formats, in one place, each with one name.
//!
//! Owns the bounds that a client frame, a ring record and a read-path frame
//! are checked against on decode; the modules that parse them re-export the
//! names they use. A limit of the *node* (queues, tables, timeouts) is not
//! here: those are in the gateway's typed config or its `limits` module.
//! Never changes a number without a record or frame version saying so: the
//! gateway and the storage-writer are two processes that must agree.

// --- ids -----------------------------------------------------------------

/// Longest user, device, group or client message id, in bytes. Ids are
/// hashed, copied into records and keys: 64 bytes holds a UUID, a phone
/// number or a 256-bit hex hash with room to spare.
pub const ID_LENGTH_MAX: usize = 64;

// --- client frames (JSON) ------------------------------------------------

/// Most members one membership change (`group_create`, `group_add`,
/// `group_remove`) may list: a quarter of `RECIPIENTS_MAX`, so a change that
/// names this many still fits a record with every member as a recipient.
pub const GROUP_CHANGE_MEMBERS_MAX: usize = 1024;
/// Most devices one send's `bodies` may name (the recipient's and the
/// sender's together). The Signal server links at most 6 devices per user:
/// 32 leaves room for both users with a margin.
pub const BODIES_DEVICES_MAX: usize = 32;
/// Most users one `presence` query may ask about: a chat list's visible
/// screen, and a bound on the storage reads one frame can cause.
pub const PRESENCE_QUERY_USERS_MAX: usize = 32;
/// Most messages one `history` request returns (one page of a scroll-back).
pub const HISTORY_LIMIT_MAX: u16 = 100;
/// What `history` returns when the client names no `limit`.
pub const HISTORY_LIMIT_DEFAULT: u16 = 50;
/// Largest attachment a `media` reference may announce: 2 GiB, the upload
/// limit of the common object stores' single-part uploads we expect clients to use.
pub const MEDIA_BYTES_MAX: u64 = 2 * 1024 * 1024 * 1024;
/// Longest `media.url`, in bytes: the practical URL limit of browsers and CDNs.
pub const MEDIA_URL_BYTES_MAX: usize = 2048;
/// Longest base64 key in a `keys_upload`, in characters (a post-quantum
/// KEM public key in base64 is about 1.6 KB; classic keys are 44).
pub const KEY_CHARS_MAX: usize = 1024;
/// Most one-time prekeys one `keys_upload` carries.
pub const UPLOAD_PREKEYS_MAX: usize = 100;
/// Most one-time prekeys stored per device; an upload past it is refused.
pub const STORED_PREKEYS_MAX: u32 = 1000;

// --- ring records (binary) -----------------------------------------------

/// Most recipients of one message record (a group's members). The gateway's
/// `group_members_max` may not exceed it (checked at start-up).
pub const RECIPIENTS_MAX: usize = 4096;
/// Most receipts one stored receipt batch carries; the shard's batcher
/// flushes a batch that reaches it.
pub const RECEIPTS_PER_RECORD_MAX: usize = 1024;
/// Most users one presence record reports; a shard writes presence in
/// records of at most this many users (about 40 KB each).
pub const PRESENCE_RECORD_USERS_MAX: usize = 1024;

// --- the read path to the storage-writer (binary) ------------------------

/// Largest read-path frame, in bytes (a sync page is cut well below it).
pub const READ_FRAME_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Most users one read-path request names (a presence query, a device
/// list). At least `PRESENCE_QUERY_USERS_MAX`, so no valid query is refused.
pub const READ_USERS_MAX: usize = 64;
const _: () = assert!(READ_USERS_MAX >= PRESENCE_QUERY_USERS_MAX);

// --- WebSocket and HTTP (RFC 6455, RFC 9112) -----------------------------

/// Longest WebSocket frame header: 2 bytes, 8 of extended length, 4 of mask.
pub const WS_HEADER_BYTES_MAX: usize = 14;
/// Longest control-frame payload (RFC 6455 §5.5).
pub const WS_CONTROL_PAYLOAD_MAX: u64 = 125;
/// Most HTTP headers an upgrade request may carry. Browsers send 10-20.
pub const UPGRADE_HEADERS_MAX: usize = 32;

// --- push targets (`push_register`) --------------------------------------

/// Longest APNs device token, in hex characters. Tokens are 32 bytes (64
/// hex characters) today; Apple says they may grow, so up to 100 bytes.
pub const PUSH_APNS_TOKEN_CHARS_MAX: usize = 200;
/// Longest APNs topic (a bundle id, with an optional `.voip`-style suffix).
pub const PUSH_TOPIC_CHARS_MAX: usize = 255;
/// Longest FCM registration token (about 160 characters today).
pub const PUSH_FCM_TOKEN_CHARS_MAX: usize = 4096;
/// Longest Web Push endpoint URL (browsers' push services use 150-500 bytes).
pub const PUSH_ENDPOINT_BYTES_MAX: usize = 1024;
