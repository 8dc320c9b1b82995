-- fluxrun schema 1 (PostgreSQL). Same shape as the SQLite schema. JSON columns are jsonb and
-- hold text written by fluxrun's codec; timestamps are timestamptz (microseconds, UTC).
-- seq is the insertion order, the tie-breaker when two runs share created_at.
CREATE TABLE flux_runs (
    id                 TEXT PRIMARY KEY,
    seq                BIGINT GENERATED ALWAYS AS IDENTITY,
    name               TEXT NOT NULL,
    definition_version TEXT,
    status             TEXT NOT NULL,
    input              JSONB NOT NULL,
    step_names         JSONB NOT NULL,
    current_step       INTEGER NOT NULL,
    error              TEXT,
    created_at         TIMESTAMPTZ NOT NULL,
    updated_at         TIMESTAMPTZ NOT NULL,
    completed_at       TIMESTAMPTZ,
    version            BIGINT NOT NULL,
    fence              BIGINT NOT NULL,
    owner              TEXT,
    lease_until        TIMESTAMPTZ,
    claims             INTEGER NOT NULL DEFAULT 0,
    run_after          TIMESTAMPTZ,
    wait_name          TEXT,
    idempotency_key    TEXT,
    parent_id          TEXT
) WITH (fillfactor = 80);  -- room for in-place (HOT) updates of a run per step
CREATE INDEX flux_runs_created ON flux_runs (created_at, seq);
CREATE INDEX flux_runs_name_created ON flux_runs (name, created_at, seq);
CREATE INDEX flux_runs_status_created ON flux_runs (status, created_at, seq);
-- Partial: only runs waiting for a time (timers, backoff) are indexed, and only owned runs
-- by lease, so the per-step write of a run touches neither index.
CREATE INDEX flux_runs_ready ON flux_runs (status, run_after) WHERE run_after IS NOT NULL;
CREATE INDEX flux_runs_lease ON flux_runs (lease_until) WHERE lease_until IS NOT NULL;
CREATE TABLE flux_steps (
    run_id               TEXT NOT NULL REFERENCES flux_runs (id) ON DELETE CASCADE,
    idx                  INTEGER NOT NULL,
    name                 TEXT NOT NULL,
    status               TEXT NOT NULL,
    started_at           TIMESTAMPTZ,
    completed_at         TIMESTAMPTZ,
    suspended_at         TIMESTAMPTZ,
    compensated_at       TIMESTAMPTZ,
    waiting_for          TEXT,
    duration_ms          DOUBLE PRECISION,
    output               JSONB,
    error                TEXT,
    retries              INTEGER NOT NULL,
    changes              JSONB,
    compensation_changes JSONB,
    fence                BIGINT NOT NULL,
    PRIMARY KEY (run_id, idx)
);
