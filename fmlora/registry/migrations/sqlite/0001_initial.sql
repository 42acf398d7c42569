-- The schema fmlora shipped first (kept verbatim: homes made then are upgraded by the files after it).
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE tasks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL CHECK (kind IN ('class', 'domain')),
    status TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    progress TEXT NOT NULL DEFAULT '{}',
    metrics TEXT NOT NULL DEFAULT '{}',
    version INTEGER,
    error TEXT,
    classes TEXT NOT NULL,
    num_train INTEGER NOT NULL,
    num_eval INTEGER NOT NULL,
    idempotency_key TEXT UNIQUE,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX tasks_status ON tasks (status, seq);
CREATE TABLE versions (
    version INTEGER PRIMARY KEY,
    parent INTEGER,
    sha256 TEXT NOT NULL,
    state TEXT NOT NULL,
    tasks TEXT NOT NULL,
    card TEXT NOT NULL,
    created_at TEXT NOT NULL,
    adapter_bytes INTEGER NOT NULL,
    task_id TEXT
);
CREATE TABLE leases (name TEXT PRIMARY KEY, owner TEXT NOT NULL, expires REAL NOT NULL);
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    kind TEXT NOT NULL,
    task_id TEXT,
    version INTEGER,
    detail TEXT NOT NULL DEFAULT '{}'
);
INSERT INTO meta (key, value) VALUES ('live_version', ''), ('live_changes', '0');
