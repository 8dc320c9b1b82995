"""The store contract for child workflows: a run's ``parent_id``,
:meth:`Store.list_children`, and a transition's :class:`~fluxrun.storage.Wake` (a child's
end written into its parent's inbox in the same transaction), as pytest tests for any
:class:`Store`; imported by :mod:`fluxrun.testing.store_contract`.

A wake is applied exactly when its transition is: a refused transition writes none. It is an
inbox row like a sent signal (FIFO with them, unconsumed, no dedupe key), so a parent
suspended on its name is due; a parent that is finished or gone is not written to, and the
transition applies all the same.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from typing import Any

import pytest

from ..errors import ConcurrentModificationError
from ..storage._base import ListQuery, Store, Wake
from ._rows import LONG_LEASE, at, make_run, make_step, must_load, t

WAKE = Wake(run_id="p", name="flux:child:c", payload='{"status":"completed","data":{"v":1}}')


async def _add(store: Store, run_id: str, **fields: Any) -> None:
    await store.create(make_run(run_id, **fields), lease_owner=None, lease_seconds=0)


async def _waiting_parent(store: Store) -> None:
    """Run ``p`` suspended on the child's signal, and its child ``c``."""
    await _add(store, "p", status="suspended", wait_kind="signal", wait_name=WAKE.name)
    await _add(store, "c", name="kid", status="running", parent_id="p", created=1)


async def test_parent_id_is_stored_and_read_back(store: Store) -> None:
    await _add(store, "p")
    started = await store.start(
        make_run("c", name="kid", parent_id="p"), lease_owner=None, lease_seconds=0
    )
    assert started.created
    assert (await must_load(store, "c")).parent_id == "p"
    assert (await must_load(store, "p")).parent_id is None
    listed = {r.id: r.parent_id for r in await store.list_runs(ListQuery())}
    assert listed == {"p": None, "c": "p"}
    [claimed] = await store.claim_due("me", ["kid"], 10, LONG_LEASE)
    assert claimed.id == "c" and claimed.parent_id == "p"


async def test_list_children_gives_a_parents_runs_oldest_first(store: Store) -> None:
    await _add(store, "p")
    await _add(store, "other")
    await _add(store, "c2", parent_id="p", created=2)
    await _add(store, "c1", parent_id="p", created=1)
    await _add(store, "x", parent_id="other", created=3)
    await _add(store, "c3", parent_id="p", created=3)
    assert [r.id for r in await store.list_children("p")] == ["c1", "c2", "c3"]
    assert [r.id for r in await store.list_children("other")] == ["x"]
    assert await store.list_children("nobody") == []
    assert {r.parent_id for r in await store.list_children("p")} == {"p"}


async def test_a_wake_lands_in_the_parent_inbox_with_the_transition(store: Store) -> None:
    await _waiting_parent(store)
    await store.send_signal("p", "other", '"before"')
    assert await store.claim_due("me", ["wf"], 10, LONG_LEASE) == []
    applied = await store.apply(t("c", 1, status="completed", completed_at=at(200), wake=WAKE))
    assert applied.version == 2
    assert (await must_load(store, "c")).status == "completed"
    signals = await store.list_signals("p")
    assert [(s.seq, s.name, s.dedupe_key, s.consumed_by_step) for s in signals] == [
        (1, "other", None, None),
        (2, WAKE.name, None, None),
    ]
    first = await store.first_signal("p", WAKE.name)
    assert first is not None and first.seq == 2
    assert json.loads(first.payload) == json.loads(WAKE.payload)
    # The parent waits on that name: it is due now.
    assert [r.id for r in await store.claim_due("me", ["wf"], 10, LONG_LEASE)] == ["p"]


async def test_a_refused_transition_writes_no_wake(store: Store) -> None:
    await _waiting_parent(store)
    with pytest.raises(ConcurrentModificationError):
        await store.apply(t("c", 7, status="completed", wake=WAKE))  # a stale version
    with pytest.raises(ConcurrentModificationError):
        await store.apply(t("c", 1, fence=5, status="completed", wake=WAKE))  # fenced off
    assert await store.list_signals("p") == []
    assert (await must_load(store, "c")).status == "running"


async def test_a_wake_to_a_finished_or_missing_parent_is_dropped(store: Store) -> None:
    await _add(store, "p", status="cancelled")
    await _add(store, "c", name="kid", status="running", parent_id="p")
    await _add(store, "orphan", name="kid", status="running", parent_id="gone")
    await store.apply(t("c", 1, status="completed", wake=WAKE))
    await store.apply(t("orphan", 1, status="failed", wake=replace(WAKE, run_id="gone")))
    assert (await must_load(store, "c")).status == "completed"
    assert (await must_load(store, "orphan")).status == "failed"
    assert await store.list_signals("p") == []
    assert await store.list_signals("gone") == []


async def test_a_wake_rides_on_any_kind_of_transition(store: Store) -> None:
    """With a step row and a release: the wake goes with all of them or none."""
    await _waiting_parent(store)
    await store.apply(
        t(
            "c",
            1,
            insert_step=make_step(0),
            status="completed",
            release=True,
            wake=WAKE,
        )
    )
    row = await must_load(store, "c")
    assert row.status == "completed" and [s.index for s in row.steps] == [0]
    assert [s.name for s in await store.list_signals("p")] == [WAKE.name]
    with pytest.raises(ConcurrentModificationError):
        # The step is recorded already: the whole transition fails, its wake too.
        await store.apply(
            t("c", 2, insert_step=make_step(0), wake=replace(WAKE, name="flux:child:again"))
        )
    assert [s.name for s in await store.list_signals("p")] == [WAKE.name]


async def test_wakes_and_signals_racing_into_one_inbox_all_land(
    store: Store, others: list[Store]
) -> None:
    """Children ending at once, and senders, through separate connections: every row
    lands, numbered 1..n without a gap or a repeat."""
    await _add(store, "p", status="suspended", wait_kind="signal", wait_name="flux:child:c0")
    for i in range(6):
        await _add(store, f"c{i}", name="kid", status="running", parent_id="p", created=i)

    async def child_ends(i: int) -> None:
        wake = replace(WAKE, name=f"flux:child:c{i}")
        await others[i % len(others)].apply(t(f"c{i}", 1, status="completed", wake=wake))

    async def sender(i: int) -> None:
        await others[(i + 1) % len(others)].send_signal("p", "user", str(i))

    await asyncio.gather(*(child_ends(i) for i in range(6)), *(sender(i) for i in range(6)))
    signals = await store.list_signals("p")
    assert [s.seq for s in signals] == list(range(1, 13))
    assert sorted(s.name for s in signals if s.name != "user") == [
        f"flux:child:c{i}" for i in range(6)
    ]
    assert sorted(s.payload for s in signals if s.name == "user") == [str(i) for i in range(6)]
