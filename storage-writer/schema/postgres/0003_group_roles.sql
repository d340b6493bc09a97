-- Group roles: who may add, remove and promote (the creator, and whom an
-- admin promotes), and when each member joined (the id of the change that
-- added them), where their history starts. Rows from before this step have
-- no admin and joined_id 0: such a group is managed by any member, as before.
ALTER TABLE group_members ADD COLUMN IF NOT EXISTS admin BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE group_members ADD COLUMN IF NOT EXISTS joined_id BIGINT NOT NULL DEFAULT 0;
