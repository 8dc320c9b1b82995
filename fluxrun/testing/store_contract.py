"""The store contract, as pytest tests for any :class:`Store`: the core protocol
(:mod:`fluxrun.testing.store_contract_core`, imported here) and the scheduling verbs:
idempotent start, claim_due and its due rules, next_due, the signal inbox (FIFO, dedupe,
consumed exactly once by a transition), cancel/pause requests, renew_leases reporting them,
and counts; and child workflows (:mod:`fluxrun.testing.store_contract_children`: a run's
``parent_id``, ``list_children``, a transition's ``wake``). fluxrun runs it on
MemoryStorage, SQLiteStorage and PostgresStorage.

To check a store of your own, import the tests into a test module and give them two
fixtures (pytest and pytest-asyncio, in auto mode, are needed)::

    from fluxrun.testing.store_contract import *  # noqa: F403  (collects the tests)

    @pytest.fixture
    async def store():
        s = MyStore(...)             # a new, empty store
        await s.init()
        yield s
        await s.close()

    @pytest.fixture
    async def others(store):
        # Three more stores on the same data, each with its own connection (for the
        # races); a store with one in-process state may give [store] * 3.
        ...

No test depends on timing: times are far in the past or future of any store's clock (the
PostgreSQL store uses the database's), and a lease of 0 s is expired by the next call.
Concurrency tests open several stores on one database, so SQLite and PostgreSQL race over
separate connections (MemoryStorage races over its one lock).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import replace
from typing import Any

import pytest

from ..errors import (
    ConcurrentModificationError,
    InvalidArgumentError,
    InvalidStateError,
    WorkflowNotFoundError,
)
from ..storage._base import (
    FINISHED_STATUSES,
    Claim,
    SignalRef,
    SignalSent,
    Started,
    Store,
)
from ._rows import LONG_LEASE, at, make_run, make_step, must_load, t
from .store_contract_children import *  # noqa: F403
from .store_contract_core import *  # noqa: F403  (one import gives a user every test)
from .store_contract_group import *  # noqa: F403
from .store_contract_limits import *  # noqa: F403
from .store_contract_schedules import *  # noqa: F403
from .store_contract_tail import *  # noqa: F403
from .store_contract_workers import *  # noqa: F403

PAST = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
FUTURE = dt.datetime(2200, 1, 1, tzinfo=dt.UTC)


async def claimed_ids(store: Store, names: list[str] | None = None, limit: int = 100) -> list[str]:
    rows = await store.claim_due("me", names or ["wf"], limit, LONG_LEASE)
    return [r.id for r in rows]


async def add(
    store: Store, run_id: str, *, owner: str | None = None, lease: float = LONG_LEASE, **fields: Any
) -> None:
    await store.create(make_run(run_id, **fields), lease_owner=owner, lease_seconds=lease)


# -- start ---------------------------------------------------------------------------------


async def test_start_creates_then_observes_by_key(store: Store) -> None:
    first = await store.start(
        make_run("r1"), lease_owner=None, lease_seconds=0, idempotency_key="k", input_hash="h1"
    )
    assert first == Started("r1", True, "h1")
    again = await store.start(
        make_run("r2"), lease_owner="x", lease_seconds=60, idempotency_key="k", input_hash="h2"
    )
    assert again == Started("r1", False, "h1")
    assert await store.load("r2") is None
    row = await must_load(store, "r1")
    assert (row.idempotency_key, row.owner, row.version) == ("k", None, 1)
    # The key is unique per workflow name only.
    other = await store.start(
        make_run("r3", name="other"), lease_owner=None, lease_seconds=0, idempotency_key="k"
    )
    assert other == Started("r3", True, None)


async def test_start_observes_by_id_and_takes_the_row_key(store: Store) -> None:
    run = make_run("r1", idempotency_key="from-row", priority=5, attempt=2)
    assert await store.start(run, lease_owner="a", lease_seconds=LONG_LEASE) == Started(
        "r1", True, None
    )
    row = await must_load(store, "r1")
    assert (row.owner, row.claims, row.idempotency_key, row.priority, row.attempt) == (
        "a",
        1,
        "from-row",
        5,
        2,
    )
    assert row.lease_until is not None
    same_id = await store.start(make_run("r1", name="else"), lease_owner=None, lease_seconds=0)
    assert same_id == Started("r1", False, None)
    by_row_key = await store.start(
        make_run("r9", idempotency_key="from-row"), lease_owner=None, lease_seconds=0
    )
    assert by_row_key.run_id == "r1" and not by_row_key.created


async def test_create_refuses_a_taken_idempotency_key(store: Store) -> None:
    await add(store, "r1", idempotency_key="k")
    with pytest.raises(ConcurrentModificationError):
        await add(store, "r2", idempotency_key="k")
    assert await store.load("r2") is None
    await add(store, "r3", name="other", idempotency_key="k")


async def test_concurrent_starts_with_one_key_create_one_run(
    store: Store, others: list[Store]
) -> None:
    stores = [store, *others]
    results = await asyncio.gather(
        *(
            stores[i % len(stores)].start(
                make_run(f"r{i}"), lease_owner=None, lease_seconds=0, idempotency_key="once"
            )
            for i in range(12)
        )
    )
    created = [r for r in results if r.created]
    assert len(created) == 1
    assert {r.run_id for r in results} == {created[0].run_id}
    assert await store.counts() == {"pending": 1}


# -- claim_due -------------------------------------------------------------------------------


async def test_claim_due_takes_unowned_pending_runs(store: Store) -> None:
    await add(store, "r1", version=3, fence=4)
    rows = await store.claim_due("me", ["wf"], 10, LONG_LEASE)
    assert [r.id for r in rows] == ["r1"]
    got = rows[0]
    assert (got.owner, got.fence, got.claims, got.version, got.status) == ("me", 5, 1, 4, "pending")
    assert got.lease_until is not None and got.steps == ()
    assert await must_load(store, "r1") == got
    # Claimed now: a live lease, so nobody claims it again.
    assert await claimed_ids(store) == []


async def test_claim_due_never_takes_a_live_lease_and_takes_expired_ones_first(
    store: Store,
) -> None:
    await add(store, "fresh", created=1)
    await add(store, "live", owner="a", status="running", created=0)
    await add(store, "expired", owner="a", lease=0, status="running", created=2)
    await add(store, "rolling", owner="a", lease=0, status="rolling_back", created=3)
    assert await claimed_ids(store) == ["expired", "rolling", "fresh"]
    assert (await must_load(store, "live")).owner == "a"
    assert (await must_load(store, "expired")).fence == 2


async def test_claim_due_order_limit_and_names(store: Store) -> None:
    await add(store, "low", created=0)
    await add(store, "high", created=5, priority=10)
    await add(store, "early", created=9, run_after=PAST)
    await add(store, "late", created=1)
    await add(store, "elsewhere", name="other", created=0)
    # Priority first, then run_after (else created_at).
    assert await claimed_ids(store, limit=2) == ["high", "early"]
    assert await claimed_ids(store, limit=0) == []
    assert await claimed_ids(store, names=["nothing"]) == []
    assert await store.claim_due("me", [], 10, LONG_LEASE) == []
    assert await claimed_ids(store) == ["low", "late"]
    assert await claimed_ids(store, names=["wf", "other"]) == ["elsewhere"]


async def test_claim_due_timers(store: Store) -> None:
    await add(store, "sleeping", status="suspended", wait_kind="sleep", run_after=FUTURE)
    await add(store, "woken", status="suspended", wait_kind="sleep", run_after=PAST)
    await add(store, "delayed", status="pending", run_after=FUTURE)
    await add(store, "no-timer", status="suspended", wait_kind="sleep")
    await add(store, "paused", status="paused")
    assert await claimed_ids(store) == ["woken"]


async def test_claim_due_signal_waits_need_a_matching_unconsumed_signal(store: Store) -> None:
    await add(store, "w", status="suspended", wait_kind="signal", wait_name="go", run_after=FUTURE)
    assert await claimed_ids(store) == []
    await store.send_signal("w", "other", "1")
    assert await claimed_ids(store) == []
    sent = await store.send_signal("w", "go", '{"ok":true}')
    # Consumed: not due any more (the consuming transition also releases the run).
    await store.apply(t("w", 1, consume_signal=SignalRef(sent.seq, 0)))
    assert await claimed_ids(store) == []
    await store.send_signal("w", "go", "2")
    rows = await store.claim_due("me", ["wf"], 10, LONG_LEASE)
    assert [r.id for r in rows] == ["w"] and rows[0].version == 3


async def test_claim_due_takes_unowned_runs_with_a_request(store: Store) -> None:
    await add(store, "waiting", status="suspended", wait_kind="signal", wait_name="go")
    await add(store, "paused", status="paused")
    await add(store, "owned", status="running", owner="a")
    await add(store, "later", status="pending", run_after=FUTURE)
    for run_id in ("waiting", "paused", "owned", "later"):
        assert await store.request(run_id, "cancel") is True
    assert sorted(await claimed_ids(store)) == ["later", "paused", "waiting"]


async def test_claim_due_never_takes_finished_runs(store: Store) -> None:
    for i, status in enumerate(FINISHED_STATUSES):
        await add(store, f"f{i}", status=status, run_after=PAST, owner="a", lease=0)
    assert await claimed_ids(store) == []


async def test_concurrent_claimers_never_get_the_same_run(
    store: Store, others: list[Store]
) -> None:
    for i in range(30):
        await add(store, f"r{i:02d}", created=i)
    stores = [store, *others]

    async def claimer(n: int) -> list[str]:
        got: list[str] = []
        while True:
            rows = await stores[n].claim_due(f"owner-{n}", ["wf"], 3, LONG_LEASE)
            if not rows:
                return got
            got += [r.id for r in rows]

    results = await asyncio.gather(*(claimer(n) for n in range(len(stores))))
    everything = [i for got in results for i in got]
    assert sorted(everything) == [f"r{i:02d}" for i in range(30)]  # each exactly once
    for n, got in enumerate(results):
        for run_id in got:
            row = await must_load(store, run_id)
            assert (row.owner, row.fence, row.claims) == (f"owner-{n}", 2, 1)


# -- next_due --------------------------------------------------------------------------------


async def test_next_due_is_the_earliest_timer(store: Store) -> None:
    assert await store.next_due(["wf"]) is None
    await add(store, "a", status="suspended", run_after=FUTURE)
    await add(store, "b", status="pending", run_after=FUTURE - dt.timedelta(days=1))
    await add(store, "c", status="completed", run_after=PAST)
    await add(store, "d", name="other", status="suspended", run_after=PAST)
    await add(store, "e", status="running", run_after=PAST)
    assert await store.next_due(["wf"]) == FUTURE - dt.timedelta(days=1)
    assert await store.next_due(["wf", "other"]) == PAST
    assert await store.next_due([]) is None


# -- signals ---------------------------------------------------------------------------------


async def test_signals_are_kept_in_order_per_name(store: Store) -> None:
    await add(store, "r1", status="running")
    assert await store.send_signal("r1", "go", '{"n":1}') == SignalSent(1, True)
    assert await store.send_signal("r1", "stop", "null") == SignalSent(2, True)
    assert await store.send_signal("r1", "go", '{"n":2}', dedupe_key="d") == SignalSent(3, True)
    rows = await store.list_signals("r1")
    assert [(s.seq, s.name, s.dedupe_key, s.consumed_by_step) for s in rows] == [
        (1, "go", None, None),
        (2, "stop", None, None),
        (3, "go", "d", None),
    ]
    assert all(s.created_at.tzinfo is not None for s in rows)
    first = await store.first_signal("r1", "go")
    assert first is not None and first.seq == 1 and first.payload.replace(" ", "") == '{"n":1}'
    assert await store.first_signal("r1", "none") is None
    assert await store.first_signal("nope", "go") is None
    assert await store.list_signals("nope") == []


async def test_signals_dedupe_per_run(store: Store) -> None:
    await add(store, "r1")
    await add(store, "r2")
    assert await store.send_signal("r1", "go", "1", dedupe_key="k") == SignalSent(1, True)
    assert await store.send_signal("r1", "go", "2", dedupe_key="k") == SignalSent(1, False)
    assert await store.send_signal("r1", "other", "3", dedupe_key="k") == SignalSent(1, False)
    assert await store.send_signal("r2", "go", "4", dedupe_key="k") == SignalSent(1, True)
    assert await store.send_signal("r1", "go", "5") == SignalSent(2, True)
    assert [s.payload for s in await store.list_signals("r1")] == ["1", "5"]


async def test_signals_to_unknown_or_finished_runs_are_refused(store: Store) -> None:
    with pytest.raises(WorkflowNotFoundError):
        await store.send_signal("nope", "go", "1")
    for status in FINISHED_STATUSES:
        await add(store, status, status=status)
        with pytest.raises(InvalidStateError):
            await store.send_signal(status, "go", "1")
        assert await store.list_signals(status) == []
    await add(store, "paused", status="paused")
    assert (await store.send_signal("paused", "go", "1")).created


async def test_a_repeated_signal_to_a_run_finished_since_is_answered_false(store: Store) -> None:
    # A sender retrying with its dedupe key after the signal finished the run (two senders
    # racing, say) is told "seen before", not refused: the key decides before the status.
    await add(store, "r1", owner="a", status="running")
    assert await store.send_signal("r1", "go", "1", dedupe_key="k") == SignalSent(1, True)
    await store.apply(t("r1", 1, fence=1, status="completed", release=True))
    assert await store.send_signal("r1", "go", "2", dedupe_key="k") == SignalSent(1, False)
    with pytest.raises(InvalidStateError):
        await store.send_signal("r1", "go", "3", dedupe_key="other")
    with pytest.raises(InvalidStateError):
        await store.send_signal("r1", "go", "4")
    assert [s.payload for s in await store.list_signals("r1")] == ["1"]


async def test_a_signal_payload_must_be_json(store: Store) -> None:
    await add(store, "r1")
    for bad in ("{", "NaN", "", "[1,]"):
        with pytest.raises(InvalidArgumentError):
            await store.send_signal("r1", "go", bad)
    assert await store.list_signals("r1") == []


async def test_a_signal_is_consumed_exactly_once(store: Store) -> None:
    await add(store, "r1", owner="a", status="running")
    sent = await store.send_signal("r1", "go", '"x"')
    await store.apply(
        t("r1", 1, fence=1, insert_step=make_step(0), consume_signal=SignalRef(sent.seq, 0))
    )
    consumed = (await store.list_signals("r1"))[0]
    assert (consumed.consumed_by_step, consumed.consumed_at) == (0, at(101))
    assert await store.first_signal("r1", "go") is None
    before = await must_load(store, "r1")
    with pytest.raises(ConcurrentModificationError):
        await store.apply(
            t("r1", 2, fence=1, insert_step=make_step(1), consume_signal=SignalRef(sent.seq, 1))
        )
    with pytest.raises(ConcurrentModificationError):
        await store.apply(t("r1", 2, fence=1, consume_signal=SignalRef(99, 1)))
    # Refused: nothing changed, not even the run's version or its steps.
    assert await must_load(store, "r1") == before
    assert (await store.list_signals("r1"))[0] == consumed


async def test_two_transitions_racing_for_one_signal(store: Store, others: list[Store]) -> None:
    await add(store, "r1", owner="a", status="running")
    sent = await store.send_signal("r1", "go", "1")
    stores = [store, *others]
    outcomes = await asyncio.gather(
        *(
            s.apply(t("r1", 1, fence=1, status="running", consume_signal=SignalRef(sent.seq, i)))
            for i, s in enumerate(stores)
        ),
        return_exceptions=True,
    )
    applied = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(applied) == 1
    assert all(isinstance(o, ConcurrentModificationError) for o in outcomes if o not in applied)
    assert (await must_load(store, "r1")).version == 2


async def test_deleting_a_run_deletes_its_inbox(store: Store) -> None:
    await add(store, "r1")
    await store.send_signal("r1", "go", "1")
    assert await store.delete("r1") is True
    await add(store, "r1")
    assert await store.list_signals("r1") == []
    assert (await store.send_signal("r1", "go", "1")).seq == 1


# -- transitions: the scheduling patches -----------------------------------------------------


async def test_transition_scheduling_patches(store: Store) -> None:
    await add(store, "r1", owner="a", status="running")
    await store.apply(
        t(
            "r1",
            1,
            fence=1,
            status="suspended",
            wait_kind="backoff",
            run_after=FUTURE,
            attempt=3,
            release=True,
        )
    )
    row = await must_load(store, "r1")
    assert (row.status, row.wait_kind, row.run_after, row.attempt, row.owner) == (
        "suspended",
        "backoff",
        FUTURE,
        3,
        None,
    )
    # KEEP leaves every scheduling column alone.
    await store.apply(t("r1", 2, claim=Claim("b", LONG_LEASE)))
    kept = await must_load(store, "r1")
    assert (kept.wait_kind, kept.run_after, kept.attempt) == ("backoff", FUTURE, 3)
    await store.apply(t("r1", 3, fence=2, run_after=None, wait_kind=None, attempt=0))
    cleared = await must_load(store, "r1")
    assert (cleared.wait_kind, cleared.run_after, cleared.attempt) == (None, None, 0)


# -- requests ---------------------------------------------------------------------------------


async def test_requests(store: Store) -> None:
    with pytest.raises(WorkflowNotFoundError):
        await store.request("nope", "cancel")
    with pytest.raises(InvalidArgumentError):
        await store.request("nope", "stop")  # type: ignore[arg-type]
    await add(store, "r1", status="running", owner="a")
    assert await store.request("r1", "pause", "tea break") is True
    assert await store.request("r1", "pause", "again") is True  # idempotent
    row = await must_load(store, "r1")
    assert (row.requested, row.request_reason, row.version) == ("pause", "tea break", 1)
    assert await store.request("r1", "cancel", "stop it") is True  # cancel beats pause
    assert await store.request("r1", "pause") is True  # ... never the reverse
    row = await must_load(store, "r1")
    assert (row.requested, row.request_reason) == ("cancel", "stop it")
    for status in FINISHED_STATUSES:
        await add(store, status, status=status)
        assert await store.request(status, "cancel") is False
        assert (await must_load(store, status)).requested is None


async def test_renew_leases_reports_requests_and_a_transition_clears_them(store: Store) -> None:
    await add(store, "r1", status="running", owner="a")
    await add(store, "r2", status="running", owner="a")
    await store.request("r1", "cancel", "why")
    await store.request("r2", "pause")
    renewed = await asyncio.to_thread(store.renew_leases, "a", {"r1": 1, "r2": 1}, LONG_LEASE)
    assert renewed.lost == set() and renewed.requested == {"r1": "cancel", "r2": "pause"}
    # The owner's step commits still apply (a request does not move the version).
    await store.apply(t("r1", 1, fence=1, insert_step=make_step(0), requested=None))
    row = await must_load(store, "r1")
    assert (row.requested, row.request_reason, row.version) == (None, None, 2)
    renewed = await asyncio.to_thread(store.renew_leases, "a", {"r1": 1, "r2": 7}, LONG_LEASE)
    assert renewed.lost == {"r2"} and renewed.requested == {}


async def test_clearing_a_pause_leaves_a_cancel(store: Store) -> None:
    await add(store, "p", status="running", owner="a")
    await add(store, "c", status="running", owner="a")
    await store.request("p", "pause", "tea")
    await store.request("c", "pause")
    await store.request("c", "cancel", "stop")  # came after the pause: it must survive
    await store.apply(t("p", 1, fence=1, requested="pause"))
    await store.apply(t("c", 1, fence=1, requested="pause"))
    row_p, row_c = await must_load(store, "p"), await must_load(store, "c")
    assert (row_p.requested, row_p.request_reason) == (None, None)
    assert (row_c.requested, row_c.request_reason) == ("cancel", "stop")


# -- counts -----------------------------------------------------------------------------------


async def test_counts(store: Store) -> None:
    assert await store.counts() == {}
    await add(store, "a", status="pending")
    await add(store, "b", status="pending")
    await add(store, "c", status="completed")
    await add(store, "d", name="other", status="pending")
    assert await store.counts() == {"pending": 3, "completed": 1}
    assert await store.counts("wf") == {"pending": 2, "completed": 1}
    assert await store.counts("nothing") == {}


async def test_new_columns_read_back(store: Store) -> None:
    run = make_run(
        "r1",
        run_after=PAST,
        wait_kind="signal",
        wait_name="go",
        attempt=4,
        requested="pause",
        request_reason="r",
        priority=-3,
        idempotency_key="k",
    )
    await store.create(run, lease_owner=None, lease_seconds=0)
    got = await must_load(store, "r1")
    assert replace(got, input=run.input) == run
