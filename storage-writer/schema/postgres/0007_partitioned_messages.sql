-- Hot retention: `messages` and `inbox` become tables partitioned by range of
-- message id. A snowflake id starts with its time, so each partition holds
-- the messages of one time window (`--postgres-partition-ms`, a day by
-- default). The writer creates partitions ahead of time and drops whole
-- partitions once retention has passed their window (`--message-retention-ms`):
-- no row-by-row DELETE, no vacuum debt.
--
-- Upgrade in place: the existing tables become each parent's DEFAULT
-- partition, unchanged (no row is copied). Rows that find no range partition
-- land there too, so a write never fails for want of one. The writer removes
-- the old rows of DEFAULT partitions in bounded batches (their `message_id`
-- index below), and creates a range partition only for a window DEFAULT has
-- no rows in (PostgreSQL checks).
--
-- `inbox`'s primary key gains `message_id` (a partitioned table's unique keys
-- must hold the partition key). A sequence stays unique per user: it is
-- reserved under the `inbox_heads` row lock.

ALTER TABLE messages RENAME TO messages_default;
ALTER TABLE messages_default RENAME CONSTRAINT messages_pkey TO messages_default_pkey;
CREATE TABLE messages (
    conversation TEXT   NOT NULL,
    message_id   BIGINT NOT NULL,
    record       BYTEA  NOT NULL,
    PRIMARY KEY (conversation, message_id)
) PARTITION BY RANGE (message_id);
ALTER TABLE messages ATTACH PARTITION messages_default DEFAULT;
CREATE INDEX IF NOT EXISTS messages_default_by_id ON messages_default (message_id);

ALTER TABLE inbox RENAME TO inbox_default;
-- Its key becomes the parent's (built once, when it is attached).
ALTER TABLE inbox_default DROP CONSTRAINT inbox_pkey;
ALTER INDEX inbox_by_message RENAME TO inbox_default_by_message;
CREATE TABLE inbox (
    user_id       TEXT   NOT NULL,
    seq           BIGINT NOT NULL,
    message_id    BIGINT NOT NULL,
    conversation  TEXT   NOT NULL,
    origin_device TEXT   NOT NULL,
    PRIMARY KEY (user_id, seq, message_id)
) PARTITION BY RANGE (message_id);
CREATE UNIQUE INDEX inbox_by_message ON inbox (user_id, message_id);
ALTER TABLE inbox ATTACH PARTITION inbox_default DEFAULT;
CREATE INDEX IF NOT EXISTS inbox_default_by_id ON inbox_default (message_id);
