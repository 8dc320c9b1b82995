"""The store contract for the worker table (:meth:`Store.record_worker`,
:meth:`Store.worker_stopped`, :meth:`Store.list_workers`), as pytest tests for any
:class:`Store`; imported by :mod:`fluxrun.testing.store_contract`. A store that keeps no
workers (the defaults) skips them: nothing in running a workflow depends on it.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from ..storage._base import Store
from ..storage._workers import WorkerBeat

BEAT = WorkerBeat(
    id="w-1", host="host-a", pid=4242, workflows=("order", "refund"), concurrency=16, runs_held=0
)


def _tracks(store: Store) -> None:
    if type(store).list_workers is Store.list_workers:
        pytest.skip(f"{type(store).__name__} keeps no worker table")


async def test_a_worker_is_recorded_and_listed(store: Store) -> None:
    _tracks(store)
    assert await store.list_workers() == []
    await store.record_worker(BEAT)
    [w] = await store.list_workers()
    assert (w.id, w.host, w.pid, w.workflows, w.concurrency, w.runs_held) == (
        "w-1",
        "host-a",
        4242,
        ("order", "refund"),
        16,
        0,
    )
    assert w.started_at == w.heartbeat_at and w.stopped_at is None
    assert w.heartbeat_at.tzinfo is not None


async def test_a_heartbeat_refreshes_and_keeps_the_start(store: Store) -> None:
    _tracks(store)
    await store.record_worker(BEAT)
    [first] = await store.list_workers()
    await asyncio.sleep(0.01)  # so that a clock with a coarse tick can move (never checked)
    await store.record_worker(replace(BEAT, runs_held=7, workflows=()))
    [again] = await store.list_workers()
    assert again.started_at == first.started_at
    assert again.heartbeat_at >= first.heartbeat_at
    assert (again.runs_held, again.workflows) == (7, ())


async def test_a_stopped_worker_is_marked_until_it_beats_again(store: Store) -> None:
    _tracks(store)
    await store.record_worker(BEAT)
    await store.worker_stopped("w-1")
    await store.worker_stopped("never-seen")  # nothing to mark: no error
    [w] = await store.list_workers()
    assert w.stopped_at is not None and w.stopped_at >= w.started_at
    await store.record_worker(BEAT)  # the same id starting again
    [back] = await store.list_workers()
    assert back.stopped_at is None


async def test_workers_are_listed_most_recent_heartbeat_first(store: Store) -> None:
    _tracks(store)
    for name in ("w-a", "w-b", "w-c"):
        await store.record_worker(replace(BEAT, id=name))
        await asyncio.sleep(0.01)
    await store.record_worker(replace(BEAT, id="w-a"))
    listed = [w.id for w in await store.list_workers()]
    assert listed[0] == "w-a" and sorted(listed) == ["w-a", "w-b", "w-c"]
