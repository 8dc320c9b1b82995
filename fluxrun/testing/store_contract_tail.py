"""The store contract for snapshots and reading a run from its tail
(:meth:`Store.load_tail`, :meth:`Store.load_steps`, :meth:`Store.read_steps_blocking`), as
pytest tests for any :class:`Store`; imported by :mod:`fluxrun.testing.store_contract`.

A store may keep no snapshots (the default ``load_tail`` is ``load``): then these tests check
only that what it gives is whole and consistent. A store that does keep them must leave out
exactly the rows before the snapshot's step, and forget a snapshot whose rows are deleted.
"""

from __future__ import annotations

import pytest

from ..storage._base import RunRow, Snapshot, Store
from ._rows import make_run, make_step, must_load, norm, t

SNAP = Snapshot(text='{"data":{"x":1,"y":[1,2]},"signals":{"go":{"by":"ann"}}}', at=3)


def keeps_snapshots(store: Store) -> bool:
    """Whether ``store`` overrides :meth:`Store.load_tail` (else it always loads whole)."""
    return type(store).load_tail is not Store.load_tail


async def _suspended_at_3(store: Store, run_id: str = "r1") -> RunRow:
    """A run of five steps, rows 0-2 completed and row 3 suspended, cursor at 3, with SNAP."""
    await store.create(
        make_run(run_id, step_names=("s0", "s1", "s2", "s3", "s4")),
        lease_owner=None,
        lease_seconds=0,
    )
    version = 1
    for i in range(3):
        await store.apply(t(run_id, version, insert_step=make_step(i), current_step=i))
        version += 1
    waiting = make_step(3, status="suspended", completed_at=None, waiting_for="go")
    await store.apply(
        t(
            run_id,
            version,
            insert_step=waiting,
            status="suspended",
            current_step=3,
            wait_name="go",
            wait_kind="signal",
            snapshot=SNAP,
        )
    )
    return await must_load(store, run_id)


def _check_tail(whole: RunRow, tail: RunRow | None) -> None:
    """``tail`` is ``whole`` read from its snapshot on (or whole, with no snapshot)."""
    assert tail is not None
    assert tail.steps_from >= 0
    assert [r.index for r in tail.steps] == [
        r.index for r in whole.steps if r.index >= tail.steps_from
    ]
    if tail.steps_from:
        assert tail.snapshot is not None and tail.snapshot.at == tail.steps_from
    columns = dict(steps=(), snapshot=None, steps_from=0)
    assert norm(_without(tail, **columns)) == norm(_without(whole, **columns))


def _without(row: RunRow, **columns: object) -> RunRow:
    from dataclasses import replace

    return replace(row, **columns)  # type: ignore[arg-type]


async def test_load_tail_of_unknown_is_none(store: Store) -> None:
    assert await store.load_tail("nope") is None
    assert await store.load_steps("nope", 5) == ()


async def test_load_tail_reads_from_the_snapshot_on(store: Store) -> None:
    whole = await _suspended_at_3(store)
    assert whole.snapshot is None and whole.steps_from == 0  # load() reads everything
    assert [r.index for r in whole.steps] == [0, 1, 2, 3]
    tail = await store.load_tail("r1")
    _check_tail(whole, tail)
    assert tail is not None
    if keeps_snapshots(store):
        assert tail.snapshot == SNAP and tail.steps_from == 3
        assert norm(tail.steps) == norm(whole.steps[3:])


async def test_load_steps_reads_the_rows_before_an_index(store: Store) -> None:
    whole = await _suspended_at_3(store)
    got = await store.load_steps("r1", 3)
    assert norm(got) == norm(whole.steps[:3])
    assert await store.load_steps("r1", 0) == ()
    if keeps_snapshots(store):
        blocking = store.read_steps_blocking("r1", 2)
        assert norm(blocking) == norm(whole.steps[:2])


async def test_a_run_without_a_snapshot_is_read_whole(store: Store) -> None:
    await store.create(make_run("r1"), lease_owner=None, lease_seconds=0)
    await store.apply(t("r1", 1, insert_step=make_step(0), current_step=1))
    whole = await must_load(store, "r1")
    tail = await store.load_tail("r1")
    _check_tail(whole, tail)
    assert tail is not None and tail.steps_from == 0 and tail.snapshot is None


async def test_later_writes_keep_the_snapshot(store: Store) -> None:
    whole = await _suspended_at_3(store)
    done = make_step(3, waiting_for="go", output='{"by":"ann"}')
    await store.apply(t("r1", whole.version, update_step=done, status="running"))
    await store.apply(t("r1", whole.version + 1, insert_step=make_step(4), current_step=4))
    tail = await store.load_tail("r1")
    _check_tail(await must_load(store, "r1"), tail)
    if keeps_snapshots(store):
        assert tail is not None and tail.snapshot == SNAP
        assert [r.index for r in tail.steps] == [3, 4]


@pytest.mark.parametrize("delete_from", [3, 4])
async def test_deleting_from_the_snapshot_on_keeps_it(store: Store, delete_from: int) -> None:
    whole = await _suspended_at_3(store)
    await store.apply(
        t("r1", whole.version, delete_steps_from=delete_from, status="pending", current_step=3)
    )
    tail = await store.load_tail("r1")
    _check_tail(await must_load(store, "r1"), tail)
    if keeps_snapshots(store):
        assert tail is not None and tail.snapshot == SNAP


async def test_deleting_rows_a_snapshot_stands_for_forgets_it(store: Store) -> None:
    whole = await _suspended_at_3(store)
    await store.apply(t("r1", whole.version, delete_steps_from=1, status="pending", current_step=1))
    tail = await store.load_tail("r1")
    assert tail is not None and tail.snapshot is None and tail.steps_from == 0
    assert [r.index for r in tail.steps] == [0]
    # Back at the snapshot's step later, the run is still read whole: the snapshot is gone.
    for i in (1, 2):
        await store.apply(t("r1", tail.version + i - 1, insert_step=make_step(i), current_step=3))
    again = await store.load_tail("r1")
    assert (
        again is not None
        and again.snapshot is None
        and [r.index for r in again.steps]
        == [
            0,
            1,
            2,
        ]
    )


async def test_a_cursor_before_the_snapshot_reads_the_run_whole(store: Store) -> None:
    whole = await _suspended_at_3(store)
    await store.apply(t("r1", whole.version, current_step=2))
    tail = await store.load_tail("r1")
    assert tail is not None and tail.steps_from == 0 and tail.snapshot is None
    assert [r.index for r in tail.steps] == [0, 1, 2, 3]


async def test_a_new_snapshot_replaces_the_old(store: Store) -> None:
    whole = await _suspended_at_3(store)
    newer = Snapshot(text='{"data":{},"signals":{}}', at=4)
    await store.apply(
        t("r1", whole.version, insert_step=make_step(4), current_step=4, snapshot=newer)
    )
    tail = await store.load_tail("r1")
    _check_tail(await must_load(store, "r1"), tail)
    if keeps_snapshots(store):
        assert tail is not None and tail.snapshot == newer and [r.index for r in tail.steps] == [4]
