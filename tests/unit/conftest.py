"""Fixtures shared by the unit tests: every engine test runs once per embedded backend.

``store_kind``
    Parametrized over ``"memory"`` and ``"sqlite"``; any test using one of the fixtures below
    runs once for each.
``make_store``
    Factory: ``make_store()`` returns a new, not yet initialized store of the current kind
    (SQLite files live in ``tmp_path``; each call gets its own file unless ``name=`` repeats).
``store``
    One store of the current kind (the one ``engine`` and ``engine_factory`` use by default).
``engine_factory``
    Async factory: ``await engine_factory(**kwargs)`` returns an initialized
    :class:`~fluxrun.FluxEngine` on ``store`` (override with ``storage=``) with a zero-delay,
    jitter-free retry policy (override with ``retry_policy=``). Every engine it made is
    closed after the test.
``engine``
    ``await engine_factory()``: the plain engine most tests want.
``fast_policy``
    The zero-delay :class:`~fluxrun.RetryPolicy` the factory uses, for per-step ``retry=``.
``recorder``
    A :class:`Recorder`: one ordered log of hooks, trace events, store writes and whatever
    the test's own step code notes. Pass ``trace=rec, on=rec.hooks`` to the engine and call
    ``rec.watch(store)`` to see the writes.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from fluxrun import FluxEngine, FluxTraceEvent, MemoryStorage, RetryPolicy, SQLiteStorage
from fluxrun.storage._base import KEEP, RunRow, Store, Transition

STORE_KINDS = ("memory", "sqlite")

FAST_POLICY = RetryPolicy(initial_delay=0, jitter=False)

EngineFactory = Callable[..., Awaitable[FluxEngine]]


@pytest.fixture(params=STORE_KINDS)
def store_kind(request: pytest.FixtureRequest) -> str:
    """The backend this run of the test uses."""
    return str(request.param)


@pytest.fixture
def make_store(store_kind: str, tmp_path: Path) -> Callable[..., Store]:
    """Factory of new stores of the current kind."""
    counter = itertools.count()

    def make(name: str | None = None) -> Store:
        if store_kind == "memory":
            return MemoryStorage()
        return SQLiteStorage(tmp_path / (name or f"store{next(counter)}.db"))

    return make


@pytest.fixture
def store(make_store: Callable[..., Store]) -> Store:
    """The default store of the test (``x.db`` in ``tmp_path`` for SQLite)."""
    return make_store("x.db")


@pytest.fixture
def fast_policy() -> RetryPolicy:
    """A retry policy without any wait between attempts."""
    return FAST_POLICY


@pytest.fixture
async def engine_factory(store: Store) -> AsyncIterator[EngineFactory]:
    """Make initialized engines (on ``store`` unless told otherwise); close them afterwards."""
    made: list[FluxEngine] = []

    async def factory(**kwargs: Any) -> FluxEngine:
        kwargs.setdefault("storage", store)
        kwargs.setdefault("retry_policy", FAST_POLICY)
        engine = FluxEngine(**kwargs)
        made.append(engine)
        await engine.init()
        return engine

    yield factory
    for engine in reversed(made):
        await engine.close()


@pytest.fixture
async def engine(engine_factory: EngineFactory) -> FluxEngine:
    """An initialized engine on ``store`` with zero retry delays."""
    return await engine_factory()


class Recorder:
    """Trace sink, hook set and store spy writing into one ordered ``log`` of short strings.

    Entries: ``"event <type>[ <step>]"``, ``"hook <name>[ <step>]"``, ``"save <run status>"``
    (the run's status once the write applies, whether the write sets it or keeps it)
    followed by ``" <step>:<step status>"`` when it writes a step row, and whatever the test
    adds with :meth:`note`.
    """

    def __init__(self) -> None:
        self.log: list[str] = []
        self.events: list[FluxTraceEvent] = []
        self.hook_calls: list[tuple[str, tuple[Any, ...]]] = []

    def note(self, text: str) -> None:
        """Add the test's own entry (e.g. from a step handler)."""
        self.log.append(text)

    def emit(self, event: FluxTraceEvent) -> None:
        """Trace sink interface."""
        self.events.append(event)
        self.log.append(f"event {event.type}" + (f" {event.step_name}" if event.step_name else ""))

    @property
    def hooks(self) -> dict[str, Callable[..., None]]:
        """The five hooks, each recording its call."""

        def hook(name: str) -> Callable[..., None]:
            def call(*args: Any) -> None:
                self.hook_calls.append((name, args))
                step = f" {args[0]}" if name.startswith("step_") else ""
                self.log.append(f"hook {name}{step}")

            return call

        names = ("step_start", "step_complete", "step_error", "workflow_complete", "workflow_error")
        return {n: hook(n) for n in names}

    def watch(self, store: Store) -> Store:
        """Log every ``create`` / ``apply`` of ``store`` (patched on the instance)."""
        create, apply = store.create, store.apply
        status: dict[str, str] = {}  # run id -> its status as last written

        async def spy_create(run: RunRow, **kw: Any) -> None:
            status[run.id] = run.status
            self.log.append(f"save {run.status}")
            await create(run, **kw)

        async def spy_apply(t: Transition) -> Any:
            if t.status is not KEEP:
                status[t.run_id] = str(t.status)
            elif t.run_id not in status:  # a run created before watching began
                row = await store.load(t.run_id)
                status[t.run_id] = row.status if row is not None else "?"
            text = f"save {status[t.run_id]}"
            row = t.insert_step or t.update_step
            if row is not None:
                text += f" {row.name}:{row.status}"
            for a in t.attempts:
                text += f" attempt {a.kind} {a.name}#{a.attempt}:{a.status}"
            self.log.append(text)
            return await apply(t)

        store.create = spy_create  # type: ignore[method-assign]
        store.apply = spy_apply  # type: ignore[method-assign]
        return store

    def types(self) -> list[str]:
        """The trace event types received, in order."""
        return [e.type for e in self.events]

    def of(self, type_: str) -> list[FluxTraceEvent]:
        """The events of one type, in order."""
        return [e for e in self.events if e.type == type_]

    def calls(self, hook: str) -> list[tuple[Any, ...]]:
        """The argument tuples of every call of one hook."""
        return [args for name, args in self.hook_calls if name == hook]


@pytest.fixture
def recorder() -> Recorder:
    """A fresh :class:`Recorder`."""
    return Recorder()
