-- fluxrun schema 3 (SQLite): runs that move on their own (SPEC §5). Forward-only.
-- Every "not now" of a run is status 'suspended' (or a delayed 'pending') plus wait_kind
-- plus run_after (NULL: no timer). A plain step commit writes none of these columns, nor
-- status or the lease, so it touches no index below.
ALTER TABLE flux_runs ADD COLUMN wait_kind TEXT;
-- The durable attempt number of the current step (a crash during backoff keeps it).
ALTER TABLE flux_runs ADD COLUMN attempt INTEGER NOT NULL DEFAULT 0;
ALTER TABLE flux_runs ADD COLUMN requested TEXT CHECK (requested IN ('cancel', 'pause'));
ALTER TABLE flux_runs ADD COLUMN request_reason TEXT;
ALTER TABLE flux_runs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
ALTER TABLE flux_runs ADD COLUMN input_hash TEXT;
-- Schema 1's index on (status, run_after) is replaced by one over the runs that can be due.
DROP INDEX flux_runs_ready;
CREATE INDEX flux_runs_due ON flux_runs (run_after) WHERE status IN ('pending', 'suspended');
CREATE INDEX flux_runs_requested ON flux_runs (requested) WHERE requested IS NOT NULL;
CREATE UNIQUE INDEX flux_runs_idempotency ON flux_runs (name, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- The signal inbox: seq counts from 1 within a run (assigned by the store while it holds
-- the write lock); a dedupe key is unique per run (NULL keys never collide).
CREATE TABLE flux_signals (
    run_id           TEXT NOT NULL REFERENCES flux_runs (id) ON DELETE CASCADE,
    seq              INTEGER NOT NULL,
    name             TEXT NOT NULL,
    payload          TEXT NOT NULL CHECK (json_valid(payload)),
    dedupe_key       TEXT,
    created_at       INTEGER NOT NULL,
    consumed_by_step INTEGER,
    consumed_at      INTEGER,
    PRIMARY KEY (run_id, seq),
    UNIQUE (run_id, dedupe_key)
) WITHOUT ROWID;
CREATE INDEX flux_signals_pending ON flux_signals (run_id, name, seq)
    WHERE consumed_by_step IS NULL;
