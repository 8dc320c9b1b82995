-- fluxrun schema 4 (PostgreSQL): a run that stops to wait keeps a snapshot of its data.
-- Forward-only. snapshot is the codec's JSON {"data": ..., "signals": ...} as it was when
-- step snapshot_at started; continuing the run reads it and the step rows from snapshot_at
-- on, not the whole history. Runs stored before this schema have none (NULL): they are read
-- whole, as before, until they next stop to wait.
ALTER TABLE flux_runs ADD COLUMN snapshot TEXT;
ALTER TABLE flux_runs ADD COLUMN snapshot_at INTEGER;
