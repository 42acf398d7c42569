-- Objects in the artifact store: a task's archive and a version's objects, each with its sha256.
ALTER TABLE tasks ADD COLUMN archive_sha256 TEXT;
ALTER TABLE tasks ADD COLUMN archive_bytes INTEGER;
ALTER TABLE versions ADD COLUMN objects TEXT NOT NULL DEFAULT '{}';
-- The highest version number ever handed out: a number whose publish crashed is never reused.
INSERT INTO meta (key, value) VALUES ('version_high', '0');
