"""Child workflows (SPEC §7) on every store: a ``.child`` step starts its child run
idempotently (an id derived from the parent's), waits for it durably, and takes the child's
final data as its output; a child that does not complete fails the step (retries start a
new child, then compensation runs); cancelling a parent cancels its children.

No check here depends on timing: steps are held by events, every wait has a hang guard
(``until`` / ``HANG``), and the one timeout used (a child step's) can only expire, since its
child never ends by itself.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import pytest
from sched_support import HANG, HOUR, Engines, Log, finished, load, stored_as, true, until

from fluxrun import (
    ChildWorkflowError,
    FluxClient,
    InvalidArgumentError,
    StepStatus,
    UnknownWorkflowError,
    WaitTimeoutError,
    WorkflowContext,
    WorkflowNotSuspendedError,
    WorkflowStatus,
    create_workflow,
    wait,
)
from fluxrun.errors import StorageError
from fluxrun.storage._base import KEEP, RunRow, Transition


def _doubler(name: str = "kid") -> Any:
    """A child workflow: ``data.v`` is twice ``input.n``."""
    return create_workflow(name).step("double", lambda ctx: ctx.data.update(v=ctx.input["n"] * 2))


def _waits_for_go(name: str) -> Any:
    """A child workflow that waits for signal ``go``, then records ``done``."""
    return (
        create_workflow(name)
        .step("hold", lambda ctx: wait("go"))
        .step("done", lambda ctx: ctx.data.update(done=True))
    )


async def _children(engine: Any, parent: str) -> list[RunRow]:
    rows: list[RunRow] = await engine.storage.list_children(parent)
    return rows


async def _row_of(engine: Any, run_id: str) -> RunRow | None:
    row: RunRow | None = await engine.storage.load(run_id)
    return row


async def _stored_child(engine: Any, run_id: str, status: str) -> RunRow:
    """Wait until run ``run_id`` exists with ``status``."""

    async def check() -> RunRow | None:
        row = await _row_of(engine, run_id)
        return row if row is not None and row.status == status else None

    found: RunRow = await until(check, f"run {run_id} is {status}")
    return found


# -- the child's data is the step's output ------------------------------------------------------


async def test_the_childs_data_is_the_steps_output_and_get_shows_both(engines: Engines) -> None:
    engine = await engines.open()
    parent = (
        create_workflow("parent")
        .step("prep", lambda ctx: ctx.data.update(n=21))
        .child("call", _doubler(), input=lambda ctx: {"n": ctx.data["n"]})
        .step("use", lambda ctx: ctx.data.update(got=ctx.history[1].output["v"]))
    )
    result = await engine.execute(parent)
    assert result.status is WorkflowStatus.COMPLETED, result.error
    assert result.data == {"n": 21, "got": 42}
    call = result.history[1]
    child_id = f"{result.id}:call"
    assert (call.status, call.output, call.child_id) == (StepStatus.COMPLETED, {"v": 42}, child_id)
    assert call.waiting_for is None  # a child step waits for no signal of the user's

    state = await engine.get(result.id)
    assert state is not None and state.parent_id is None
    assert state.history[1].child_id == child_id and state.history[1].output == {"v": 42}
    child = await engine.get(child_id)
    assert child is not None
    assert (child.parent_id, child.status, child.input, child.data) == (
        result.id,
        WorkflowStatus.COMPLETED,
        {"n": 21},
        {"v": 42},
    )
    assert [r.id for r in await _children(engine, result.id)] == [child_id]
    assert [(s.kind, s.child) for s in parent.describe().steps] == [
        ("step", None),
        ("child", "kid"),
        ("step", None),
    ]


async def test_in_one_engine_the_parent_goes_on_without_polling(engines: Engines) -> None:
    """With a poll interval far longer than the hang guard, a chain of children still
    finishes: a child's start wakes the scheduler, and so does its end (for the parent)."""
    engine = await engines.open(poll_interval=HOUR)
    inner = create_workflow("inner").child("call", _doubler("leaf"), input=lambda ctx: ctx.input)
    outer = (
        create_workflow("outer")
        .child("first", inner, input=lambda ctx: {"n": 1})
        .child("second", _doubler("leaf"), input=lambda ctx: {"n": 2})
    )
    handle = await engine.start(outer)
    result = await handle.result(timeout=HANG)
    assert result.status is WorkflowStatus.COMPLETED, result.error
    assert [h.output for h in result.history] == [{}, {"v": 4}]


async def test_a_child_named_by_a_registered_name_and_a_result_from_a_client(
    engines: Engines,
) -> None:
    """The child may be named; a client's ``result()`` waits through the child (it needs
    nothing from outside), whichever engine drives the runs."""
    worker = await engines.open()
    worker.register(_doubler("named-kid"))
    parent = create_workflow("by-name").child("call", "named-kid", input=lambda ctx: ctx.input)
    worker.register(parent)
    async with FluxClient(await engines.store(), poll_interval=0.05) as client:
        handle = await client.start("by-name", {"n": 5})
        result = await handle.result(timeout=HANG)
    assert result.status is WorkflowStatus.COMPLETED, result.error
    assert result.history[0].output == {"v": 10}


async def test_engines_sharing_a_store_share_parents_and_children(engines: Engines) -> None:
    """Any engine may drive a parent or a child: each parent gets one child and its data."""
    parent = create_workflow("shared").child(
        "call", _doubler("shared-kid"), input=lambda c: c.input
    )
    one, two = await engines.open(), await engines.open()
    for engine in (one, two):
        engine.register(parent)
    handles = [await (one, two)[i % 2].start(parent, {"n": i}) for i in range(8)]
    for i, handle in enumerate(handles):
        result = await handle.result(timeout=HANG)
        assert result.status is WorkflowStatus.COMPLETED, result.error
        assert result.history[0].output == {"v": 2 * i}
        assert [k.id for k in await _children(one, handle.id)] == [f"{handle.id}:call"]


async def test_a_durable_batch_of_parents_waits_for_their_children(engines: Engines) -> None:
    """A parent waiting for its child is still running for its batch (not waiting for
    something from outside): the batch's results come once the children are done."""
    engine = await engines.open()
    parent = create_workflow("batched").child(
        "call", _waits_for_go("batched-kid"), input=lambda c: c.input
    )
    batch = await engine.start_batch(parent, [1, 2, 3], concurrency=2)

    async def all_children_wait() -> bool:
        rows = [await _row_of(engine, f"{r.id}:call") for r in await _batch_runs(engine, batch)]
        return all(row is not None and row.status == "suspended" for row in rows)

    await until(all_children_wait, "every child waits for its signal")
    progress = await batch.progress()
    assert (progress.waiting, progress.finished) == (0, False)
    for run in await _batch_runs(engine, batch):
        await engine.send_signal(f"{run.id}:call", "go")
    results = await batch.results(timeout=HANG)
    assert results.succeeded == 3
    assert [r.result.history[0].output for r in results.results if r.result] == [{"done": True}] * 3


async def _batch_runs(engine: Any, batch: Any) -> list[RunRow]:
    rows: list[RunRow] = await engine.storage.batch_runs(batch.id)
    return rows


# -- a child that fails ------------------------------------------------------------------------


async def test_a_failing_child_fails_the_step_retries_with_new_children_then_compensates(
    engines: Engines,
) -> None:
    engine = await engines.open()
    log = Log()

    def boom(ctx: WorkflowContext) -> None:
        raise RuntimeError("out of stock")

    parent = (
        create_workflow("shop")
        .step("reserve", log.step("reserve"), compensate=log.undo("reserve"))
        .child("order", create_workflow("order-kid").step("boom", boom), retries=1)
        .step("never", log.step("never"))
    )
    result = await engine.execute(parent)
    assert result.status is WorkflowStatus.ROLLED_BACK
    assert log.lines == ["reserve", "undo reserve"]
    error = result.error
    assert isinstance(error, ChildWorkflowError)
    assert (error.child_id, error.child_status) == (f"{result.id}:order:2", "failed")
    assert f"{result.id}:order:2" in str(error) and "out of stock" in str(error)
    kids = await _children(engine, result.id)
    assert [(k.id, k.status, k.parent_id) for k in kids] == [
        (f"{result.id}:order", "failed", result.id),
        (f"{result.id}:order:2", "failed", result.id),
    ]
    state = await engine.get(result.id)
    assert state is not None
    order = state.history[1]
    assert (order.status, order.retries) == (StepStatus.FAILED, 1)
    assert order.error_type == "fluxrun.ChildWorkflowError"
    tries = [a for a in await engine.attempts(result.id) if a.step == "order"]
    assert [(a.attempt, a.status) for a in tries] == [
        (1, StepStatus.FAILED),
        (2, StepStatus.FAILED),
    ]
    assert tries[0].error is not None and f"{result.id}:order'" in tries[0].error


async def test_a_child_that_completes_on_a_retry_completes_the_step(engines: Engines) -> None:
    engine = await engines.open()
    calls: Counter[str] = Counter()

    def flaky(ctx: WorkflowContext) -> None:
        calls["kid"] += 1
        if calls["kid"] == 1:
            raise RuntimeError("first time unlucky")
        ctx.data["ok"] = True

    parent = create_workflow("retrying").child(
        "call", create_workflow("flaky-kid").step("s", flaky), retries=2
    )
    result = await engine.execute(parent)
    assert result.status is WorkflowStatus.COMPLETED, result.error
    call = result.history[0]
    assert (call.child_id, call.output, call.retries) == (f"{result.id}:call:2", {"ok": True}, 1)
    assert [k.status for k in await _children(engine, result.id)] == ["failed", "completed"]


async def test_retry_step_of_a_failed_child_step_starts_a_new_child(engines: Engines) -> None:
    engine = await engines.open()
    broken = {"yes": True}

    def maybe(ctx: WorkflowContext) -> None:
        if broken["yes"]:
            raise RuntimeError("not yet")
        ctx.data["fixed"] = True

    parent = create_workflow("operator").child("call", create_workflow("fixable").step("s", maybe))
    failed = await engine.execute(parent)
    assert failed.status is WorkflowStatus.FAILED
    broken["yes"] = False
    again = await engine.retry_step(parent, failed.id, "call")
    # It returns when the run stops to wait (as for a sleep); its handle waits for the end.
    assert again is not None and again.status is WorkflowStatus.SUSPENDED
    result = await engine.handle(failed.id).result(timeout=HANG)
    assert result.status is WorkflowStatus.COMPLETED, result.error
    assert result.history[0].child_id == f"{failed.id}:call:2"
    assert result.history[0].output == {"fixed": True}
    kids = await _children(engine, failed.id)
    assert [(k.id, k.status) for k in kids] == [
        (f"{failed.id}:call", "failed"),
        (f"{failed.id}:call:2", "completed"),
    ]


# -- cancel ------------------------------------------------------------------------------------


async def test_cancelling_a_parent_cancels_its_children_and_theirs(engines: Engines) -> None:
    engine = await engines.open()
    log = Log()
    grandkid = create_workflow("grandkid").step("hold", lambda ctx: wait("never"))
    kid = create_workflow("middle").child("deeper", grandkid)
    parent = (
        create_workflow("top").step("a", log.step("a"), compensate=log.undo("a")).child("call", kid)
    )
    handle = await engine.start(parent)
    kid_id, grandkid_id = f"{handle.id}:call", f"{handle.id}:call:deeper"
    await _stored_child(engine, grandkid_id, "suspended")
    assert await engine.cancel(handle.id, reason="changed my mind") is True
    result = await handle.result(timeout=HANG)
    assert result.status is WorkflowStatus.CANCELLED
    assert log.lines == ["a", "undo a"]
    for run_id in (kid_id, grandkid_id):
        assert (await finished(engine, run_id)).status is WorkflowStatus.CANCELLED
    kid_state = await engine.get(kid_id)
    assert kid_state is not None and kid_state.error is not None
    assert handle.id in kid_state.error and "changed my mind" in kid_state.error


async def test_a_child_ending_after_its_parent_was_cancelled_is_harmless(
    engines: Engines,
) -> None:
    engine = await engines.open()
    began, gate = threading.Event(), threading.Event()

    def held(ctx: WorkflowContext) -> None:  # a sync step: a cancel cannot cut it short
        began.set()
        gate.wait(HANG)
        ctx.data["late"] = True

    parent = create_workflow("impatient").child("call", create_workflow("slow").step("s", held))
    handle = await engine.start(parent)
    await until(lambda: true(began.is_set()), "the child's step runs")
    assert await engine.cancel(handle.id) is True
    assert (await handle.result(timeout=HANG)).status is WorkflowStatus.CANCELLED
    before = await load(engine, handle.id)
    gate.set()
    child = await finished(engine, f"{handle.id}:call")
    assert child.status is WorkflowStatus.CANCELLED  # asked while its step ran
    after = await load(engine, handle.id)
    assert (after.status, after.version, after.error) == ("cancelled", before.version, "cancelled")
    assert await engine.storage.list_signals(handle.id) == []  # nothing written to it


# -- durable, idempotent waiting -----------------------------------------------------------------


async def test_a_parent_waits_durably_and_a_new_engine_finishes_it(engines: Engines) -> None:
    log = Log()
    parent = (
        create_workflow("patient")
        .child("call", _waits_for_go("sleepy-kid"))
        .step("after", log.step("after"))
    )
    first = await engines.open()
    handle = await first.start(parent)
    child_id = f"{handle.id}:call"
    await _stored_child(first, child_id, "suspended")
    waiting = await stored_as(first, handle.id, "suspended", wait_kind="signal")
    assert waiting.wait_name == f"flux:child:{child_id}"  # the parent holds nothing
    await first.close()

    second = await engines.open()
    second.register(parent)  # registers the child's workflow too
    assert await second.send_signal(child_id, "go") is True
    result = await finished(second, handle.id)
    assert result.status is WorkflowStatus.COMPLETED, result.error
    assert result.history[0].output == {"done": True}
    assert log.lines == ["after"]
    assert [k.id for k in await _children(second, handle.id)] == [child_id]  # one child only


async def test_re_driving_a_child_step_finds_the_child_it_started(engines: Engines) -> None:
    """The store fails the parent's suspension once, right after the child started (the
    worst moment for a crash): the step runs again and finds that child, not a new one."""
    engine = await engines.open()
    store = engine.storage
    real_apply = store.apply
    refused: list[str] = []

    async def apply_failing_once(t: Transition) -> Any:
        if not refused and t.wait_name is not KEEP and str(t.wait_name).startswith("flux:child:"):
            refused.append(t.run_id)
            raise StorageError("the database went away (injected)")
        return await real_apply(t)

    store.apply = apply_failing_once  # type: ignore[method-assign]
    inputs: Counter[str] = Counter()

    def child_input(ctx: WorkflowContext) -> dict[str, int]:
        inputs["computed"] += 1
        return {"n": 4}

    parent = create_workflow("redriven").child("call", _doubler("redriven-kid"), input=child_input)
    handle = await engine.start(parent)
    result = await finished(engine, handle.id)
    assert result.status is WorkflowStatus.COMPLETED, result.error
    assert refused == [handle.id] and inputs["computed"] == 2  # the step ran twice
    assert [k.id for k in await _children(engine, handle.id)] == [f"{handle.id}:call"]
    assert result.history[0].output == {"v": 8}


async def test_a_paused_parent_takes_its_childs_outcome_when_unpaused(engines: Engines) -> None:
    engine = await engines.open()
    parent = create_workflow("pausing").child("call", _waits_for_go("pause-kid"))
    handle = await engine.start(parent)
    child_id = f"{handle.id}:call"
    await _stored_child(engine, child_id, "suspended")
    await stored_as(engine, handle.id, "suspended", wait_kind="signal")
    assert await engine.pause(handle.id) is True
    await stored_as(engine, handle.id, "paused")
    assert await engine.send_signal(child_id, "go") is True
    await finished(engine, child_id)
    assert (await load(engine, handle.id)).status == "paused"  # the outcome waits for it
    assert await engine.unpause(handle.id) is True
    result = await finished(engine, handle.id)
    assert result.status is WorkflowStatus.COMPLETED
    assert result.history[0].output == {"done": True}


# -- limits and mistakes -----------------------------------------------------------------------


async def test_a_child_steps_timeout_fails_the_try_and_cancels_its_child(engines: Engines) -> None:
    engine = await engines.open()
    parent = create_workflow("hasty").child("call", _waits_for_go("never-kid"), timeout=0.2)
    result = await engine.execute(parent)
    assert result.status is WorkflowStatus.FAILED
    assert isinstance(result.error, WaitTimeoutError)
    child_id = f"{result.id}:call"
    assert child_id in str(result.error)
    assert (await finished(engine, child_id)).status is WorkflowStatus.CANCELLED


async def test_an_unregistered_child_workflow_fails_the_step_at_once(engines: Engines) -> None:
    engine = await engines.open()
    parent = create_workflow("lonely").child("call", "nobody-registered-this", retries=3)
    result = await engine.execute(parent)
    assert result.status is WorkflowStatus.FAILED
    assert isinstance(result.error, UnknownWorkflowError)
    assert "nobody-registered-this" in str(result.error) and "engine.register" in str(result.error)
    assert result.history[0].retries == 0  # a mistake, not bad luck: no retries
    assert await _children(engine, result.id) == []


async def test_signals_cannot_pose_as_a_childs_outcome(engines: Engines) -> None:
    engine = await engines.open()
    parent = create_workflow("guarded").child("call", _waits_for_go("guarded-kid"))
    handle = await engine.start(parent)
    await stored_as(engine, handle.id, "suspended", wait_kind="signal")
    with pytest.raises(InvalidArgumentError, match="reserved"):
        await engine.send_signal(handle.id, f"flux:child:{handle.id}:call", {"status": "x"})
    with pytest.raises(WorkflowNotSuspendedError, match="child run"):
        await engine.signal(parent, handle.id, "go")
    assert await engine.cancel(handle.id) is True
    assert (await handle.result(timeout=HANG)).status is WorkflowStatus.CANCELLED
