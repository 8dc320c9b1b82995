"""The store contract for the core protocol, as pytest tests for any :class:`Store`:
create / load / list / delete, compare-and-set, fencing and leases, recovery candidates, and
step rows recorded once. Imported with the scheduling verbs' tests by
:mod:`fluxrun.testing.store_contract` (see there how to run it on a store of your own).

Each test calls the store directly with rows and transitions built by hand, and checks both
what a call returns and that a refused call changed nothing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time

import pytest

from .._records import WorkflowStatus
from ..errors import ConcurrentModificationError, LeaseLostError, RunBusyError
from ..storage._base import Applied, Claim, ListQuery, RunRow, Store
from ._rows import LONG_LEASE, T0, at, make_run, make_step, must_load, norm, t

S = WorkflowStatus
#: A lease short enough to let expire in a test.
SHORT_LEASE = 0.2


def ids(rows: list[RunRow]) -> list[str]:
    return [r.id for r in rows]


# -- create / load -------------------------------------------------------------------------


async def test_load_unknown_is_none(store: Store) -> None:
    assert await store.load("nope") is None


async def test_create_then_load_returns_every_column(store: Store) -> None:
    run = make_run(
        "r1",
        name="order",
        status="pending",
        input='{"a":[1,2.5,"x"],"b":null}',
        step_names=("reserve", "charge", "ship ✈"),
        current_step=2,
        definition_version="v2",
        error="earlier trouble",
        completed_at=at(5.000001),
        wait_name="approval",
        updated_at=at(3.5),
        version=4,
        fence=7,
    )
    await store.create(run, lease_owner=None, lease_seconds=LONG_LEASE)
    got = await must_load(store, "r1")
    assert norm(got) == norm(run)  # unowned: owner, lease and claims stay empty
    assert got.created_at.utcoffset() == dt.timedelta(0)
    assert got.created_at.microsecond == T0.microsecond


async def test_create_with_owner_takes_a_lease(store: Store) -> None:
    before = dt.datetime.now(dt.UTC)
    await store.create(make_run("r1"), lease_owner="worker-a", lease_seconds=LONG_LEASE)
    got = await must_load(store, "r1")
    assert (got.owner, got.claims, got.fence, got.version) == ("worker-a", 1, 1, 1)
    assert got.lease_until is not None
    # The store's clock decides the expiry; it is about an hour ahead of ours.
    assert before + dt.timedelta(seconds=LONG_LEASE - 60) < got.lease_until
    assert got.lease_until < before + dt.timedelta(seconds=LONG_LEASE + 60)


async def test_create_ignores_owner_fields_of_the_row(store: Store) -> None:
    run = make_run("r1", owner="ghost", lease_until=at(9999), claims=5)
    await store.create(run, lease_owner=None, lease_seconds=LONG_LEASE)
    got = await must_load(store, "r1")
    assert (got.owner, got.lease_until, got.claims) == (None, None, 0)


async def test_create_twice_is_refused_and_keeps_the_first(store: Store) -> None:
    first = make_run("r1", name="first")
    await store.create(first, lease_owner=None, lease_seconds=LONG_LEASE)
    with pytest.raises(ConcurrentModificationError):
        await store.create(make_run("r1", name="second"), lease_owner="x", lease_seconds=1)
    assert await store.load("r1") == first


# -- list_runs -------------------------------------------------------------------------------


async def seed_listing(store: Store) -> None:
    """Six runs: two workflows, several statuses, created at distinct times."""
    specs = [
        ("a1", "alpha", S.COMPLETED, 1),
        ("b1", "beta", S.FAILED, 2),
        ("a2", "alpha", S.FAILED, 3),
        ("a3", "alpha", S.SUSPENDED, 4),
        ("b2", "beta", S.COMPLETED, 5),
        ("a4", "alpha", S.PENDING, 6),
    ]
    for run_id, name, status, created in specs:
        await store.create(
            make_run(run_id, name=name, status=status.value, created=created),
            lease_owner=None,
            lease_seconds=LONG_LEASE,
        )


LISTINGS: list[tuple[ListQuery, list[str]]] = [
    (ListQuery(), ["a4", "b2", "a3", "a2", "b1", "a1"]),
    (ListQuery(name="alpha"), ["a4", "a3", "a2", "a1"]),
    (ListQuery(name="gamma"), []),
    (ListQuery(statuses=(S.FAILED,)), ["a2", "b1"]),
    (ListQuery(statuses=(S.FAILED, S.COMPLETED)), ["b2", "a2", "b1", "a1"]),
    (ListQuery(statuses=()), []),
    (ListQuery(name="beta", statuses=(S.COMPLETED, S.SUSPENDED)), ["b2"]),
    (ListQuery(limit=2), ["a4", "b2"]),
    (ListQuery(limit=2, offset=2), ["a3", "a2"]),
    (ListQuery(limit=None, offset=4), ["b1", "a1"]),
    (ListQuery(limit=0), []),
    (ListQuery(offset=6), []),
    (ListQuery(offset=60, limit=5), []),
    (ListQuery(name="alpha", limit=1, offset=3), ["a1"]),
    (ListQuery(name="alpha", statuses=(S.FAILED, S.PENDING), limit=10), ["a4", "a2"]),
]


async def test_list_runs_filters_and_pages(store: Store) -> None:
    await seed_listing(store)
    for query, expected in LISTINGS:
        assert ids(await store.list_runs(query)) == expected, query


async def test_list_runs_breaks_created_at_ties_by_insertion_order(store: Store) -> None:
    # Same created_at for all; ids deliberately out of alphabetical order.
    for run_id in ["m", "z", "a", "q"]:
        await store.create(make_run(run_id, created=1), lease_owner=None, lease_seconds=1)
    await store.create(make_run("older", created=0), lease_owner=None, lease_seconds=1)
    assert ids(await store.list_runs(ListQuery())) == ["q", "a", "z", "m", "older"]
    assert ids(await store.list_runs(ListQuery(limit=2, offset=1))) == ["a", "z"]


async def test_list_runs_orders_by_created_at_not_by_update(store: Store) -> None:
    await store.create(make_run("old", created=1), lease_owner=None, lease_seconds=1)
    await store.create(make_run("new", created=2), lease_owner=None, lease_seconds=1)
    await store.apply(t("old", 1, status="running", updated_at=at(50)))
    assert ids(await store.list_runs(ListQuery())) == ["new", "old"]


async def test_list_runs_includes_steps(store: Store) -> None:
    await store.create(make_run("r1"), lease_owner=None, lease_seconds=1)
    await store.apply(t("r1", 1, insert_step=make_step(1)))
    await store.apply(t("r1", 2, insert_step=make_step(0)))
    (listed,) = await store.list_runs(ListQuery())
    assert listed == await store.load("r1")
    assert [s.index for s in listed.steps] == [0, 1]


# -- delete ----------------------------------------------------------------------------------


async def test_delete_removes_the_run_and_its_steps(store: Store) -> None:
    await store.create(make_run("r1"), lease_owner="w", lease_seconds=LONG_LEASE)
    await store.create(make_run("r2"), lease_owner=None, lease_seconds=1)
    for i in range(3):
        await store.apply(t("r1", 1 + i, fence=1, insert_step=make_step(i)))
    await store.apply(t("r1", 4, fence=1, release=True))  # a live lease would refuse it
    assert await store.delete("r1") is True
    assert await store.load("r1") is None
    assert await store.delete("r1") is False
    assert ids(await store.list_runs(ListQuery())) == ["r2"]
    # A new run under the same id starts without the old steps.
    await store.create(make_run("r1"), lease_owner=None, lease_seconds=1)
    assert (await must_load(store, "r1")).steps == ()
    with pytest.raises(ConcurrentModificationError):
        await store.apply(t("r1", 1, update_step=make_step(0)))


async def test_delete_unknown_is_false(store: Store) -> None:
    assert await store.delete("never") is False


# -- compare-and-set -------------------------------------------------------------------------


async def test_apply_changes_columns_and_raises_the_version(store: Store) -> None:
    await store.create(make_run("r1", error="x", wait_name="w"), lease_owner=None, lease_seconds=1)
    applied = await store.apply(
        t("r1", 1, status="running", current_step=1, updated_at=at(60), completed_at=at(61))
    )
    assert applied == Applied(version=2, fence=1)
    got = await must_load(store, "r1")
    assert (got.status, got.current_step, got.version, got.fence) == ("running", 1, 2, 1)
    assert (got.updated_at, got.completed_at) == (at(60), at(61))
    assert (got.error, got.wait_name) == ("x", "w")  # KEEP
    assert got.created_at == at(0)
    await store.apply(t("r1", 2, error=None, wait_name=None, completed_at=None))
    got = await must_load(store, "r1")
    assert (got.error, got.wait_name, got.completed_at, got.version) == (None, None, None, 3)


async def test_two_writers_on_one_version_exactly_one_wins(store: Store) -> None:
    await store.create(make_run("r1"), lease_owner=None, lease_seconds=1)
    outcomes = await asyncio.gather(
        store.apply(t("r1", 1, status="running", insert_step=make_step(0, name="first"))),
        store.apply(t("r1", 1, status="failed", insert_step=make_step(0, name="second"))),
        return_exceptions=True,
    )
    won = [o for o in outcomes if isinstance(o, Applied)]
    lost = [o for o in outcomes if not isinstance(o, Applied)]
    assert len(won) == 1 and won[0].version == 2
    assert len(lost) == 1 and type(lost[0]) is ConcurrentModificationError
    got = await must_load(store, "r1")
    winner = outcomes.index(won[0])
    assert got.status == ("running", "failed")[winner]
    assert [s.name for s in got.steps] == [("first", "second")[winner]]
    assert got.version == 2


async def test_many_writers_on_one_version_exactly_one_wins(store: Store) -> None:
    await store.create(make_run("r1"), lease_owner=None, lease_seconds=1)
    outcomes = await asyncio.gather(
        *(store.apply(t("r1", 1, current_step=i)) for i in range(8)), return_exceptions=True
    )
    won = [i for i, o in enumerate(outcomes) if isinstance(o, Applied)]
    assert len(won) == 1
    assert all(
        type(o) is ConcurrentModificationError for o in outcomes if not isinstance(o, Applied)
    )
    got = await must_load(store, "r1")
    assert (got.version, got.current_step) == (2, won[0])


@pytest.mark.parametrize("version", [0, 1, 3, -1])
async def test_a_stale_or_future_version_is_refused_and_changes_nothing(
    store: Store, version: int
) -> None:
    await store.create(make_run("r1"), lease_owner=None, lease_seconds=1)
    await store.apply(t("r1", 1, insert_step=make_step(0)))  # now at version 2
    before = await must_load(store, "r1")
    with pytest.raises(ConcurrentModificationError) as info:
        await store.apply(
            t(
                "r1",
                version,
                status="failed",
                error="boom",
                insert_step=make_step(1),
                delete_steps_from=0,
                release=True,
            )
        )
    assert type(info.value) is ConcurrentModificationError
    assert info.value.workflow_id == "r1"
    assert await store.load("r1") == before


async def test_apply_to_an_unknown_run_is_refused(store: Store) -> None:
    with pytest.raises(ConcurrentModificationError):
        await store.apply(t("ghost", 1, status="running"))
    with pytest.raises(ConcurrentModificationError):
        await store.apply(t("ghost", 1, claim=Claim("w", LONG_LEASE)))
    assert await store.load("ghost") is None


# -- fencing and leases ----------------------------------------------------------------------


async def test_an_unowned_write_to_a_run_with_a_live_lease_is_busy(store: Store) -> None:
    await store.create(make_run("r1"), lease_owner="a", lease_seconds=LONG_LEASE)
    before = await must_load(store, "r1")
    with pytest.raises(RunBusyError):
        await store.apply(t("r1", 1, status="cancelled", insert_step=make_step(0)))
    with pytest.raises(RunBusyError):
        await store.apply(t("r1", 1, claim=Claim("b", LONG_LEASE)))
    assert await store.load("r1") == before


async def test_a_claim_fences_off_the_previous_owner(store: Store) -> None:
    await store.create(make_run("r1"), lease_owner="a", lease_seconds=LONG_LEASE)
    # The owner writes under its fence and finally lets go.
    assert await store.apply(t("r1", 1, fence=1, insert_step=make_step(0))) == Applied(2, 1)
    assert await store.apply(t("r1", 2, fence=1, release=True)) == Applied(3, 1)
    released = await must_load(store, "r1")
    assert (released.owner, released.lease_until, released.claims) == (None, None, 0)
    # Another executor claims it: fence 2.
    applied = await store.apply(t("r1", 3, claim=Claim("b", LONG_LEASE)))
    assert applied == Applied(version=4, fence=2)
    claimed = await must_load(store, "r1")
    assert (claimed.owner, claimed.fence, claimed.claims) == ("b", 2, 1)
    assert claimed.lease_until is not None
    # The old owner, even with the current version, is fenced off.
    with pytest.raises(LeaseLostError) as info:
        await store.apply(t("r1", 4, fence=1, status="completed", insert_step=make_step(1)))
    assert info.value.workflow_id == "r1"
    assert await store.load("r1") == claimed
    # The new owner still writes.
    assert await store.apply(t("r1", 4, fence=2, insert_step=make_step(1, fence=2))) == Applied(
        5, 2
    )


async def test_a_stale_fence_wins_over_a_stale_version_in_the_error(store: Store) -> None:
    # A stale owner must learn that it lost the run (LeaseLostError), not that its version
    # is old (which would invite it to reload and retry).
    await store.create(make_run("r1"), lease_owner="a", lease_seconds=LONG_LEASE)
    await store.apply(t("r1", 1, fence=1, release=True))
    await store.apply(t("r1", 2, claim=Claim("b", LONG_LEASE)))
    before = await must_load(store, "r1")
    for write in (
        t("r1", 1, fence=1),
        t("r1", 1, fence=1, insert_step=make_step(0)),
        t("r1", 1, fence=1, delete_steps_from=0, insert_step=make_step(0), status="x"),
        t("r1", 9, fence=1, update_step=make_step(0)),
    ):
        with pytest.raises(LeaseLostError) as info:
            await store.apply(write)
        assert info.value.workflow_id == "r1"
    assert await store.load("r1") == before
    # The current owner with a stale version gets the plain error.
    with pytest.raises(ConcurrentModificationError) as plain:
        await store.apply(t("r1", 1, fence=2))
    assert type(plain.value) is ConcurrentModificationError


async def test_an_owned_write_renews_and_a_release_clears_the_lease(store: Store) -> None:
    await store.create(make_run("r1"), lease_owner="a", lease_seconds=30)
    first = (await must_load(store, "r1")).lease_until
    assert first is not None
    await store.apply(t("r1", 1, fence=1, renew_lease=LONG_LEASE))
    renewed = await must_load(store, "r1")
    assert renewed.lease_until is not None and renewed.lease_until > first
    assert (renewed.owner, renewed.claims) == ("a", 1)
    await store.apply(t("r1", 2, fence=1, release=True, status="suspended"))
    got = await must_load(store, "r1")
    assert (got.owner, got.lease_until, got.claims, got.status) == (None, None, 0, "suspended")
    # Unowned now: a plain write applies.
    await store.apply(t("r1", 3, status="running"))


async def expired(store: Store) -> list[str]:
    """The recoverable runs once the short leases expired by the store's clock (polled: how
    long that takes is up to the machine, not part of the contract)."""
    deadline = time.monotonic() + 30
    while True:
        found = ids(await store.find_recoverable(["wf"], 10))
        if len(found) == 2 or time.monotonic() > deadline:
            return found
        await asyncio.sleep(SHORT_LEASE / 2)


async def test_an_expired_lease_can_be_claimed(store: Store) -> None:
    await store.create(make_run("r1"), lease_owner="a", lease_seconds=SHORT_LEASE)
    await store.create(make_run("r2"), lease_owner="a", lease_seconds=SHORT_LEASE)
    await store.create(make_run("live"), lease_owner="a", lease_seconds=LONG_LEASE)
    assert sorted(await expired(store)) == ["r1", "r2"]
    applied = await store.apply(t("r1", 1, claim=Claim("b", LONG_LEASE)))
    assert applied == Applied(version=2, fence=2)
    got = await must_load(store, "r1")
    # Taken over without a clean release: the claims count keeps rising.
    assert (got.owner, got.fence, got.claims) == ("b", 2, 2)
    with pytest.raises(LeaseLostError):
        await store.apply(t("r1", 2, fence=1, status="completed"))
    # An unowned write is allowed once the lease expired.
    await store.apply(t("r2", 1, status="failed"))
    assert ids(await store.find_recoverable(["wf"], 10)) == []
    with pytest.raises(RunBusyError):
        await store.apply(t("live", 1, claim=Claim("b", LONG_LEASE)))


async def test_renew_leases_returns_the_runs_lost(store: Store) -> None:
    for run_id in ["kept", "taken", "released", "other-fence"]:
        await store.create(make_run(run_id), lease_owner="a", lease_seconds=30)
    await store.apply(t("taken", 1, fence=1, release=True))
    await store.apply(t("taken", 2, claim=Claim("b", LONG_LEASE)))
    await store.apply(t("released", 1, fence=1, release=True))
    before = (await must_load(store, "kept")).lease_until
    assert before is not None
    fences = {"kept": 1, "taken": 1, "released": 1, "other-fence": 2, "deleted": 1}
    # The engine renews from a thread of its own.
    renewed = await asyncio.to_thread(store.renew_leases, "a", fences, LONG_LEASE)
    assert renewed.requested == {}
    assert renewed.lost == {"taken", "released", "other-fence", "deleted"}
    kept = await must_load(store, "kept")
    assert kept.lease_until is not None and kept.lease_until > before
    assert kept.version == 1  # renewal is not a transition
    taken = await must_load(store, "taken")
    assert (taken.owner, taken.fence) == ("b", 2)
    assert (await must_load(store, "released")).owner is None
    assert (await asyncio.to_thread(store.renew_leases, "a", {}, LONG_LEASE)).lost == set()


async def test_find_recoverable_returns_unowned_unfinished_runs(store: Store) -> None:
    statuses = [s.value for s in WorkflowStatus]
    for i, status in enumerate(statuses):
        await store.create(
            make_run(f"free-{status}", status=status, created=i),
            lease_owner=None,
            lease_seconds=1,
        )
        await store.create(
            make_run(f"owned-{status}", status=status, created=i),
            lease_owner="a",
            lease_seconds=LONG_LEASE,
        )
    await store.create(
        make_run("other-wf", name="other", created=-1), lease_owner=None, lease_seconds=1
    )
    await store.create(
        make_run("released", status="running", created=20), lease_owner="a", lease_seconds=60
    )
    await store.apply(t("released", 1, fence=1, release=True))
    await store.apply(t("free-pending", 1, insert_step=make_step(0)))
    found = await store.find_recoverable(["wf", "nothing"], 50)
    # Oldest first (created_at), as recovery should pick them.
    assert ids(found) == ["free-pending", "free-running", "free-rolling_back", "released"]
    assert all(r.steps == () for r in found)
    assert found[0].version == 2
    assert ids(await store.find_recoverable(["wf"], 2)) == ["free-pending", "free-running"]
    assert ids(await store.find_recoverable(["other", "wf"], 1)) == ["other-wf"]
    assert await store.find_recoverable([], 10) == []
    assert await store.find_recoverable(["WF"], 10) == []


async def test_find_recoverable_breaks_ties_by_insertion_order(store: Store) -> None:
    for run_id in ["m", "z", "a"]:
        await store.create(make_run(run_id, created=5), lease_owner=None, lease_seconds=1)
    await store.create(make_run("first", created=1), lease_owner=None, lease_seconds=1)
    assert ids(await store.find_recoverable(["wf"], 10)) == ["first", "m", "z", "a"]


# -- step rows -------------------------------------------------------------------------------


async def test_step_rows_keep_every_field(store: Store) -> None:
    await store.create(make_run("r1"), lease_owner=None, lease_seconds=1)
    full = make_step(
        0,
        name="charge ☕",
        status="compensated",
        started_at=at(1.000001),
        completed_at=at(2.999999),
        suspended_at=at(1.5),
        compensated_at=at(4),
        waiting_for="approval",
        duration_ms=1998.998,
        output='{"ok":true,"n":[1,2]}',
        error="card declined: 'insufficient funds'",
        retries=3,
        changes='{"set":{"x":1},"del":["y"]}',
        compensation_changes='{"set":{},"del":["x"]}',
        fence=9,
        error_type="billing.CardDeclined",
        traceback='Traceback (most recent call last):\n  File "x.py", line 1\nCardDeclined: ☕',
    )
    bare = make_step(
        1,
        started_at=None,
        completed_at=None,
        duration_ms=None,
        changes=None,
        status="skipped",
        fence=0,
    )
    await store.apply(t("r1", 1, insert_step=full))
    await store.apply(t("r1", 2, insert_step=bare))
    assert norm((await must_load(store, "r1")).steps) == norm((full, bare))


async def test_a_step_result_is_recorded_once(store: Store) -> None:
    await store.create(make_run("r1"), lease_owner="a", lease_seconds=LONG_LEASE)
    await store.apply(t("r1", 1, fence=1, insert_step=make_step(0, name="original")))
    before = await must_load(store, "r1")
    with pytest.raises(ConcurrentModificationError) as info:
        await store.apply(
            t(
                "r1",
                2,
                fence=1,
                status="completed",
                current_step=3,
                error="x",
                completed_at=at(9),
                insert_step=make_step(0, name="duplicate"),
                renew_lease=LONG_LEASE,
            )
        )
    assert type(info.value) is ConcurrentModificationError
    assert await store.load("r1") == before


async def test_a_duplicate_step_in_a_race_is_recorded_once(store: Store) -> None:
    await store.create(make_run("r1"), lease_owner=None, lease_seconds=1)
    await store.apply(t("r1", 1, insert_step=make_step(0)))
    # Two writers on the same version, both recording step 1.
    outcomes = await asyncio.gather(
        store.apply(t("r1", 2, insert_step=make_step(1, output='"x"'))),
        store.apply(t("r1", 2, insert_step=make_step(1, output='"y"'))),
        return_exceptions=True,
    )
    assert sum(isinstance(o, Applied) for o in outcomes) == 1
    got = await must_load(store, "r1")
    assert [s.index for s in got.steps] == [0, 1] and got.version == 3


async def test_update_step_replaces_an_existing_row_only(store: Store) -> None:
    await store.create(make_run("r1"), lease_owner=None, lease_seconds=1)
    await store.apply(t("r1", 1, insert_step=make_step(0, status="suspended")))
    before = await must_load(store, "r1")
    with pytest.raises(ConcurrentModificationError):
        await store.apply(t("r1", 2, status="failed", update_step=make_step(1)))
    assert await store.load("r1") == before
    done = make_step(0, status="completed", output='{"by":"ann"}', retries=1, fence=1)
    await store.apply(t("r1", 2, update_step=done))
    assert norm((await must_load(store, "r1")).steps) == norm((done,))


async def test_insert_and_update_in_one_transition(store: Store) -> None:
    await store.create(make_run("r1"), lease_owner=None, lease_seconds=1)
    await store.apply(t("r1", 1, insert_step=make_step(0, status="running")))
    done = make_step(0, status="compensated")
    new = make_step(1, status="failed", error="e")
    await store.apply(t("r1", 2, update_step=done, insert_step=new))
    assert norm((await must_load(store, "r1")).steps) == norm((done, new))


async def test_delete_steps_from_keeps_the_listed_rows(store: Store) -> None:
    await store.create(make_run("r1", step_names="abcdef"), lease_owner=None, lease_seconds=1)
    for i in range(6):
        await store.apply(t("r1", 1 + i, insert_step=make_step(i)))
    replacement = make_step(2, status="running", output='"again"', fence=2)
    await store.apply(t("r1", 7, delete_steps_from=1, keep_steps=(3, 5), insert_step=replacement))
    got = await must_load(store, "r1")
    assert [s.index for s in got.steps] == [0, 2, 3, 5]
    assert norm(got.steps[1]) == norm(replacement)
    # Everything from 0, nothing kept.
    await store.apply(t("r1", 8, delete_steps_from=0))
    assert (await must_load(store, "r1")).steps == ()


async def test_delete_steps_from_then_insert_at_a_kept_index_is_refused(store: Store) -> None:
    await store.create(make_run("r1"), lease_owner=None, lease_seconds=1)
    for i in range(3):
        await store.apply(t("r1", 1 + i, insert_step=make_step(i)))
    before = await must_load(store, "r1")
    with pytest.raises(ConcurrentModificationError):
        await store.apply(
            t("r1", 4, delete_steps_from=1, keep_steps=(2,), insert_step=make_step(2))
        )
    with pytest.raises(ConcurrentModificationError):
        await store.apply(t("r1", 4, delete_steps_from=1, insert_step=make_step(0)))
    assert await store.load("r1") == before


async def test_delete_steps_from_then_update_a_deleted_row_is_refused(store: Store) -> None:
    # The transition applies its parts in order: delete, insert, update; an update of a row
    # the same transition deleted finds no row.
    await store.create(make_run("r1"), lease_owner=None, lease_seconds=1)
    for i in range(3):
        await store.apply(t("r1", 1 + i, insert_step=make_step(i)))
    before = await must_load(store, "r1")
    with pytest.raises(ConcurrentModificationError):
        await store.apply(t("r1", 4, delete_steps_from=1, update_step=make_step(2)))
    assert await store.load("r1") == before
    await store.apply(t("r1", 4, delete_steps_from=1, keep_steps=(2,), update_step=make_step(2)))
    assert [s.index for s in (await must_load(store, "r1")).steps] == [0, 2]


async def test_update_of_a_row_inserted_by_the_same_transition(store: Store) -> None:
    await store.create(make_run("r1"), lease_owner=None, lease_seconds=1)
    final = make_step(0, status="completed", output='"second"')
    await store.apply(
        t("r1", 1, insert_step=make_step(0, status="running", output='"first"'), update_step=final)
    )
    assert norm((await must_load(store, "r1")).steps) == norm((final,))


async def test_a_claim_and_a_release_in_one_transition(store: Store) -> None:
    await store.create(make_run("r1"), lease_owner=None, lease_seconds=1)
    applied = await store.apply(t("r1", 1, claim=Claim("b", LONG_LEASE), release=True))
    assert applied == Applied(version=2, fence=2)
    got = await must_load(store, "r1")
    assert (got.owner, got.lease_until, got.claims, got.fence) == (None, None, 0, 2)


async def test_a_renewal_and_a_release_in_one_transition(store: Store) -> None:
    # The release wins: the run ends up unowned.
    await store.create(make_run("r1"), lease_owner="a", lease_seconds=LONG_LEASE)
    applied = await store.apply(t("r1", 1, fence=1, renew_lease=LONG_LEASE, release=True))
    assert applied == Applied(version=2, fence=1)
    got = await must_load(store, "r1")
    assert (got.owner, got.lease_until, got.claims) == (None, None, 0)
