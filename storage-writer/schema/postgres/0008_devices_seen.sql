-- When each device was last seen (it connected or left), so the writer's
-- cleanup thread can remove the per-device rows of devices not seen for
-- --device-retention-ms: cursors, keys, prekeys, push targets. The index
-- finds the oldest without reading the rest.
CREATE TABLE IF NOT EXISTS devices_seen (
    user_id      TEXT   NOT NULL,
    device_id    TEXT   NOT NULL,
    last_seen_ms BIGINT NOT NULL,
    PRIMARY KEY (user_id, device_id)
);
CREATE INDEX IF NOT EXISTS devices_seen_by_time ON devices_seen (last_seen_ms);
-- Devices from before this version count as seen now: the retention runs
-- from the upgrade for them, never from an unknown past.
INSERT INTO devices_seen (user_id, device_id, last_seen_ms)
    SELECT user_id, device_id, (extract(epoch FROM now()) * 1000)::bigint
    FROM (SELECT user_id, device_id FROM cursors
          UNION SELECT user_id, device_id FROM device_keys
          UNION SELECT user_id, device_id FROM push_targets) AS known
ON CONFLICT (user_id, device_id) DO NOTHING;
