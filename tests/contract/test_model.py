"""Model-based test of the store protocol: SQLite and PostgreSQL against MemoryStorage.

A Hypothesis state machine drives random sequences of store calls (create; apply with random
transitions: status and column changes, step inserts, updates and deletes, appended attempts,
claims by two logical owners, renewals, releases, stale versions and stale fences; load;
list_runs with random filters; list_attempts; delete; find_recoverable; renew_leases; and
the scheduling verbs: start, claim_due, next_due, send_signal, list_signals, first_signal,
request, counts, with transitions that patch the scheduling columns and consume signals)
against the backend under test and against MemoryStorage, the reference model. Every call
must have the same outcome on both (the same result, or the same exception type), and after
every step both must list the same runs.

Leases are an hour long, so every lease a run holds is live for the whole example and the
two stores' clocks never matter; expiry is covered by ``test_store.py``. The store calls are
async and the state machine is not: each machine runs them on an event loop of its own.

Set ``FLUXRUN_MODEL_EXAMPLES`` to run more (and non-derandomized) examples, e.g. 2000.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import os
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest
from contract_support import LONG_LEASE, T0, canonical_text, open_store, seen
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from fluxrun import StepStatus, WorkflowStatus
from fluxrun._codec import encode
from fluxrun._state import changes_text
from fluxrun.errors import (
    ConcurrentModificationError,
    InvalidStateError,
    LeaseLostError,
    RunBusyError,
    WorkflowNotFoundError,
)
from fluxrun.storage._base import (
    KEEP,
    AttemptRow,
    Claim,
    ListQuery,
    RunRow,
    SignalRef,
    SignalRow,
    StepRow,
    Store,
    Transition,
)
from fluxrun.storage.memory import MemoryStorage

T = TypeVar("T")

REFUSALS = {
    cls.__name__
    for cls in (
        ConcurrentModificationError,
        LeaseLostError,
        RunBusyError,
        WorkflowNotFoundError,  # send_signal / request on an unknown run
        InvalidStateError,  # send_signal to a finished run
    )
}

_EXAMPLES_ENV = os.environ.get("FLUXRUN_MODEL_EXAMPLES")
MODEL_SETTINGS = settings(
    max_examples=int(_EXAMPLES_ENV or 50),
    stateful_step_count=30,
    deadline=None,
    # Same examples on every run unless more are asked for explicitly.
    derandomize=_EXAMPLES_ENV is None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# Names and ids include LIKE wildcards, so a filter that matched by pattern would diverge.
NAMES = ("alpha", "beta", "a%", "a_pha")
IDS = ("r0", "r1", "r2", "r3", "r4", "r5", "r_", "r%")
OWNERS = ("A", "B")
KEYS = ("k1", "k2", "%")
SIGNALS = ("go", "stop", "%")
#: run_after values: the past of every store's clock (T0 is in 2024), or far ahead of it.
RUN_AFTER = (T0, T0 + dt.timedelta(seconds=3), dt.datetime(2200, 1, 1, tzinfo=dt.UTC))
WAIT_KINDS = ("signal", "sleep", "backoff")
WORKFLOW_STATUSES = tuple(WorkflowStatus)
STEP_STATUSES = tuple(s.value for s in StepStatus)
TEXTS = ("", "x", "'; DROP TABLE flux_runs;--", "%", "😀 שלום")

JSON_VALUES: tuple[Any, ...] = (
    None,
    0,
    -0.0,
    1.5,
    1e16,
    2**70,
    "",
    "😀",
    [],
    {},
    {"b": 1, "a": []},
)
JSON_TEXTS = tuple(encode(v) for v in JSON_VALUES)
CHANGES = tuple(
    changes_text(sets, dels)
    for sets, dels in (
        ({}, []),
        ({"k": encode(1)}, []),
        ({"k": encode("v"), "big": encode(2**80)}, ["gone"]),
        ({}, ["k"]),
    )
)


def moments() -> st.SearchStrategy[dt.datetime]:
    """Instants with microseconds, a few of them equal on purpose."""
    return st.integers(min_value=0, max_value=5).map(
        lambda n: T0 + dt.timedelta(seconds=n, microseconds=n * 7)
    )


def maybe(strategy: st.SearchStrategy[T]) -> st.SearchStrategy[T | None]:
    return st.none() | strategy


def keep_or(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.just(KEEP) | strategy


step_rows = st.builds(
    StepRow,
    index=st.integers(min_value=0, max_value=4),
    name=st.sampled_from(("a", "b", "c", "d", "e")),
    status=st.sampled_from(STEP_STATUSES),
    started_at=maybe(moments()),
    completed_at=maybe(moments()),
    suspended_at=maybe(moments()),
    compensated_at=maybe(moments()),
    waiting_for=maybe(st.sampled_from(("approved", "%"))),
    duration_ms=maybe(st.sampled_from((0.0, 1.5, 1234.5678, 1e-3))),
    output=maybe(st.sampled_from(JSON_TEXTS)),
    error=maybe(st.sampled_from(TEXTS)),
    retries=st.integers(min_value=0, max_value=3),
    changes=maybe(st.sampled_from(CHANGES)),
    compensation_changes=maybe(st.sampled_from(CHANGES)),
    fence=st.integers(min_value=0, max_value=5),
    error_type=maybe(st.sampled_from(("builtins.KeyError", "%"))),
    traceback=maybe(st.sampled_from(TEXTS)),
)

attempt_rows = st.builds(
    AttemptRow,
    index=st.integers(min_value=0, max_value=4),
    name=st.sampled_from(("a", "b", "😀")),
    attempt=st.integers(min_value=1, max_value=3),
    kind=st.sampled_from(("step", "compensation")),
    status=st.sampled_from(STEP_STATUSES),
    started_at=maybe(moments()),
    finished_at=maybe(moments()),
    duration_ms=maybe(st.sampled_from((0.0, 1.5, 1234.5678))),
    error_type=maybe(st.sampled_from(("builtins.KeyError", "_"))),
    error=maybe(st.sampled_from(TEXTS)),
    traceback=maybe(st.sampled_from(TEXTS)),
)


new_runs = st.tuples(
    st.builds(
        RunRow,
        id=st.sampled_from(IDS),
        name=st.sampled_from(NAMES),
        status=st.sampled_from(WORKFLOW_STATUSES).map(str),
        input=st.sampled_from(JSON_TEXTS),
        step_names=st.sampled_from((("a", "b", "c"), ("😀", "%"), ())),
        current_step=st.integers(min_value=0, max_value=3),
        created_at=moments(),
        updated_at=moments(),
        version=st.sampled_from((1, 2, 7)),
        fence=st.sampled_from((0, 1, 5)),
        definition_version=maybe(st.sampled_from(("v1", "%"))),
        error=maybe(st.sampled_from(TEXTS)),
        completed_at=maybe(moments()),
        wait_name=maybe(st.sampled_from(("approved", "_"))),
        # A store takes the owner from create()'s arguments, never from the row.
        owner=maybe(st.just("ghost")),
        claims=st.sampled_from((0, 3)),
        run_after=maybe(st.sampled_from(RUN_AFTER)),
        wait_kind=maybe(st.sampled_from(WAIT_KINDS)),
        attempt=st.sampled_from((0, 2)),
        requested=maybe(st.sampled_from(("cancel", "pause"))),
        request_reason=maybe(st.sampled_from(TEXTS)),
        priority=st.sampled_from((-1, 0, 3)),
        idempotency_key=maybe(st.sampled_from(KEYS)),
    ),
    maybe(st.sampled_from(OWNERS)),
)
"""A run to create, and the owner to create it for (or None)."""


class StoreModel(RuleBasedStateMachine):
    """Runs every call on the reference and on the subject, and compares."""

    def __init__(self, make_subject: Callable[[], Awaitable[Store]]) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.oracle: Store = MemoryStorage()
        self.subject: Store | None = None
        try:
            self.subject = self.run(make_subject())
        except BaseException:
            self.loop.close()  # teardown() is not called when __init__ fails
            raise
        self.ticks = itertools.count(1)

    def run(self, coro: Awaitable[T]) -> T:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        try:
            if self.subject is not None:
                self.run(self.subject.close())
        finally:
            self.loop.close()

    def tick(self) -> dt.datetime:
        """A fresh updated_at for each transition (the caller's clock, not the store's)."""
        return T0 + dt.timedelta(seconds=100, microseconds=next(self.ticks))

    def outcome(self, store: Store, call: Callable[[Store], Awaitable[Any]]) -> Any:
        try:
            return ("ok", self.run(call(store)))
        except Exception as exc:
            # Only the type is the contract; messages are each backend's own.
            return ("raised", type(exc).__name__, str(exc))

    def both(
        self, what: str, call: Callable[[Store], Awaitable[Any]], view: Callable[[Any], Any]
    ) -> None:
        assert self.subject is not None
        want = self.outcome(self.oracle, call)
        # The protocol's only refusals are ConcurrentModificationError and its subclasses;
        # anything else the reference raises is a bug in the test or in the reference.
        assert want[0] == "ok" or want[1] in REFUSALS, f"{what}\n  memory: {want}"
        got = self.outcome(self.subject, call)

        def comparable(result: Any) -> Any:
            return ("ok", view(result[1])) if result[0] == "ok" else result[:2]

        assert comparable(got) == comparable(want), f"{what}\n  memory:  {want}\n  subject: {got}"

    def current(self, run_id: str) -> RunRow | None:
        return self.run(self.oracle.load(run_id))

    # -- rules --------------------------------------------------------------------------------

    def create_run(self, row: RunRow, owner: str | None) -> None:
        self.both(
            f"create {row} owned by {owner}",
            lambda s: s.create(row, lease_owner=owner, lease_seconds=LONG_LEASE),
            lambda r: r,
        )

    @initialize(runs=st.lists(new_runs, min_size=2, max_size=6))
    def seed(self, runs: list[tuple[RunRow, str | None]]) -> None:
        for row, owner in runs:
            self.create_run(row, owner)

    @rule(new=new_runs)
    def create(self, new: tuple[RunRow, str | None]) -> None:
        self.create_run(*new)

    def pick_id(self, data: st.DataObject) -> str:
        """Mostly a run that exists (so that calls get past "no such run"), else any id."""
        existing = [r.id for r in self.run(self.oracle.list_runs(ListQuery()))]
        if existing and data.draw(st.sampled_from((True,) * 9 + (False,)), label="existing?"):
            return data.draw(st.sampled_from(sorted(existing)), label="run_id")
        return data.draw(st.sampled_from(IDS), label="run_id")

    def pick_step(self, data: st.DataObject, indexes: list[int], what: str) -> StepRow:
        """A step row, mostly at one of ``indexes`` (where the write can apply)."""
        step = data.draw(step_rows, label=what)
        if indexes and data.draw(st.sampled_from((True, True, True, False)), label=f"{what} fits?"):
            step = replace(step, index=data.draw(st.sampled_from(indexes), label=f"{what} index"))
        return step

    @rule(data=st.data())
    def apply(self, data: st.DataObject) -> None:
        self.apply_one(data)

    @rule(data=st.data())
    def apply_again(self, data: st.DataObject) -> None:
        """The same as ``apply``: transitions are where the protocol is subtle, so they get
        twice the weight of the other calls."""
        self.apply_one(data)

    def apply_one(self, data: st.DataObject) -> None:
        run_id = self.pick_id(data)
        row = self.current(run_id)
        version = row.version if row is not None else 1
        fence = row.fence if row is not None else 1
        expected = data.draw(
            st.sampled_from((version,) * 5 + (version - 1, version + 1)), label="expected_version"
        )
        # Mostly what a well-behaved writer would do in this state, sometimes not.
        if row is not None and row.owner is not None:
            modes = ("fenced",) * 5 + ("stale fence", "unowned", "claim", "fenced claim")
        else:
            modes = ("unowned",) * 3 + ("claim",) * 3 + ("fenced", "stale fence", "fenced claim")
        mode = data.draw(st.sampled_from(modes), label="mode")
        claim = None
        if mode in ("claim", "fenced claim"):
            claim = Claim(data.draw(st.sampled_from(OWNERS), label="owner"), LONG_LEASE)
        given_fence = {"fenced": fence, "stale fence": fence - 1, "fenced claim": fence}.get(mode)
        present = sorted({s.index for s in row.steps}) if row is not None else []
        absent = [i for i in range(5) if i not in present]
        insert = update = None
        if data.draw(st.sampled_from((True, False)), label="insert?"):
            insert = self.pick_step(data, absent, "insert_step")
        # An update applies to a recorded row, or to the row this transition inserts.
        updatable = sorted({*present, *([] if insert is None else [insert.index])})
        if data.draw(
            st.sampled_from((False, False, True) if updatable else (False,) * 11 + (True,)),
            label="update?",
        ):
            update = self.pick_step(data, updatable, "update_step")
        delete_from = None
        keep: tuple[int, ...] = ()
        if data.draw(st.sampled_from((False, False, False, True)), label="delete?"):
            # Mostly from a recorded row, so that something is deleted.
            starts = present or list(range(5))
            delete_from = data.draw(
                st.sampled_from(starts) | st.integers(min_value=0, max_value=4), label="delete_from"
            )
            kept = data.draw(st.sets(st.integers(min_value=0, max_value=4)), label="keep")
            keep = tuple(sorted(kept))
        t = Transition(
            run_id=run_id,
            expected_version=expected,
            updated_at=self.tick(),
            fence=given_fence,
            claim=claim,
            status=data.draw(keep_or(st.sampled_from(WORKFLOW_STATUSES).map(str)), label="status"),
            current_step=data.draw(keep_or(st.integers(0, 4)), label="current_step"),
            error=data.draw(keep_or(maybe(st.sampled_from(TEXTS))), label="error"),
            completed_at=data.draw(keep_or(maybe(moments())), label="completed_at"),
            wait_name=data.draw(keep_or(maybe(st.sampled_from(("approved", "_")))), label="wait"),
            insert_step=insert,
            update_step=update,
            delete_steps_from=delete_from,
            keep_steps=keep,
            renew_lease=data.draw(st.sampled_from((None, None, LONG_LEASE)), label="renew"),
            release=data.draw(st.sampled_from((False, False, False, True)), label="release"),
            attempts=tuple(data.draw(st.lists(attempt_rows, max_size=2), label="attempts")),
            run_after=data.draw(keep_or(maybe(st.sampled_from(RUN_AFTER))), label="run_after"),
            wait_kind=data.draw(keep_or(maybe(st.sampled_from(WAIT_KINDS))), label="wait_kind"),
            attempt=data.draw(keep_or(st.integers(0, 3)), label="attempt"),
            requested=data.draw(st.sampled_from((KEEP, KEEP, None)), label="requested"),
            consume_signal=data.draw(
                st.sampled_from((None, None, None))
                | st.builds(SignalRef, st.integers(1, 4), st.integers(0, 4)),
                label="consume",
            ),
        )
        self.both(f"apply {t}", lambda s: s.apply(t), lambda applied: applied)

    @rule(data=st.data())
    def load(self, data: st.DataObject) -> None:
        run_id = self.pick_id(data)
        self.both(f"load {run_id!r}", lambda s: s.load(run_id), seen)

    @rule(
        name=maybe(st.sampled_from((*NAMES, "a", "%", "_", "ALPHA"))),
        statuses=maybe(st.lists(st.sampled_from(WORKFLOW_STATUSES), unique=True, max_size=4)),
        limit=maybe(st.integers(min_value=0, max_value=6)),
        offset=st.integers(min_value=0, max_value=6),
    )
    def list_runs(
        self,
        name: str | None,
        statuses: list[WorkflowStatus] | None,
        limit: int | None,
        offset: int,
    ) -> None:
        query = ListQuery(
            name=name,
            statuses=None if statuses is None else tuple(statuses),
            limit=limit,
            offset=offset,
        )
        self.both(f"list_runs {query}", lambda s: s.list_runs(query), lambda rows: _all(rows))

    @rule(data=st.data())
    def list_attempts(self, data: st.DataObject) -> None:
        run_id = self.pick_id(data)
        self.both(f"list_attempts {run_id!r}", lambda s: s.list_attempts(run_id), lambda r: r)

    @rule(run_id=st.sampled_from(IDS))
    def delete(self, run_id: str) -> None:
        self.both(f"delete {run_id!r}", lambda s: s.delete(run_id), lambda r: r)

    @rule(
        names=st.lists(st.sampled_from((*NAMES, "%")), unique=True, max_size=3),
        limit=st.integers(min_value=0, max_value=6),
    )
    def find_recoverable(self, names: list[str], limit: int) -> None:
        self.both(
            f"find_recoverable {names} {limit}",
            lambda s: s.find_recoverable(names, limit),
            lambda rows: _all(rows),
        )

    @rule(
        owner=st.sampled_from(OWNERS),
        fences=st.dictionaries(
            st.sampled_from(IDS), st.integers(min_value=0, max_value=5), max_size=3
        ),
    )
    def renew_leases(self, owner: str, fences: dict[str, int]) -> None:
        # Called from a thread of its own, as the engine's lease keeper does.
        self.both(
            f"renew_leases {owner} {fences}",
            lambda s: asyncio.to_thread(s.renew_leases, owner, fences, LONG_LEASE),
            lambda renewed: renewed,
        )

    # -- scheduling verbs ------------------------------------------------------------------------

    @rule(new=new_runs, key=maybe(st.sampled_from(KEYS)), digest=maybe(st.sampled_from("ab")))
    def start(self, new: tuple[RunRow, str | None], key: str | None, digest: str | None) -> None:
        row, owner = new
        self.both(
            f"start {row} owned by {owner} key {key} hash {digest}",
            lambda s: s.start(
                row,
                lease_owner=owner,
                lease_seconds=LONG_LEASE,
                idempotency_key=key,
                input_hash=digest,
            ),
            lambda started: started,
        )

    @rule(
        owner=st.sampled_from(OWNERS),
        names=st.lists(st.sampled_from((*NAMES, "%")), unique=True, max_size=3),
        limit=st.integers(min_value=0, max_value=4),
    )
    def claim_due(self, owner: str, names: list[str], limit: int) -> None:
        self.both(
            f"claim_due {owner} {names} {limit}",
            lambda s: s.claim_due(owner, names, limit, LONG_LEASE),
            lambda rows: _all(rows),
        )

    @rule(names=st.lists(st.sampled_from((*NAMES, "%")), unique=True, max_size=3))
    def next_due(self, names: list[str]) -> None:
        self.both(f"next_due {names}", lambda s: s.next_due(names), lambda due: due)

    @rule(
        data=st.data(),
        name=st.sampled_from(SIGNALS),
        payload=st.sampled_from(JSON_TEXTS),
        dedupe=maybe(st.sampled_from(KEYS)),
    )
    def send_signal(self, data: st.DataObject, name: str, payload: str, dedupe: str | None) -> None:
        run_id = self.pick_id(data)
        self.both(
            f"send_signal {run_id!r} {name!r} {payload!r} {dedupe!r}",
            lambda s: s.send_signal(run_id, name, payload, dedupe),
            lambda sent: sent,
        )

    @rule(data=st.data(), name=st.sampled_from(SIGNALS))
    def read_signals(self, data: st.DataObject, name: str) -> None:
        run_id = self.pick_id(data)
        self.both(
            f"list_signals {run_id!r}",
            lambda s: s.list_signals(run_id),
            lambda rows: [_signal(r) for r in rows],
        )
        self.both(
            f"first_signal {run_id!r} {name!r}",
            lambda s: s.first_signal(run_id, name),
            lambda row: None if row is None else _signal(row),
        )

    @rule(
        data=st.data(),
        kind=st.sampled_from(("cancel", "pause")),
        reason=maybe(st.sampled_from(TEXTS)),
    )
    def request(self, data: st.DataObject, kind: str, reason: str | None) -> None:
        run_id = self.pick_id(data)
        self.both(
            f"request {run_id!r} {kind} {reason!r}",
            lambda s: s.request(run_id, kind, reason),  # type: ignore[arg-type]
            lambda done: done,
        )

    @rule(name=maybe(st.sampled_from((*NAMES, "%"))))
    def counts(self, name: str | None) -> None:
        self.both(f"counts {name!r}", lambda s: s.counts(name), lambda found: found)

    @invariant()
    def same_runs(self) -> None:
        self.both("list everything", lambda s: s.list_runs(ListQuery()), lambda rows: _all(rows))


def _all(rows: list[RunRow]) -> list[Any]:
    return [seen(r) for r in rows]


def _signal(row: SignalRow) -> SignalRow:
    """An inbox row comparable across backends: ``created_at`` is each store's own clock,
    and PostgreSQL's jsonb may re-space the payload."""
    return replace(row, created_at=T0, payload=canonical_text(row.payload))


def run_model(make_subject: Callable[[], Awaitable[Store]]) -> None:
    class Bound(StoreModel):
        def __init__(self) -> None:
            super().__init__(make_subject)

    run_state_machine_as_test(Bound, settings=MODEL_SETTINGS)


def test_sqlite_matches_the_model(tmp_path: Path) -> None:
    files: Iterator[int] = itertools.count()

    async def fresh() -> Store:
        # A new database file per example.
        return await open_store("sqlite", str(tmp_path / f"model-{next(files)}.db"))

    run_model(fresh)


@pytest.mark.postgres
def test_postgres_matches_the_model(fresh_pg_dsn: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(fresh_pg_dsn, autocommit=True) as admin:

        async def fresh() -> Store:
            store = await open_store("postgres", fresh_pg_dsn)
            # One database per test, emptied at the start of each example.
            tables = [
                r[0]
                for r in admin.execute(
                    "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
                    "AND tablename LIKE 'flux\\_%' AND tablename <> 'flux_schema'"
                ).fetchall()
            ]
            assert "flux_runs" in tables and "flux_steps" in tables
            admin.execute(
                sql.SQL("TRUNCATE {} RESTART IDENTITY").format(
                    sql.SQL(", ").join(sql.Identifier(t) for t in sorted(tables))
                )
            )
            return store

        run_model(fresh)
