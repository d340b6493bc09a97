-- Where each device wants to be woken while it is not connected: a
-- chat_protocol::push::PushTarget in its stored form (JSON). One per device;
-- a registration replaces it, an unregistration, a revocation or a provider's
-- "invalid token" answer removes it.
CREATE TABLE IF NOT EXISTS push_targets (
    user_id    TEXT   NOT NULL,
    device_id  TEXT   NOT NULL,
    target     BYTEA  NOT NULL,
    updated_ms BIGINT NOT NULL,
    PRIMARY KEY (user_id, device_id)
);
