-- fluxrun schema (SQLite): every engine whose scheduler runs records itself, for observers
-- (the CLI, the dashboard): where it runs, since when, its last heartbeat (the store's
-- clock), the runs it holds. Forward-only. A worker that stops cleanly sets stopped_at; one
-- that dies keeps its last heartbeat, which then ages.
CREATE TABLE flux_workers (
    id           TEXT PRIMARY KEY NOT NULL,
    host         TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    workflows    TEXT NOT NULL CHECK (json_valid(workflows)),
    concurrency  INTEGER NOT NULL,
    runs_held    INTEGER NOT NULL,
    started_at   INTEGER NOT NULL,
    heartbeat_at INTEGER NOT NULL,
    stopped_at   INTEGER
);
CREATE INDEX flux_workers_heartbeat ON flux_workers (heartbeat_at);
