-- Presence rows of users offline for longer than --presence-retention-ms
-- are removed by the writer's cleanup thread, oldest first, in batches: a
-- partial index finds them without reading the rows of users online now.
CREATE INDEX IF NOT EXISTS presence_offline_by_last_seen ON presence (last_seen_ms) WHERE NOT online;
