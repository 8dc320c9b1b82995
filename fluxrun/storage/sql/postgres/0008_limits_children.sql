-- fluxrun schema 8 (PostgreSQL): concurrency limits and child workflows (SPEC §7).
-- Forward-only. concurrency_key: the group a run of a workflow with
-- `.concurrency(limit, key=...)` counts in ('' when the limit has no key); NULL for other
-- runs, and for a run started by name whose key no engine has computed yet (the first engine to
-- claim it computes the key and puts the run back, so that the limit decides when it runs).
ALTER TABLE flux_runs ADD COLUMN concurrency_key TEXT;
-- The claim counts the unfinished runs of one workflow and key that hold a slot.
CREATE INDEX flux_runs_limit ON flux_runs (name, concurrency_key, status)
    WHERE concurrency_key IS NOT NULL
    AND status IN ('pending', 'running', 'rolling_back', 'suspended', 'paused');
-- A child run names its parent (parent_id, a column since schema 1): a cancel of the parent
-- finds its children by it.
CREATE INDEX flux_runs_parent ON flux_runs (parent_id) WHERE parent_id IS NOT NULL;
