-- fluxrun schema 2 (PostgreSQL): failures that explain themselves (SPEC §6). Same shape as
-- the SQLite schema. A step row keeps its error's qualified type and traceback;
-- flux_attempts keeps every other finished attempt of a step or of its compensation, in the
-- order they were recorded (seq counts from 1 within a run, assigned by the store inside the
-- transition that appends, while the run's row is locked by its compare-and-set).
ALTER TABLE flux_steps ADD COLUMN error_type TEXT;
ALTER TABLE flux_steps ADD COLUMN traceback TEXT;
CREATE TABLE flux_attempts (
    run_id      TEXT NOT NULL REFERENCES flux_runs (id) ON DELETE CASCADE,
    seq         INTEGER NOT NULL,
    idx         INTEGER NOT NULL,
    name        TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    kind        TEXT NOT NULL,
    status      TEXT NOT NULL,
    started_at  TIMESTAMPTZ,
    finished_at TIMESTAMPTZ,
    duration_ms DOUBLE PRECISION,
    error_type  TEXT,
    error       TEXT,
    traceback   TEXT,
    PRIMARY KEY (run_id, seq)
);
