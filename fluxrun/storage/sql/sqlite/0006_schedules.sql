-- fluxrun schema 6 (SQLite): stored schedules (SPEC §7). Forward-only.
-- One row per schedule: exactly one of cron (an expression, read in timezone) and every_us
-- (an interval in microseconds). next_at is the next tick not yet fired (microseconds since
-- the epoch, UTC; NULL: it never fires again), last_tick the last one fired. A tick's run
-- is started with an idempotency key naming the schedule and the tick, in the transaction
-- that advances next_at (see storage/_schedules.py).
CREATE TABLE flux_schedules (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    cron        TEXT,
    every_us    INTEGER CHECK (every_us > 0),
    timezone    TEXT NOT NULL,
    input       TEXT NOT NULL CHECK (json_valid(input)),
    enabled     INTEGER NOT NULL CHECK (enabled IN (0, 1)),
    next_at     INTEGER,
    last_tick   INTEGER,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    CHECK ((cron IS NULL) <> (every_us IS NULL))
) WITHOUT ROWID;
-- What a firing pass reads: the enabled schedules by next tick.
CREATE INDEX flux_schedules_due ON flux_schedules (next_at) WHERE enabled = 1;
