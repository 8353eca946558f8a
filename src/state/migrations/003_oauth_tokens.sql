-- Refresh tokens stored by `nightjar auth login CONNECTION`, one per
-- connection. The state file is kept at mode 0600 because of this table.
CREATE TABLE oauth_tokens (
    connection    TEXT PRIMARY KEY,
    refresh_token TEXT NOT NULL,
    instance_url  TEXT,
    updated_at    TEXT NOT NULL
);
