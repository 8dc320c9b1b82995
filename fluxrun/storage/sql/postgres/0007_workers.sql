-- fluxrun schema (PostgreSQL): every engine whose scheduler runs records itself, for
-- observers (the CLI, the dashboard): where it runs, since when, its last heartbeat (the
-- database's clock), the runs it holds. Forward-only. A worker that stops cleanly sets
-- stopped_at; one that dies keeps its last heartbeat, which then ages.
CREATE TABLE flux_workers (
    id           TEXT PRIMARY KEY NOT NULL,
    host         TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    workflows    JSONB NOT NULL,
    concurrency  INTEGER NOT NULL,
    runs_held    INTEGER NOT NULL,
    started_at   TIMESTAMPTZ NOT NULL,
    heartbeat_at TIMESTAMPTZ NOT NULL,
    stopped_at   TIMESTAMPTZ
);
CREATE INDEX flux_workers_heartbeat ON flux_workers (heartbeat_at);
