-- The storage-writer's PostgreSQL schema, migration 1 (the first schema; later
-- changes are the numbered files after it). Ids are 63-bit snowflakes, so they fit BIGINT.

-- Every message, once, in its conversation.
CREATE TABLE IF NOT EXISTS messages (
    conversation TEXT   NOT NULL,
    message_id   BIGINT NOT NULL,
    record       BYTEA  NOT NULL,   -- the ring record, unchanged (body is ciphertext)
    PRIMARY KEY (conversation, message_id)
);

-- Idempotency: the first message id of each (user, device, client message id).
CREATE TABLE IF NOT EXISTS sends (
    user_id       TEXT   NOT NULL,
    device_id     TEXT   NOT NULL,
    client_msg_id TEXT   NOT NULL,
    message_id    BIGINT NOT NULL,
    conversation  TEXT   NOT NULL,
    PRIMARY KEY (user_id, device_id, client_msg_id)
);
CREATE INDEX IF NOT EXISTS sends_by_time ON sends (user_id, device_id, message_id DESC);

-- Each user's inbox: gap-free sequence per user (see inbox_heads).
CREATE TABLE IF NOT EXISTS inbox (
    user_id       TEXT   NOT NULL,
    seq           BIGINT NOT NULL,
    message_id    BIGINT NOT NULL,
    conversation  TEXT   NOT NULL,
    origin_device TEXT   NOT NULL,  -- the sending device when the user sent it, else ''
    PRIMARY KEY (user_id, seq)
);
CREATE UNIQUE INDEX IF NOT EXISTS inbox_by_message ON inbox (user_id, message_id);

-- The last inbox sequence per user. Updated in the same transaction as the
-- inbox row, so its row lock serialises writers on several nodes.
CREATE TABLE IF NOT EXISTS inbox_heads (
    user_id TEXT   PRIMARY KEY,
    seq     BIGINT NOT NULL
);

-- Each device's acknowledgement state (see store/cursor.rs).
CREATE TABLE IF NOT EXISTS cursors (
    user_id   TEXT  NOT NULL,
    device_id TEXT  NOT NULL,
    state     BYTEA NOT NULL,
    PRIMARY KEY (user_id, device_id)
);

-- The end-to-end key directory: each device's public keys (opaque base64),
-- and its one-time prekeys, each handed out once (DELETE ... RETURNING with
-- FOR UPDATE SKIP LOCKED, so concurrent fetches on any node never share one).
CREATE TABLE IF NOT EXISTS device_keys (
    user_id                 TEXT NOT NULL,
    device_id               TEXT NOT NULL,
    identity_key            TEXT NOT NULL,
    signed_prekey           TEXT NOT NULL,
    signed_prekey_signature TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id)
);
CREATE TABLE IF NOT EXISTS prekeys (
    user_id   TEXT      NOT NULL,
    device_id TEXT      NOT NULL,
    key_id    BIGSERIAL NOT NULL,
    prekey    TEXT      NOT NULL,
    PRIMARY KEY (user_id, device_id, key_id)
);

-- Revoked devices: tokens issued before `at_ms` are refused. `device_id`
-- is '' for a revocation of all of the user's devices.
CREATE TABLE IF NOT EXISTS revocations (
    user_id   TEXT   NOT NULL,
    device_id TEXT   NOT NULL,
    at_ms     BIGINT NOT NULL,
    PRIMARY KEY (user_id, device_id)
);

-- Group membership (one row per member; changes arrive as records in ring
-- order, so adding an existing or removing an absent member is a no-op).
CREATE TABLE IF NOT EXISTS group_members (
    group_id TEXT NOT NULL,
    user_id  TEXT NOT NULL,
    PRIMARY KEY (group_id, user_id)
);
CREATE INDEX IF NOT EXISTS groups_by_member ON group_members (user_id, group_id);

-- Each user's latest presence as each node last wrote it (debounced): a
-- user with devices on two nodes is online while either says so.
CREATE TABLE IF NOT EXISTS presence (
    user_id      TEXT    NOT NULL,
    node_id      INTEGER NOT NULL,
    online       BOOLEAN NOT NULL,
    last_seen_ms BIGINT  NOT NULL,
    PRIMARY KEY (user_id, node_id)
);
