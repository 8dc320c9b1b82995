-- fluxrun schema 5 (PostgreSQL): stored schedules (SPEC §7). Forward-only; same shape as
-- the SQLite schema. One row per schedule: exactly one of cron (an expression, read in
-- timezone) and every_us (an interval in microseconds). next_at is the next tick not yet
-- fired (NULL: it never fires again), last_tick the last one fired. A tick's run is started
-- with an idempotency key naming the schedule and the tick, in the transaction that
-- advances next_at (see storage/_schedules.py); firing locks the due rows FOR UPDATE SKIP
-- LOCKED, so workers never wait for each other's schedules.
CREATE TABLE flux_schedules (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    cron        TEXT,
    every_us    BIGINT CHECK (every_us > 0),
    timezone    TEXT NOT NULL,
    input       JSONB NOT NULL,
    enabled     BOOLEAN NOT NULL,
    next_at     TIMESTAMPTZ,
    last_tick   TIMESTAMPTZ,
    created_at  TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL,
    CHECK ((cron IS NULL) <> (every_us IS NULL))
);
-- What a firing pass reads: the enabled schedules by next tick.
CREATE INDEX flux_schedules_due ON flux_schedules (next_at) WHERE enabled;
