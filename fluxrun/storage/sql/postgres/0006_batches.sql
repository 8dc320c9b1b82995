-- fluxrun schema 6 (PostgreSQL): durable batches (SPEC §7). Forward-only; same shape as
-- the SQLite schema. A batch is one row here plus one run per item, created up front with
-- batch_id and batch_index. status is 'running' until the batch stops on a failed item
-- (continue_on_error false) or is cancelled; its items' progress is counted from the runs.
CREATE TABLE flux_batches (
    id                TEXT PRIMARY KEY,
    name              TEXT NOT NULL,
    total             INTEGER NOT NULL,
    concurrency       INTEGER NOT NULL CHECK (concurrency >= 1),
    continue_on_error BOOLEAN NOT NULL,
    status            TEXT NOT NULL CHECK (status IN ('running', 'stopped', 'cancelled')),
    created_at        TIMESTAMPTZ NOT NULL,
    updated_at        TIMESTAMPTZ NOT NULL
);
CREATE INDEX flux_batches_running ON flux_batches (name, created_at) WHERE status = 'running';
ALTER TABLE flux_runs ADD COLUMN batch_id TEXT;
ALTER TABLE flux_runs ADD COLUMN batch_index INTEGER;
-- Only runs of batches are indexed. The claim counts a batch's running runs (status, owner)
-- and takes its next items in order (status 'pending', owner NULL, by batch_index) from it.
CREATE INDEX flux_runs_batch ON flux_runs (batch_id, status, owner, batch_index)
    WHERE batch_id IS NOT NULL;
