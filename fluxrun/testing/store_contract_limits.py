"""The store contract for concurrency limits (``Store.claim_due(..., limits=...)``), as
pytest tests for any :class:`Store`; imported by :mod:`fluxrun.testing.store_contract`.
The rules are in :mod:`fluxrun.storage._concurrency`. A store whose ``claim_due`` takes no
``limits`` skips them (the engine then refuses nothing: it only passes limits when a
workflow declares one).
"""

from __future__ import annotations

import asyncio
import inspect
from collections import Counter
from typing import Any

import pytest

from ..errors import InvalidArgumentError
from ..storage._base import RunRow, Store
from ._rows import LONG_LEASE, make_run, must_load, t


def _limits(store: Store) -> None:
    if "limits" not in inspect.signature(store.claim_due).parameters:
        pytest.skip(f"{type(store).__name__}.claim_due takes no concurrency limits")


async def _add(
    store: Store,
    run_id: str,
    key: str | None,
    *,
    owner: str | None = None,
    lease: float = LONG_LEASE,
    **fields: Any,
) -> None:
    run = make_run(run_id, concurrency_key=key, **fields)
    await store.create(run, lease_owner=owner, lease_seconds=lease)


async def _claim(store: Store, limits: dict[str, int], limit: int = 100, **kw: Any) -> list[str]:
    rows = await store.claim_due(kw.get("owner", "me"), ["wf", "other"], limit, LONG_LEASE, limits)
    return [r.id for r in rows]


def _groups(ids: list[str]) -> Counter[str]:
    return Counter(i.split("-")[0] for i in ids)


async def test_the_key_is_stored_with_the_run(store: Store) -> None:
    _limits(store)
    await _add(store, "a-1", "customer 42")
    await _add(store, "n-1", None)
    assert (await must_load(store, "a-1")).concurrency_key == "customer 42"
    assert (await must_load(store, "n-1")).concurrency_key is None


async def test_a_claim_fills_each_group_up_to_its_limit(store: Store) -> None:
    _limits(store)
    for i in range(4):
        await _add(store, f"a-{i}", "a", created=i)
        await _add(store, f"b-{i}", "b", created=i)
    await _add(store, "whole-0", "", created=9)
    await _add(store, "unkeyed-0", None, created=9)  # its key not known yet: not held back
    first = await _claim(store, {"wf": 2})
    assert _groups(first) == Counter({"a": 2, "b": 2, "whole": 1, "unkeyed": 1})
    assert {"a-0", "a-1", "b-0", "b-1"} <= set(first)  # each group's oldest first
    assert await _claim(store, {"wf": 2}) == []  # full
    # Without limits (a workflow not limited here) every due run is claimed.
    assert sorted(await _claim(store, {"other": 1})) == ["a-2", "a-3", "b-2", "b-3"]


async def test_a_slot_frees_when_its_run_stops_holding_it(store: Store) -> None:
    _limits(store)
    for i in range(3):
        await _add(store, f"a-{i}", "a", created=i)
    [first] = await _claim(store, {"wf": 1})
    assert first == "a-0" and await _claim(store, {"wf": 1}) == []
    row = await must_load(store, "a-0")
    # It waits for a signal, let go: it holds no slot then.
    await store.apply(
        t("a-0", row.version, fence=row.fence, status="suspended", wait_name="go",
          wait_kind="signal", release=True)
    )  # fmt: skip
    assert await _claim(store, {"wf": 1}) == ["a-1"]
    row = await must_load(store, "a-1")
    await store.apply(t("a-1", row.version, fence=row.fence, status="running"))
    assert await _claim(store, {"wf": 1}) == []  # running holds it
    await store.apply(t("a-1", row.version + 1, fence=row.fence, status="completed", release=True))
    assert await _claim(store, {"wf": 1}) == ["a-2"]


async def test_a_run_holding_a_slot_is_taken_over_even_when_the_group_is_full(
    store: Store,
) -> None:
    _limits(store)
    await _add(store, "a-dead", "a", owner="gone", lease=0, status="running")
    await _add(store, "a-next", "a", created=1)
    # The dead owner's run holds the only slot: it is taken over, the next one waits.
    assert await _claim(store, {"wf": 1}) == ["a-dead"]
    assert await _claim(store, {"wf": 1}) == []


async def test_a_requested_cancel_is_not_held_back(store: Store) -> None:
    _limits(store)
    await _add(store, "a-0", "a")
    await _add(store, "a-1", "a", created=1)
    assert await _claim(store, {"wf": 1}) == ["a-0"]
    assert await store.request("a-1", "cancel", "stop")
    assert await _claim(store, {"wf": 1}) == ["a-1"]


async def test_priority_orders_the_runs_waiting_for_a_slot(store: Store) -> None:
    _limits(store)
    await _add(store, "a-low", "a", created=0)
    await _add(store, "a-high", "a", created=5, priority=9)
    await _add(store, "b-low", "b", created=1)
    assert sorted(await _claim(store, {"wf": 1})) == ["a-high", "b-low"]


async def test_concurrent_claimers_never_overfill_a_group(
    store: Store, others: list[Store]
) -> None:
    _limits(store)
    for i in range(20):
        await _add(store, f"a-{i}", "a", created=i)
        await _add(store, f"b-{i}", "b", created=i)
    claimers = [store, *others]
    for _ in range(3):  # a few rounds of simultaneous claims (three per round: one fills)
        got = await asyncio.gather(
            *(_claim(s, {"wf": 3}, limit=5, owner=f"w{n}") for n, s in enumerate(claimers))
        )
        flat = [i for ids in got for i in ids]
        assert len(flat) == len(set(flat))
    rows: list[RunRow] = [await must_load(store, f"{g}-{i}") for g in "ab" for i in range(20)]
    held = Counter(r.concurrency_key for r in rows if r.owner is not None)
    assert held == Counter({"a": 3, "b": 3})


@pytest.mark.parametrize("bad", [{"wf": 0}, {"wf": -1}, {"wf": True}, {"wf": 1.5}, {3: 1}])
async def test_a_bad_limit_is_refused_before_anything_is_claimed(
    store: Store, bad: dict[object, object]
) -> None:
    _limits(store)
    await _add(store, "a-0", "a")
    with pytest.raises(InvalidArgumentError, match="concurrency limit"):
        await store.claim_due("me", ["wf"], 10, LONG_LEASE, bad)  # type: ignore[arg-type]
    assert (await must_load(store, "a-0")).owner is None  # nothing claimed
