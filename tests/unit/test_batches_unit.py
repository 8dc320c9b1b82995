"""Batches: every bad argument is refused with InvalidArgumentError before anything runs,
and (a Hypothesis property) any pattern of failures gives results in input order with
counts that add up, with and without ``continue_on_error``."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fluxrun import (
    FluxEngine,
    InvalidArgumentError,
    MemoryStorage,
    UnknownWorkflowError,
    WorkflowContext,
    create_workflow,
)


def _step(ctx: WorkflowContext) -> None:
    if ctx.input["fail"]:
        raise RuntimeError("no")
    ctx.data["n"] = ctx.input["n"]


FLOW = create_workflow("unit-batch").step("s", _step)


@pytest.mark.parametrize("concurrency", [0, -1, 1.5, "3", True, None, 2**31])
async def test_bad_concurrency_is_refused(concurrency: Any) -> None:
    async with FluxEngine() as engine:
        with pytest.raises(InvalidArgumentError, match="concurrency"):
            await engine.execute_batch(FLOW, [], concurrency=concurrency)
        with pytest.raises(InvalidArgumentError, match="concurrency"):
            await engine.start_batch(FLOW, [], concurrency=concurrency)
        assert await engine.list() == []


@pytest.mark.parametrize("inputs", ["abc", b"x", {"a": 1}, 5, None])
async def test_inputs_must_be_an_iterable_of_items(inputs: Any) -> None:
    async with FluxEngine() as engine:
        with pytest.raises(InvalidArgumentError, match="inputs"):
            await engine.execute_batch(FLOW, inputs)
        with pytest.raises(InvalidArgumentError, match="inputs"):
            await engine.start_batch(FLOW, inputs)


async def test_other_bad_arguments() -> None:
    async with FluxEngine() as engine:
        with pytest.raises(InvalidArgumentError, match="on_progress"):
            await engine.execute_batch(FLOW, [], on_progress=3)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError, match="pair"):
            await engine.execute_many([(FLOW, 1, 2)])  # type: ignore[list-item]
        with pytest.raises(InvalidArgumentError, match="items"):
            await engine.execute_many("ab")  # type: ignore[arg-type]
        with pytest.raises(UnknownWorkflowError):
            await engine.execute_many([(FLOW, {"n": 0, "fail": False}), ("nope", 1)])
        assert await engine.list() == []  # nothing ran
        with pytest.raises(InvalidArgumentError, match="batch id"):
            engine.batch_handle("")
        handle = await engine.start_batch(FLOW, [])
        with pytest.raises(InvalidArgumentError, match="timeout"):
            await handle.results(timeout=-1)


async def test_an_unknown_batch_is_not_found() -> None:
    from fluxrun import WorkflowNotFoundError

    async with FluxEngine() as engine:
        with pytest.raises(WorkflowNotFoundError, match="Batch not found"):
            await engine.batch_handle("missing").progress()


@settings(max_examples=30, deadline=None)
@given(
    fails=st.lists(st.booleans(), max_size=12),
    concurrency=st.integers(1, 5),
    go_on=st.booleans(),
)
def test_any_failure_pattern_keeps_order_and_counts(
    fails: list[bool], concurrency: int, go_on: bool
) -> None:
    async def scenario() -> None:
        async with FluxEngine(storage=MemoryStorage(), logger=_Quiet()) as engine:
            inputs = [{"n": i, "fail": f} for i, f in enumerate(fails)]
            result = await engine.execute_batch(
                FLOW, inputs, concurrency=concurrency, continue_on_error=go_on
            )
            statuses = [r.status for r in result.results]
            assert [r.index for r in result.results] == list(range(len(fails)))
            assert [r.input for r in result.results] == inputs
            assert result.total == len(fails)
            assert result.succeeded + result.failed + result.waiting + result.not_run == len(fails)
            if go_on or not any(fails):
                assert statuses == ["failed" if f else "succeeded" for f in fails]
                return
            first = fails.index(True)
            # Everything before the first failure started before it; it ran as it should.
            assert statuses[:first] == ["succeeded"] * first and statuses[first] == "failed"
            for status, fail in zip(statuses, fails, strict=True):
                assert status in (("failed" if fail else "succeeded"), "not_run")
            # With one at a time, nothing after the first failure started.
            if concurrency == 1:
                assert statuses[first + 1 :] == ["not_run"] * (len(fails) - first - 1)

    asyncio.run(scenario())


class _Quiet:
    def debug(self, *a: Any) -> None: ...
    def info(self, *a: Any) -> None: ...
    def warn(self, *a: Any) -> None: ...
    def error(self, *a: Any) -> None: ...


def test_the_sync_facade_runs_batches() -> None:
    from fluxrun import SyncFluxEngine

    with SyncFluxEngine(logger=_Quiet()) as engine:
        result = engine.execute_batch(FLOW, [{"n": 1, "fail": False}, {"n": 2, "fail": True}])
        assert [r.status for r in result.results] == ["succeeded", "failed"]
        many = engine.execute_many([(FLOW, {"n": 3, "fail": False})], concurrency=1)
        assert many.succeeded == 1
