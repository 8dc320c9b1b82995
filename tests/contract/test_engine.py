"""The engine on every backend: the same script of calls gives the same results and states.

Each test runs its script twice, on the backend under test and on a fresh MemoryStorage (the
reference), and compares transcripts: every call's result or error, and the states read back
with ``get`` and ``list``. Run ids are replaced by their order of appearance and timestamps
by whether they are set, since those legitimately differ between two runs.
"""

from __future__ import annotations

import datetime as dt
import decimal
import functools
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from contract_support import Backend, typed

from fluxrun import (
    FluxEngine,
    FluxResult,
    MemoryStorage,
    RetryPolicy,
    StepExecution,
    WorkflowContext,
    WorkflowFilter,
    WorkflowState,
    create_workflow,
    wait,
)
from fluxrun.errors import InvalidInputError, SerializationError
from fluxrun.storage._base import Store
from fluxrun.storage.postgres import PostgresStorage

FAST = RetryPolicy(initial_delay=0, jitter=False)
INJECTION = "'; DROP TABLE flux_runs;--"


class Transcript:
    """What a script saw, with run ids replaced by ``run#<n>`` in order of appearance."""

    def __init__(self) -> None:
        self.lines: list[Any] = []
        self._ids: dict[str, str] = {}

    def alias(self, run_id: str) -> str:
        return self._ids.setdefault(run_id, f"run#{len(self._ids)}")

    def _text(self, text: str | None) -> str | None:
        if text is None:
            return None
        for real, alias in self._ids.items():
            text = text.replace(real, alias)
        return text

    async def call(self, label: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        """Run one engine call and note its outcome; return the raw result (None on error)."""
        try:
            result = await fn()
        except Exception as exc:
            self.lines.append((label, "raised", type(exc).__name__, self._text(str(exc))))
            return None
        self.lines.append((label, self.value(result)))
        return result

    def value(self, value: Any) -> Any:
        if isinstance(value, FluxResult):
            return (
                "result",
                self.alias(value.id),
                value.status.value,
                unordered(value.data),
                self.history(value.history),
                None if value.error is None else type(value.error).__name__,
                None if value.error is None else self._text(str(value.error)),
            )
        if isinstance(value, WorkflowState):
            # Clock values differ between two runs; their order and presence may not.
            assert value.created_at <= value.updated_at
            assert value.created_at.utcoffset() == dt.timedelta(0)
            return (
                "state",
                self.alias(value.id),
                value.name,
                value.status.value,
                unordered(value.input),
                unordered(value.data),
                value.current_step,
                self.history(value.history),
                value.completed_at is not None,
                self._text(value.error),
                value.version,
                value.definition_version,
            )
        if isinstance(value, list):
            return [self.value(v) for v in value]
        return unordered(value)

    def history(self, entries: tuple[StepExecution, ...]) -> Any:
        return tuple(
            (
                e.name,
                e.status.value,
                e.waiting_for,
                unordered(e.output),
                self._text(e.error),
                e.retries,
                e.started_at is not None,
                e.completed_at is not None,
                e.suspended_at is not None,
                e.compensated_at is not None,
                e.duration_ms is not None,
            )
            for e in entries
        )


def unordered(value: Any) -> Any:
    """``value`` tagged with its types, object keys sorted: key order has its own test."""
    return typed(value, sort_keys=True)


Script = Callable[[FluxEngine, Transcript], Awaitable[None]]


async def transcript_on(store: Store, script: Script) -> list[Any]:
    engine = FluxEngine(storage=store, retry_policy=FAST)
    await engine.init()
    seen = Transcript()
    try:
        await script(engine, seen)
    finally:
        await engine.close()
    return seen.lines


async def assert_same_as_memory(store: Store, script: Script) -> list[Any]:
    expected = await transcript_on(MemoryStorage(), script)
    got = await transcript_on(store, script)
    for i, (want, have) in enumerate(zip(expected, got, strict=False)):
        assert have == want, f"call {i} differs"
    assert len(got) == len(expected)
    return got


# -- the order saga ----------------------------------------------------------------------------


def order_flow(switch: dict[str, bool]) -> Any:
    """Three steps that fill ctx.data, a suspension, a step that may fail, a commit step."""

    async def reserve(ctx: WorkflowContext) -> None:
        ctx.data["zeta"] = "a key that sorts last, written first"
        ctx.data["items"] = list(ctx.input["items"])
        ctx.data["scratch"] = {"tmp": True}

    def release(ctx: WorkflowContext) -> None:
        ctx.data["items"] = []
        ctx.data["released"] = True

    def price(ctx: WorkflowContext) -> None:
        ctx.data["total"] = decimal.Decimal("19.99") * len(ctx.data["items"])
        ctx.data["big"] = 2**200
        ctx.data["floats"] = [1e16, 1e-7, 5e-324, -0.0, 0.1]
        ctx.data["text"] = "😀 שלום e\u0301 '; DROP TABLE flux_steps;--"
        ctx.data["when"] = dt.datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=dt.UTC)
        del ctx.data["scratch"]

    async def unprice(ctx: WorkflowContext) -> None:
        ctx.data["total"] = decimal.Decimal(0)

    def approve(ctx: WorkflowContext) -> Any:
        return wait("approved")

    def charge(ctx: WorkflowContext) -> None:
        if switch["fail"]:
            raise RuntimeError(f"card declined for {ctx.signals['approved']['by']}")
        ctx.data["charged_by"] = ctx.signals["approved"]["by"]

    def ship(ctx: WorkflowContext) -> None:
        ctx.data["shipped"] = dt.date(2024, 1, 3)

    return (
        create_workflow("contract-order")
        .version("3")
        .step("reserve", reserve, compensate=release)
        .step("price", price, compensate=unprice)
        .step("approve", approve)
        .step("charge", charge, retries=2)
        .commit("ship", ship)
    )


async def order_script(engine: FluxEngine, seen: Transcript) -> None:
    switch = {"fail": False}
    flow = order_flow(switch)
    items = {"items": ["book", "pen"], "note": "😀"}

    ok = await seen.call("execute ok", lambda: engine.execute(flow, items))
    assert ok is not None and ok.status == "suspended"
    await seen.call("get suspended", lambda: engine.get(ok.id))
    await seen.call("wrong signal", lambda: engine.signal(flow, ok.id, "rejected", {"by": "bob"}))
    await seen.call("signal ok", lambda: engine.signal(flow, ok.id, "approved", {"by": "ann"}))
    await seen.call("signal twice", lambda: engine.signal(flow, ok.id, "approved", {}))
    await seen.call("signal unknown", lambda: engine.signal(flow, "no-such-run", "approved", {}))

    switch["fail"] = True
    bad = await seen.call("execute failing", lambda: engine.execute(flow, {"items": ["x"]}))
    assert bad is not None
    rolled = await seen.call(
        "signal failing", lambda: engine.signal(flow, bad.id, "approved", {"by": "cy"})
    )
    assert rolled is not None and rolled.status == "rolled_back"
    switch["fail"] = False
    await seen.call("retry charge", lambda: engine.retry_step(flow, bad.id, "charge"))
    await seen.call("resume from price", lambda: engine.resume(flow, bad.id, from_step="price"))

    waiting = await seen.call("execute waiting", lambda: engine.execute(flow, {"items": []}))
    assert waiting is not None
    for run_id in (ok.id, bad.id, waiting.id):
        await seen.call("get", functools.partial(engine.get, run_id))
    await seen.call("list all", lambda: engine.list())
    await seen.call("list suspended", lambda: engine.list(WorkflowFilter(status="suspended")))
    await seen.call(
        "list page",
        lambda: engine.list(
            WorkflowFilter(name="contract-order", status=["completed", "suspended"], limit=1)
        ),
    )
    await seen.call("list offset", lambda: engine.list(WorkflowFilter(offset=1, limit=None)))
    await seen.call("delete", lambda: engine.delete(ok.id))
    await seen.call("delete again", lambda: engine.delete(ok.id))
    await seen.call("get deleted", lambda: engine.get(ok.id))
    await seen.call("list after delete", lambda: engine.list())


async def test_order_saga_gives_the_same_states(store: Store) -> None:
    lines = await assert_same_as_memory(store, order_script)
    assert len(lines) > 20


async def key_order_script(
    engine: FluxEngine, seen: Transcript, *, sort_keys: bool = False
) -> None:
    def write(ctx: WorkflowContext) -> Any:
        ctx.data["zeta"] = 1
        ctx.data["a"] = {"z": 1, "": 2, "longer": 3}
        ctx.data["mm"] = 2
        return wait("go")

    def more(ctx: WorkflowContext) -> None:
        ctx.data["b"] = 3
        ctx.data["aa"] = 4

    flow = create_workflow("contract-order-of-keys").step("write", write).step("more", more)
    first = await engine.execute(flow, {"zeta": 0, "alpha": [{"y": 1, "x": 2}]})
    assert first.status == "suspended"
    suspended = await engine.get(first.id)
    done = await engine.signal(flow, first.id, "go", {"yes": 1, "no": 0})
    final = await engine.get(first.id)
    assert suspended is not None and final is not None
    seen.lines.append(
        (
            "data after a reload",
            typed(suspended.data, sort_keys=sort_keys),
            typed(final.data, sort_keys=sort_keys),
        )
    )
    seen.lines.append(("input after a reload", typed(final.input, sort_keys=sort_keys)))
    seen.lines.append(
        ("signal output after a reload", typed(final.history[0].output, sort_keys=sort_keys))
    )
    seen.lines.append(
        (
            "data of the results",
            typed(first.data, sort_keys=sort_keys),
            typed(done.data, sort_keys=sort_keys),
        )
    )


async def test_data_key_order_survives_a_reload(store: Store) -> None:
    # ctx.data, inputs and outputs are Python dicts: their key order is visible to callers.
    # PostgreSQL's jsonb orders object keys its own way (documented): equal values there.
    sort_keys = isinstance(store, PostgresStorage)
    await assert_same_as_memory(store, functools.partial(key_order_script, sort_keys=sort_keys))


# -- failures, rejections, compensation failure -----------------------------------------------


async def failure_script(engine: FluxEngine, seen: Transcript) -> None:
    def book(ctx: WorkflowContext) -> None:
        ctx.data["booked"] = ctx.input

    def cancel_booking(ctx: WorkflowContext) -> None:
        raise ValueError("the booking service is gone")

    def refund(ctx: WorkflowContext) -> None:
        ctx.data["refunded"] = True

    def explode(ctx: WorkflowContext) -> None:
        raise KeyError("boom")

    def store_nan(ctx: WorkflowContext) -> None:
        ctx.data["bad"] = float("nan")

    def store_nul(ctx: WorkflowContext) -> Any:
        return {"ok": "a\x00b"}

    stuck = (
        create_workflow("contract-stuck")
        .step("book", book, compensate=cancel_booking)
        .step("pay", refund, compensate=refund)
        .step("explode", explode)
    )
    bad_data = create_workflow("contract-bad-data").step("nan", store_nan).step("never", book)
    bad_output = create_workflow("contract-bad-output").step("nul", store_nul)

    await seen.call("compensation fails", lambda: engine.execute(stuck, {"n": 1}))
    await seen.call("nan in data", lambda: engine.execute(bad_data, None))
    await seen.call("nul in output", lambda: engine.execute(bad_output, "x"))
    for label, value in [
        ("nan input", {"x": float("nan")}),
        ("inf input", [float("inf")]),
        ("nul input", "a\x00"),
        ("surrogate input", {"k": "\udc80"}),
        ("int key input", {1: 2}),
    ]:
        await seen.call(label, functools.partial(engine.execute, bad_data, value))
    await seen.call("list", lambda: engine.list())
    await seen.call(
        "list by status", lambda: engine.list(WorkflowFilter(status=["compensation_failed"]))
    )


async def test_failures_and_rejections_give_the_same_states(store: Store) -> None:
    lines = await assert_same_as_memory(store, failure_script)
    rejected = [line for line in lines if line[0].endswith("input")]
    assert len(rejected) == 5
    assert all(line[1:3] == ("raised", "SerializationError") for line in rejected)


async def test_rejected_input_stores_nothing(store: Store) -> None:
    flow = create_workflow("contract-input").step("a", lambda ctx: None)
    async with FluxEngine(storage=store, retry_policy=FAST) as engine:
        for value in [float("nan"), {"a": "\x00"}, "\ud800", {"deep": [[[[]]]] * 2, 3: 4}]:
            with pytest.raises(InvalidInputError) as info:
                await engine.execute(flow, value)
            assert isinstance(info.value, SerializationError)
        assert await engine.list() == []


# -- error texts the databases cannot hold ----------------------------------------------------


async def unstorable_error_script(engine: FluxEngine, seen: Transcript) -> None:
    def nul(ctx: WorkflowContext) -> None:
        raise RuntimeError("before\x00after")

    def surrogate(ctx: WorkflowContext) -> None:
        raise RuntimeError("lone \ud800 surrogate")

    def undo(ctx: WorkflowContext) -> None:
        raise RuntimeError("undo \udfff\x00 failed")

    for name, handler in [("nul", nul), ("surrogate", surrogate)]:
        flow = create_workflow(f"contract-{name}").step("ok", lambda ctx: None, compensate=undo)
        flow.step("broken", handler)
        await seen.call(name, functools.partial(engine.execute, flow, None))
    await seen.call("list", lambda: engine.list())


async def test_step_errors_with_unstorable_text(store: Store) -> None:
    # A step's exception text is the user's, not validated input: it may hold a NUL or a
    # lone surrogate, which PostgreSQL (both) and SQLite's driver (surrogates) refuse.
    lines = await assert_same_as_memory(store, unstorable_error_script)
    (listed,) = [line for line in lines if line[0] == "list"]
    assert [state[3] for state in listed[1]] == ["compensation_failed", "compensation_failed"]


# -- hostile names -----------------------------------------------------------------------------


async def test_hostile_workflow_names_through_the_engine(store: Store, backend: Backend) -> None:
    schema = backend.schema()
    names = [INJECTION, "%", "_", "a_c", "abc", "\\", "O'Brien", "n" * 200]
    async with FluxEngine(storage=store, retry_policy=FAST) as engine:
        for name in names:
            result = await engine.execute(create_workflow(name).step("s", lambda ctx: None))
            assert result.status == "completed"
        for name in names:
            (state,) = await engine.list(WorkflowFilter(name=name))
            assert state.name == name
        for probe in ["a%", "ab_", "%%", "n" * 201, "x" * 10_240]:
            assert await engine.list(WorkflowFilter(name=probe)) == []
        assert len(await engine.list()) == len(names)
        with pytest.raises(Exception, match="status"):
            WorkflowFilter(status=INJECTION)
    assert backend.schema() == schema
