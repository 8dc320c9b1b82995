"""The store protocol for failures that explain themselves (SPEC §6) and its hard edges, the
same on every backend: the attempt log, deleting a run someone executes, which error a stale
owner gets, what counts as progress for ``claims``, numbers no database can hold, and
storage errors that name their run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import time

import pytest
from contract_support import LONG_LEASE, Backend, at, make_run, make_step

from fluxrun.errors import (
    ConcurrentModificationError,
    InvalidArgumentError,
    LeaseLostError,
    RunBusyError,
    StorageError,
)
from fluxrun.storage._base import (
    Applied,
    AttemptRow,
    Claim,
    ListQuery,
    RunRow,
    Store,
    Transition,
)

#: A lease short enough to let expire in a test.
SHORT_LEASE = 0.2


def t(run_id: str, version: int, **fields: object) -> Transition:
    """A transition stamped with a fixed time after ``T0``."""
    if "updated_at" not in fields:
        fields["updated_at"] = at(100 + version if abs(version) < 10**6 else 100)
    return Transition(run_id=run_id, expected_version=version, **fields)  # type: ignore[arg-type]


def attempt(index: int, number: int, **fields: object) -> AttemptRow:
    """A finished attempt with every field filled in."""
    base: dict[str, object] = {
        "name": f"s{index}",
        "kind": "step",
        "status": "failed",
        "started_at": at(10 + index + number / 10),
        "finished_at": at(10.05 + index + number / 10),
        "duration_ms": 50.125,
        "error_type": "builtins.RuntimeError",
        "error": f"attempt {number} failed: 'quoted' ☕",
        "traceback": 'Traceback (most recent call last):\n  File "s.py", line 3\nRuntimeError',
    }
    base.update(fields)
    return AttemptRow(index=index, attempt=number, **base)  # type: ignore[arg-type]


def numbered(*rows: AttemptRow) -> list[AttemptRow]:
    """``rows`` as a store lists them: ``seq`` 1, 2, ... in order."""
    return [dataclasses.replace(r, seq=i) for i, r in enumerate(rows, start=1)]


async def must_load(store: Store, run_id: str) -> RunRow:
    row = await store.load(run_id)
    assert row is not None, run_id
    return row


async def until_expired(store: Store, run_id: str) -> None:
    """Wait until ``run_id``'s short lease expired by the store's clock (polled: how long
    that takes is up to the machine, not part of the contract)."""
    deadline = time.monotonic() + 30
    while run_id not in {r.id for r in await store.find_recoverable(["wf"], 100)}:
        assert time.monotonic() < deadline, "the lease never expired"
        await asyncio.sleep(SHORT_LEASE / 2)


# -- the attempt log -------------------------------------------------------------------------


async def test_attempts_are_appended_by_transitions_and_listed_in_order(store: Store) -> None:
    await store.create(make_run("r1"), lease_owner="a", lease_seconds=LONG_LEASE)
    first, second = attempt(0, 1), attempt(0, 2, error_type=None, traceback=None)
    third = attempt(
        0,
        1,
        kind="compensation",
        status="compensated",
        error=None,
        error_type=None,
        traceback=None,
        started_at=at(20.000001),
        finished_at=None,
        duration_ms=None,
    )
    await store.apply(t("r1", 1, fence=1, attempts=(first, second)))
    await store.apply(t("r1", 2, fence=1, insert_step=make_step(0), attempts=(third,)))
    assert await store.list_attempts("r1") == numbered(first, second, third)
    got = await store.list_attempts("r1")
    assert got[2].started_at is not None and got[2].started_at.utcoffset() == dt.timedelta(0)
    # A transition without attempts leaves the log alone.
    await store.apply(t("r1", 3, fence=1, status="running"))
    assert len(await store.list_attempts("r1")) == 3


def _shapes() -> list[tuple[str, dict[str, object]]]:
    return [
        ("alone", {}),
        ("with a step row", {"insert_step": make_step(1)}),
        ("replacing a step row", {"update_step": make_step(0, status="compensated")}),
        ("with a deletion", {"delete_steps_from": 0, "insert_step": make_step(0)}),
        ("with two step rows", {"insert_step": make_step(1), "update_step": make_step(0)}),
        ("with a release", {"release": True, "status": "suspended"}),
        ("with a renewal", {"renew_lease": LONG_LEASE}),
    ]


@pytest.mark.parametrize("shape", _shapes(), ids=lambda s: s[0])
async def test_attempts_go_with_every_kind_of_transition(
    store: Store, shape: tuple[str, dict[str, object]]
) -> None:
    await store.create(make_run("r1"), lease_owner="a", lease_seconds=LONG_LEASE)
    await store.apply(t("r1", 1, fence=1, insert_step=make_step(0), attempts=(attempt(0, 1),)))
    more = (attempt(1, 1), attempt(1, 2, status="completed", error=None))
    assert await store.apply(t("r1", 2, fence=1, attempts=more, **shape[1])) == Applied(3, 1)
    assert await store.list_attempts("r1") == numbered(attempt(0, 1), *more)


async def test_attempts_are_appended_with_a_claim(store: Store) -> None:
    await store.create(make_run("r1"), lease_owner=None, lease_seconds=1)
    await store.apply(t("r1", 1, claim=Claim("b", LONG_LEASE), attempts=(attempt(0, 1),)))
    assert await store.list_attempts("r1") == numbered(attempt(0, 1))


async def test_each_run_numbers_its_own_attempts(store: Store) -> None:
    for run_id in ("r1", "r2"):
        await store.create(make_run(run_id), lease_owner=None, lease_seconds=1)
    await store.apply(t("r1", 1, attempts=(attempt(0, 1),)))
    await store.apply(t("r2", 1, attempts=(attempt(0, 1), attempt(0, 2))))
    await store.apply(t("r1", 2, attempts=(attempt(0, 2),)))
    assert await store.list_attempts("r1") == numbered(attempt(0, 1), attempt(0, 2))
    assert await store.list_attempts("r2") == numbered(attempt(0, 1), attempt(0, 2))
    assert await store.list_attempts("nope") == []


async def test_a_refused_transition_appends_no_attempt(store: Store) -> None:
    await store.create(make_run("r1"), lease_owner="a", lease_seconds=LONG_LEASE)
    await store.apply(t("r1", 1, fence=1, insert_step=make_step(0), attempts=(attempt(0, 1),)))
    before, log = await must_load(store, "r1"), await store.list_attempts("r1")
    extra = (attempt(0, 2), attempt(0, 3))
    refused: list[tuple[Transition, type[Exception]]] = [
        (t("r1", 1, fence=1, attempts=extra), ConcurrentModificationError),  # stale version
        (t("r1", 2, fence=7, attempts=extra), LeaseLostError),
        (t("r1", 2, attempts=extra), RunBusyError),
        (
            t("r1", 2, fence=1, insert_step=make_step(0), attempts=extra),
            ConcurrentModificationError,
        ),
        (
            t("r1", 2, fence=1, update_step=make_step(4), attempts=extra),
            ConcurrentModificationError,
        ),
        (
            t("r1", 2, fence=1, delete_steps_from=1, insert_step=make_step(0), attempts=extra),
            ConcurrentModificationError,
        ),
        (t("ghost", 1, attempts=extra), ConcurrentModificationError),
    ]
    for write, error in refused:
        with pytest.raises(error):
            await store.apply(write)
    assert await store.load("r1") == before
    assert await store.list_attempts("r1") == log
    assert await store.list_attempts("ghost") == []


async def test_attempts_are_deleted_with_the_run(store: Store) -> None:
    await store.create(make_run("r1"), lease_owner=None, lease_seconds=1)
    await store.create(make_run("r2"), lease_owner=None, lease_seconds=1)
    await store.apply(t("r1", 1, attempts=(attempt(0, 1), attempt(0, 2))))
    await store.apply(t("r2", 1, attempts=(attempt(0, 1),)))
    assert await store.delete("r1") is True
    assert await store.list_attempts("r1") == []
    assert await store.list_attempts("r2") == numbered(attempt(0, 1))
    # A new run under the same id starts a new log.
    await store.create(make_run("r1"), lease_owner=None, lease_seconds=1)
    await store.apply(t("r1", 1, attempts=(attempt(3, 1),)))
    assert await store.list_attempts("r1") == numbered(attempt(3, 1))


# -- deleting a run someone executes -----------------------------------------------------


async def test_a_run_a_live_lease_owns_cannot_be_deleted(store: Store) -> None:
    await store.create(make_run("r1"), lease_owner="w", lease_seconds=LONG_LEASE)
    await store.apply(t("r1", 1, fence=1, insert_step=make_step(0), attempts=(attempt(0, 1),)))
    before = await must_load(store, "r1")
    with pytest.raises(RunBusyError) as info:
        await store.delete("r1")
    assert info.value.workflow_id == "r1" and "r1" in str(info.value)
    assert await store.load("r1") == before
    assert await store.list_attempts("r1") == numbered(attempt(0, 1))
    # Released, it can go.
    await store.apply(t("r1", 2, fence=1, release=True))
    assert await store.delete("r1") is True
    assert await store.load("r1") is None


async def test_a_run_whose_lease_expired_can_be_deleted(store: Store) -> None:
    await store.create(make_run("r1"), lease_owner="w", lease_seconds=SHORT_LEASE)
    await store.apply(t("r1", 1, fence=1, insert_step=make_step(0)))
    await until_expired(store, "r1")
    assert await store.delete("r1") is True
    assert await store.load("r1") is None
    assert await store.delete("r1") is False


# -- claims count the claims since the last progress ---------------------------------------


async def claimed_twice(store: Store) -> Applied:
    """A run claimed by "a" (whose lease lapses at once), then by "b": claims == 2."""
    await store.create(make_run("r1"), lease_owner=None, lease_seconds=1)
    first = await store.apply(t("r1", 1, claim=Claim("a", 0)))
    await until_expired(store, "r1")
    second = await store.apply(t("r1", first.version, claim=Claim("b", LONG_LEASE)))
    assert (await must_load(store, "r1")).claims == 2
    return second


async def test_recording_a_compensation_is_progress(store: Store) -> None:
    first = await claimed_twice(store)
    await store.apply(t("r1", first.version, fence=first.fence, insert_step=make_step(0)))
    await store.apply(t("r1", first.version + 1, claim=None, fence=first.fence, release=True))
    # Claimed twice more without progress, then a compensation is recorded (update_step).
    await store.apply(t("r1", first.version + 2, claim=Claim("c", 0)))
    await until_expired(store, "r1")
    again = await store.apply(t("r1", first.version + 3, claim=Claim("d", LONG_LEASE)))
    assert (await must_load(store, "r1")).claims == 2
    undone = make_step(0, status="compensated", compensated_at=at(30))
    await store.apply(t("r1", again.version, fence=again.fence, update_step=undone))
    assert (await must_load(store, "r1")).claims == 1


async def test_recording_a_step_is_progress_unless_a_claim_comes_with_it(store: Store) -> None:
    first = await claimed_twice(store)
    v, fence = first.version, first.fence
    # A plain status change is not progress.
    await store.apply(t("r1", v, fence=fence, status="running"))
    assert (await must_load(store, "r1")).claims == 2
    await store.apply(t("r1", v + 1, fence=fence, insert_step=make_step(0)))
    assert (await must_load(store, "r1")).claims == 1
    # A claim that records a step in the same transition counts as a claim.
    await store.apply(t("r1", v + 2, fence=fence, renew_lease=0))
    await until_expired(store, "r1")
    await store.apply(t("r1", v + 3, claim=Claim("e", LONG_LEASE), insert_step=make_step(1)))
    assert (await must_load(store, "r1")).claims == 2


# -- numbers no database can hold -------------------------------------------------------------


@pytest.mark.parametrize("seconds", [1e13, 10**30, float("inf")])
async def test_huge_leases_are_clamped(store: Store, seconds: float) -> None:
    now = dt.datetime.now(dt.UTC)
    await store.create(make_run("r1"), lease_owner="a", lease_seconds=seconds)
    await store.apply(t("r1", 1, fence=1, renew_lease=seconds))
    await store.apply(t("r1", 2, fence=1, release=True))
    await store.apply(t("r1", 3, claim=Claim("b", seconds)))
    assert (await asyncio.to_thread(store.renew_leases, "b", {"r1": 2}, seconds)).lost == set()
    got = await must_load(store, "r1")
    assert got.lease_until is not None
    assert now + dt.timedelta(days=365 * 50) < got.lease_until < now + dt.timedelta(days=365 * 200)
    with pytest.raises(RunBusyError):
        await store.delete("r1")


async def test_a_nan_lease_is_refused(store: Store) -> None:
    with pytest.raises(InvalidArgumentError):
        await store.create(make_run("r1"), lease_owner="a", lease_seconds=float("nan"))
    assert await store.load("r1") is None


async def test_huge_pages_are_clamped_and_negative_ones_refused(store: Store) -> None:
    for i in range(3):
        await store.create(make_run(f"r{i}", created=i), lease_owner=None, lease_seconds=1)
    everything = ["r2", "r1", "r0"]
    assert [r.id for r in await store.list_runs(ListQuery(limit=10**30))] == everything
    assert [r.id for r in await store.list_runs(ListQuery(limit=2**63))] == everything
    assert await store.list_runs(ListQuery(offset=2**63)) == []
    assert await store.list_runs(ListQuery(offset=10**30, limit=10**30)) == []
    assert [r.id for r in await store.list_runs(ListQuery(offset=1, limit=2**64))] == ["r1", "r0"]
    assert len(await store.find_recoverable(["wf"], 10**30)) == 3
    for bad in (ListQuery(offset=-1), ListQuery(limit=-1)):
        with pytest.raises(InvalidArgumentError):
            await store.list_runs(bad)
    with pytest.raises(InvalidArgumentError):
        await store.find_recoverable(["wf"], -1)


def _oversized() -> list[tuple[str, dict[str, object]]]:
    return [
        ("expected_version", {"version": 2**63}),
        ("negative expected_version", {"version": -(2**63) - 1}),
        ("fence", {"fence": 2**64}),
        ("current_step", {"current_step": 2**31}),
        ("delete_steps_from", {"delete_steps_from": 2**40}),
        ("keep_steps", {"delete_steps_from": 0, "keep_steps": (2**31,)}),
        ("step index", {"insert_step": make_step(2**31)}),
        ("step retries", {"insert_step": make_step(0, retries=10**20)}),
        ("step fence", {"insert_step": make_step(0, fence=2**63)}),
        ("step duration", {"insert_step": make_step(0, duration_ms=float("nan"))}),
        ("attempt number", {"attempts": (attempt(0, 2**31),)}),
        ("attempt index", {"attempts": (attempt(-(2**31) - 1, 1),)}),
        ("attempt duration", {"attempts": (attempt(0, 1, duration_ms=float("inf")),)}),
    ]


@pytest.mark.parametrize("case", _oversized(), ids=lambda c: c[0])
async def test_numbers_beyond_a_column_are_refused_and_change_nothing(
    store: Store, case: tuple[str, dict[str, object]]
) -> None:
    await store.create(make_run("r1"), lease_owner=None, lease_seconds=1)
    before = await must_load(store, "r1")
    fields = dict(case[1])
    version = fields.pop("version", 1)
    with pytest.raises(InvalidArgumentError) as info:
        await store.apply(t("r1", version, **fields))  # type: ignore[arg-type]
    assert info.value.workflow_id == "r1"
    assert await store.load("r1") == before
    assert await store.list_attempts("r1") == []


async def test_a_new_run_with_numbers_beyond_a_column_is_refused(store: Store) -> None:
    for bad in (
        make_run("r1", version=2**63),
        make_run("r1", fence=-(2**64)),
        make_run("r1", current_step=2**31),
    ):
        with pytest.raises(InvalidArgumentError):
            await store.create(bad, lease_owner=None, lease_seconds=1)
    assert await store.load("r1") is None


async def test_renewing_with_a_fence_beyond_64_bits_loses_that_lease(store: Store) -> None:
    await store.create(make_run("r1"), lease_owner="a", lease_seconds=LONG_LEASE)
    fences = {"r1": 1, "r2": 2**64, "r3": -(2**70)}
    renewed = await asyncio.to_thread(store.renew_leases, "a", fences, LONG_LEASE)
    assert renewed.lost == {"r2", "r3"}
    assert (await asyncio.to_thread(store.renew_leases, "a", {"r1": 2**63}, 60)).lost == {"r1"}


# -- storage errors name their run -----------------------------------------------------------


async def test_a_storage_error_names_the_run(store: Store, backend: Backend) -> None:
    if backend.kind == "memory":
        pytest.skip("MemoryStorage has nothing that can fail")
    await store.create(make_run("r1"), lease_owner=None, lease_seconds=1)
    # A JSON column given text that is not JSON: every database refuses it.
    with pytest.raises(StorageError) as info:
        await store.apply(t("r1", 1, insert_step=make_step(0, output="not json")))
    assert info.value.workflow_id == "r1" and "'r1'" in str(info.value)
    assert "step commit" in str(info.value)
    with pytest.raises(StorageError) as created:
        await store.create(make_run("r2", input="{oops"), lease_owner=None, lease_seconds=1)
    assert created.value.workflow_id == "r2" and "'r2'" in str(created.value)
    assert (await must_load(store, "r1")).version == 1
    # A closed store says so, naming the run each call was about.
    await store.close()
    calls = {
        "load": lambda: store.load("r1"),
        "delete": lambda: store.delete("r1"),
        "list_attempts": lambda: store.list_attempts("r1"),
        "apply": lambda: store.apply(t("r1", 1, status="x")),
    }
    for what, call in calls.items():
        with pytest.raises(StorageError, match="closed") as closed:
            await call()
        assert closed.value.workflow_id == "r1" and "'r1'" in str(closed.value), what
