-- The same change as sqlite/0002_artifact_store.sql.
ALTER TABLE tasks ADD COLUMN archive_sha256 TEXT;
ALTER TABLE tasks ADD COLUMN archive_bytes BIGINT;
ALTER TABLE versions ADD COLUMN objects TEXT NOT NULL DEFAULT '{}';
INSERT INTO meta (key, value) VALUES ('version_high', '0');
