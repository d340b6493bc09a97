-- Idempotency keys expire after their window (the storage-writer's cleanup
-- removes them in bounded batches, oldest first): an index to find them.
CREATE INDEX IF NOT EXISTS sends_by_message ON sends (message_id);
