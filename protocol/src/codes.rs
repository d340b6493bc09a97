//! Stable error codes (sent in `error` frames) and WebSocket close codes.
//!
//! These strings and numbers are the contract in `docs/protocol.md`: clients
//! switch on them, so they never change meaning. Owns no state.

/// The `code` of an `error` frame. The connection stays open after any of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The text frame is not a JSON object.
    MalformedJson,
    /// `type` is missing or names no frame of this protocol version.
    UnknownType,
    /// A field is missing, of the wrong type, or breaks its rule (the message says which).
    InvalidField,
    /// `body` is longer than the node's `body_bytes_max`.
    BodyTooLarge,
    /// The node cannot take this frame now (a queue is full). Retry the same frame later.
    Overloaded,
    /// Over a rate limit (frames per connection, or sends per user across all
    /// of the user's devices). The frame was not processed; retry after `retry_after_ms`.
    RateLimited,
    /// The user may not do this (e.g. read a conversation they are not in).
    Forbidden,
    /// Storage could not answer now (it is restarting or behind). Retry later.
    Unavailable,
    /// The group would have more members than the node allows.
    GroupFull,
    /// A send with `bodies` left out a current device of the recipient or
    /// of the sender's other devices; the `devices` field lists them.
    MissingDevices,
}

/// Every error code, for metrics.
pub const ERROR_CODES: [ErrorCode; 10] = [
    ErrorCode::MalformedJson,
    ErrorCode::UnknownType,
    ErrorCode::InvalidField,
    ErrorCode::BodyTooLarge,
    ErrorCode::Overloaded,
    ErrorCode::RateLimited,
    ErrorCode::Forbidden,
    ErrorCode::Unavailable,
    ErrorCode::GroupFull,
    ErrorCode::MissingDevices,
];

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::MalformedJson => "malformed_json",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::InvalidField => "invalid_field",
            ErrorCode::BodyTooLarge => "body_too_large",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::GroupFull => "group_full",
            ErrorCode::MissingDevices => "missing_devices",
        }
    }

    /// True when the client caused it (counts toward the abuse limit); false
    /// when the node did and a retry of the same frame may succeed.
    pub fn is_client_fault(self) -> bool {
        !matches!(self, ErrorCode::Overloaded | ErrorCode::Unavailable)
    }

    /// Index into per-code metric arrays.
    pub fn index(self) -> usize {
        ERROR_CODES
            .iter()
            .position(|code| *code == self)
            .unwrap_or(0)
    }
}

/// WebSocket close codes the gateway sends, with the reason text it sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseCode {
    /// 1000: the client closed, we answered.
    Normal,
    /// 1002: WebSocket framing broken (unmasked frame, reserved bits, bad opcode).
    ProtocolError,
    /// 1003: a binary frame; protocol v1 is JSON text.
    UnsupportedData,
    /// 1007: a text frame that is not UTF-8.
    InvalidPayload,
    /// 1008: too many protocol errors in a short time.
    PolicyViolation,
    /// 1009: a frame or message larger than `message_bytes_max`.
    MessageTooBig,
    /// 1011: the node hit an internal error on this connection.
    InternalError,
    /// 1012: the node is draining; reconnect (to another node) after a short random delay.
    ServiceRestart,
    /// 1013: storage did not answer while the connection started; reconnect after a delay.
    TryAgainLater,
    /// 4000: nothing received for `heartbeat_timeout_ms`.
    HeartbeatTimeout,
    /// 4001: the client did not read fast enough and its send queue filled.
    SlowConsumer,
    /// 4003: an operator revoked this device (or all of the user's devices):
    /// its token no longer works; do not reconnect with it.
    Revoked,
    /// 4004: the user deleted their account (or an operator did): every
    /// row of theirs is gone and their tokens no longer work.
    AccountDeleted,
}

/// Every close code, for metrics.
pub const CLOSE_CODES: [CloseCode; 13] = [
    CloseCode::Normal,
    CloseCode::ProtocolError,
    CloseCode::UnsupportedData,
    CloseCode::InvalidPayload,
    CloseCode::PolicyViolation,
    CloseCode::MessageTooBig,
    CloseCode::InternalError,
    CloseCode::ServiceRestart,
    CloseCode::TryAgainLater,
    CloseCode::HeartbeatTimeout,
    CloseCode::SlowConsumer,
    CloseCode::Revoked,
    CloseCode::AccountDeleted,
];

impl CloseCode {
    pub fn code(self) -> u16 {
        match self {
            CloseCode::Normal => 1000,
            CloseCode::ProtocolError => 1002,
            CloseCode::UnsupportedData => 1003,
            CloseCode::InvalidPayload => 1007,
            CloseCode::PolicyViolation => 1008,
            CloseCode::MessageTooBig => 1009,
            CloseCode::InternalError => 1011,
            CloseCode::ServiceRestart => 1012,
            CloseCode::TryAgainLater => 1013,
            CloseCode::HeartbeatTimeout => 4000,
            CloseCode::SlowConsumer => 4001,
            CloseCode::Revoked => 4003,
            CloseCode::AccountDeleted => 4004,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            CloseCode::Normal => "bye",
            CloseCode::ProtocolError => "websocket protocol error",
            CloseCode::UnsupportedData => "binary frames are not supported",
            CloseCode::InvalidPayload => "text frame is not utf-8",
            CloseCode::PolicyViolation => "too many protocol errors",
            CloseCode::MessageTooBig => "message too big",
            CloseCode::InternalError => "internal error",
            CloseCode::ServiceRestart => "node draining, reconnect",
            CloseCode::TryAgainLater => "storage unavailable, reconnect later",
            CloseCode::HeartbeatTimeout => "heartbeat timeout",
            CloseCode::SlowConsumer => "slow consumer",
            CloseCode::Revoked => "device revoked",
            CloseCode::AccountDeleted => "account deleted",
        }
    }

    pub fn index(self) -> usize {
        CLOSE_CODES
            .iter()
            .position(|code| *code == self)
            .unwrap_or(0)
    }
}
