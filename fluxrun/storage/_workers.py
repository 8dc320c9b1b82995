"""The record each engine keeps of itself while its scheduler runs (``flux_workers``), and
its SQL for both dialects. Observers (``engine.workers()``, ``FluxClient.workers()``, the
CLI and the dashboard) read it; nothing in running a workflow depends on it."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

__all__ = [
    "LIST",
    "PG_RECORD",
    "PG_STOPPED",
    "SQLITE_RECORD",
    "SQLITE_STOPPED",
    "WORKER_COLUMNS",
    "MemoryWorkers",
    "SQLiteWorkers",
    "WorkerBeat",
    "WorkerInfo",
    "WorkerVerbs",
    "beat_params",
    "worker_from",
]


T = TypeVar("T")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _from_micros(value: int | None) -> dt.datetime | None:
    return None if value is None else _EPOCH + dt.timedelta(microseconds=value)


@dataclass(frozen=True, slots=True)
class WorkerBeat:
    """What an engine says of itself at each heartbeat."""

    id: str
    host: str
    pid: int
    workflows: tuple[str, ...]
    concurrency: int
    runs_held: int


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """An engine that runs (or ran) a scheduler on the store: ``id`` is its owner id (what
    leases name), ``heartbeat_at`` its last heartbeat by the store's clock, ``stopped_at``
    when it stopped cleanly (None: running, or died without stopping: see how old its
    heartbeat is)."""

    id: str
    host: str
    pid: int
    workflows: tuple[str, ...]
    concurrency: int
    runs_held: int
    started_at: dt.datetime
    heartbeat_at: dt.datetime
    stopped_at: dt.datetime | None = None


WORKER_COLUMNS = (
    "id, host, pid, workflows, concurrency, runs_held, started_at, heartbeat_at, stopped_at"
)


def beat_params(beat: WorkerBeat) -> tuple[Any, ...]:
    """The beat's values for ``(id, host, pid, workflows, concurrency, runs_held)``."""
    return (
        beat.id,
        beat.host,
        beat.pid,
        json.dumps(list(beat.workflows), ensure_ascii=False),
        beat.concurrency,
        beat.runs_held,
    )


def worker_from(r: Sequence[Any], when: Callable[[Any], dt.datetime | None]) -> WorkerInfo:
    """A worker record from values selected in ``WORKER_COLUMNS`` order."""
    started, beat = when(r[6]), when(r[7])
    assert started is not None and beat is not None
    workflows = r[3] if isinstance(r[3], list) else json.loads(r[3])
    return WorkerInfo(
        id=r[0],
        host=r[1],
        pid=r[2],
        workflows=tuple(workflows),
        concurrency=r[4],
        runs_held=r[5],
        started_at=started,
        heartbeat_at=beat,
        stopped_at=when(r[8]),
    )


# -- SQL, per dialect -----------------------------------------------------------------------

_UPSERT_SET = (
    "host = excluded.host, pid = excluded.pid, workflows = excluded.workflows, "
    "concurrency = excluded.concurrency, runs_held = excluded.runs_held, "
    "heartbeat_at = excluded.heartbeat_at, stopped_at = NULL"
)
SQLITE_RECORD = (
    "INSERT INTO flux_workers (id, host, pid, workflows, concurrency, runs_held, started_at, "
    "heartbeat_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET " + _UPSERT_SET
)
SQLITE_STOPPED = "UPDATE flux_workers SET stopped_at = ?, heartbeat_at = ? WHERE id = ?"
PG_RECORD = (
    "INSERT INTO flux_workers (id, host, pid, workflows, concurrency, runs_held, started_at, "
    "heartbeat_at) VALUES (%s, %s, %s, %s::jsonb, %s, %s, now(), now()) "
    "ON CONFLICT (id) DO UPDATE SET " + _UPSERT_SET
)
PG_STOPPED = "UPDATE flux_workers SET stopped_at = now(), heartbeat_at = now() WHERE id = %s"
LIST = "SELECT " + WORKER_COLUMNS + " FROM flux_workers ORDER BY heartbeat_at DESC, id"


class WorkerVerbs:
    """The worker table's part of :class:`~fluxrun.storage.Store` (observation only)."""

    async def record_worker(self, beat: WorkerBeat) -> None:
        """Record ``beat`` (insert, or refresh the heartbeat of) the worker ``beat.id``,
        marking it running. The default keeps nothing (a store may not track workers)."""

    async def worker_stopped(self, worker_id: str) -> None:
        """Mark the worker stopped now (it stopped cleanly)."""

    async def list_workers(self) -> list[WorkerInfo]:
        """Every worker recorded, the most recent heartbeat first."""
        return []


class MemoryWorkers(WorkerVerbs):
    """:class:`WorkerVerbs` of :class:`~fluxrun.storage.MemoryStorage`."""

    _lock: threading.Lock
    _workers: dict[str, WorkerInfo]

    def _now(self) -> dt.datetime:
        raise NotImplementedError

    async def record_worker(self, beat: WorkerBeat) -> None:
        """Record a worker's heartbeat (see :meth:`Store.record_worker`)."""
        with self._lock:
            now = self._now()
            old = self._workers.get(beat.id)
            self._workers[beat.id] = WorkerInfo(
                id=beat.id,
                host=beat.host,
                pid=beat.pid,
                workflows=beat.workflows,
                concurrency=beat.concurrency,
                runs_held=beat.runs_held,
                started_at=now if old is None else old.started_at,
                heartbeat_at=now,
            )

    async def worker_stopped(self, worker_id: str) -> None:
        """Mark a worker stopped now."""
        with self._lock:
            old = self._workers.get(worker_id)
            if old is not None:
                now = self._now()
                self._workers[worker_id] = replace(old, heartbeat_at=now, stopped_at=now)

    async def list_workers(self) -> list[WorkerInfo]:
        """Every worker recorded, the most recent heartbeat first."""
        with self._lock:
            return sorted(self._workers.values(), key=lambda w: (-w.heartbeat_at.timestamp(), w.id))


class SQLiteWorkers(WorkerVerbs):
    """:class:`WorkerVerbs` of :class:`~fluxrun.storage.SQLiteStorage`."""

    def _wall_us(self) -> int:
        raise NotImplementedError

    async def _run(self, fn: Callable[[sqlite3.Connection], T], what: str) -> T:
        raise NotImplementedError

    async def record_worker(self, beat: WorkerBeat) -> None:
        """Record a worker's heartbeat (see :meth:`Store.record_worker`)."""
        now = self._wall_us()
        params = (*beat_params(beat), now, now)
        await self._run(lambda conn: conn.execute(SQLITE_RECORD, params), "record_worker")

    async def worker_stopped(self, worker_id: str) -> None:
        """Mark a worker stopped now."""
        now = self._wall_us()
        params = (now, now, worker_id)
        await self._run(lambda conn: conn.execute(SQLITE_STOPPED, params), "worker_stopped")

    async def list_workers(self) -> list[WorkerInfo]:
        """Every worker recorded, the most recent heartbeat first."""
        rows = await self._run(lambda conn: conn.execute(LIST).fetchall(), "list_workers")
        return [worker_from(r, _from_micros) for r in rows]
