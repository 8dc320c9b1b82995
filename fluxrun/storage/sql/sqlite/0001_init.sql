-- fluxrun schema 1 (SQLite). Timestamps are integer microseconds since the Unix epoch (UTC);
-- JSON columns hold text written by fluxrun's codec.
CREATE TABLE flux_runs (
    id                 TEXT PRIMARY KEY NOT NULL,
    name               TEXT NOT NULL,
    definition_version TEXT,
    status             TEXT NOT NULL,
    input              TEXT NOT NULL CHECK (json_valid(input)),
    step_names         TEXT NOT NULL CHECK (json_valid(step_names)),
    current_step       INTEGER NOT NULL,
    error              TEXT,
    created_at         INTEGER NOT NULL,
    updated_at         INTEGER NOT NULL,
    completed_at       INTEGER,
    version            INTEGER NOT NULL,
    fence              INTEGER NOT NULL,
    owner              TEXT,
    lease_until        INTEGER,
    claims             INTEGER NOT NULL DEFAULT 0,
    run_after          INTEGER,
    wait_name          TEXT,
    idempotency_key    TEXT,
    parent_id          TEXT
);
CREATE INDEX flux_runs_created ON flux_runs (created_at);
CREATE INDEX flux_runs_name_created ON flux_runs (name, created_at);
CREATE INDEX flux_runs_status_created ON flux_runs (status, created_at);
-- Partial: only runs waiting for a time (timers, backoff) are indexed, and only owned runs
-- by lease, so the per-step write of a run touches neither index.
CREATE INDEX flux_runs_ready ON flux_runs (status, run_after) WHERE run_after IS NOT NULL;
CREATE INDEX flux_runs_lease ON flux_runs (lease_until) WHERE lease_until IS NOT NULL;
CREATE TABLE flux_steps (
    run_id               TEXT NOT NULL REFERENCES flux_runs (id) ON DELETE CASCADE,
    idx                  INTEGER NOT NULL,
    name                 TEXT NOT NULL,
    status               TEXT NOT NULL,
    started_at           INTEGER,
    completed_at         INTEGER,
    suspended_at         INTEGER,
    compensated_at       INTEGER,
    waiting_for          TEXT,
    duration_ms          REAL,
    output               TEXT CHECK (output IS NULL OR json_valid(output)),
    error                TEXT,
    retries              INTEGER NOT NULL,
    changes              TEXT CHECK (changes IS NULL OR json_valid(changes)),
    compensation_changes TEXT CHECK (compensation_changes IS NULL OR json_valid(compensation_changes)),
    fence                INTEGER NOT NULL,
    PRIMARY KEY (run_id, idx)
) WITHOUT ROWID;
