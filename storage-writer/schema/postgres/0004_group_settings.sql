-- Group settings: whether only a group's admins post (`group_restrict`,
-- `group_open`). A group without a row lets every member post, as before.
CREATE TABLE IF NOT EXISTS group_settings (
    group_id    TEXT PRIMARY KEY,
    admins_only BOOLEAN NOT NULL DEFAULT false
);
