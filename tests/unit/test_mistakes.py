"""Mistakes are reported and runs are never left owned: one attempt at a time, the event
loop watchdog, ``ctx.input`` copies, hook signatures, a ``wait()`` not returned, exceptions
that cannot be printed, errors that name their run, and runs cut off by ``close()`` or a
cancelled caller (SPEC §6, issue "failures you can trust").
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from fluxrun import (
    FluxEngine,
    SQLiteStorage,
    StepStatus,
    WorkflowContext,
    WorkflowStatus,
    create_workflow,
    wait,
)
from fluxrun.errors import (
    DefinitionError,
    EngineClosedError,
    InvalidArgumentError,
    RunBusyError,
    StepTimeoutError,
    StorageError,
)
from fluxrun.storage._base import Applied, Store, Transition

if TYPE_CHECKING:
    from conftest import EngineFactory


async def owner_of(store: Store, run_id: str) -> str | None:
    row = await store.load(run_id)
    assert row is not None
    return row.owner


# -- one attempt at a time --------------------------------------------------------------------


async def test_next_attempt_waits_for_the_timed_out_thread(
    engine: FluxEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Step timeouts run on the event loop's clock. Here it stands still but for one jump
    # past the timeout once the first attempt runs: that attempt times out, the second
    # never does, however long a busy machine takes to run it in a thread.
    loop = asyncio.get_running_loop()
    now = [loop.time()]
    monkeypatch.setattr(loop, "time", lambda: now[0])

    def jump() -> None:  # on the loop, so after the attempt's timeout was armed
        now[0] += 1.0

    running = threading.Event()
    overlaps: list[bool] = []
    attempts: list[int] = []

    def slow(ctx: WorkflowContext) -> None:
        attempts.append(ctx.attempt)
        overlaps.append(running.is_set())
        running.set()
        try:
            if ctx.attempt == 1:
                loop.call_soon_threadsafe(jump)  # the attempt times out
                time.sleep(0.5)  # and runs on: a second attempt now would overlap it
        finally:
            running.clear()

    flow = create_workflow("one-at-a-time").step("slow", slow, timeout=0.05, retries=1)
    result = await engine.execute(flow)
    assert result.status is WorkflowStatus.COMPLETED
    assert attempts == [1, 2]
    assert overlaps == [False, False]  # attempt 2 never started beside attempt 1


async def test_a_thread_that_never_returns_gets_no_second_attempt(
    engine_factory: EngineFactory,
) -> None:
    engine = await engine_factory(sync_timeout_grace=0.1)
    release = threading.Event()
    attempts: list[int] = []

    def stuck(ctx: WorkflowContext) -> None:
        attempts.append(ctx.attempt)
        release.wait(30)

    flow = create_workflow("stuck-thread").step("stuck", stuck, timeout=0.05, retries=3)
    try:
        result = await engine.execute(flow)
    finally:
        release.set()
    assert attempts == [1]
    assert result.status is WorkflowStatus.FAILED
    assert isinstance(result.error, StepTimeoutError)
    assert "still running" in str(result.error) and "sync_timeout_grace" in str(result.error)


async def test_an_async_step_that_blocks_the_loop_is_named_in_a_warning(
    engine: FluxEngine, caplog: pytest.LogCaptureFixture
) -> None:
    async def blocking(ctx: WorkflowContext) -> None:
        time.sleep(1.1)  # the mistake: a blocking call inside async def

    flow = create_workflow("blocker").step("blocking", blocking, timeout=0.5)
    with caplog.at_level(logging.WARNING, logger="fluxrun"):
        result = await engine.execute(flow)
    # The timeout cannot interrupt code that never awaits; the warning says so.
    assert result.status is WorkflowStatus.COMPLETED
    warnings = [r.getMessage() for r in caplog.records if "blocked the event loop" in r.message]
    assert len(warnings) == 1
    assert f"blocker/{result.id} step 'blocking'" in warnings[0]
    assert "0.5s timeout" in warnings[0]


# -- ctx.input is the stored input ------------------------------------------------------------


async def test_each_step_sees_the_stored_input(engine: FluxEngine) -> None:
    seen: list[Any] = []

    def mutate(ctx: WorkflowContext) -> None:
        ctx.input["items"].append("sneaky")
        ctx.input["extra"] = 1

    def read(ctx: WorkflowContext) -> None:
        seen.append(ctx.input)

    flow = create_workflow("inp").step("mutate", mutate).step("read", read)
    result = await engine.execute(flow, {"items": ["book"]})
    assert result.status is WorkflowStatus.COMPLETED
    assert seen == [{"items": ["book"]}]


# -- mistakes are reported --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hook", "fn", "expected"),
    [
        ("step_complete", lambda name, ctx: None, "step_complete(step_name, ctx, execution)"),
        ("step_start", lambda ctx: None, "step_start(step_name, ctx)"),
        ("workflow_error", lambda ctx: None, "workflow_error(ctx, error)"),
        ("workflowComplete", lambda: None, "workflow_complete(ctx)"),
    ],
)
def test_a_hook_with_the_wrong_signature_is_refused(hook: str, fn: Any, expected: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        FluxEngine(on={hook: fn})
    assert expected in str(info.value) and repr(hook) in str(info.value)


def test_hooks_with_flexible_signatures_are_accepted() -> None:
    FluxEngine(
        on={
            "step_complete": lambda *args: None,
            "step_error": lambda name, ctx, error=None, extra=None: None,
            "workflow_complete": print,
        }
    )


async def test_a_wait_that_is_not_returned_fails_the_step(engine: FluxEngine) -> None:
    def forgot(ctx: WorkflowContext) -> None:
        wait("approved")  # missing `return`

    async def forgot_async(ctx: WorkflowContext) -> None:
        wait("approved")

    for handler in (forgot, forgot_async):
        flow = create_workflow(f"forgot-{handler.__name__}").step("ask", handler, retries=3)
        result = await engine.execute(flow)
        assert result.status is WorkflowStatus.FAILED
        assert isinstance(result.error, DefinitionError)
        assert "return wait('approved')" in str(result.error)
        state = await engine.get(result.id)
        assert state is not None and state.history[0].retries == 0  # a mistake is not retried


async def test_the_sqlite_path_must_be_in_an_existing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "flux.db"
    engine = FluxEngine(storage=SQLiteStorage(missing))
    with pytest.raises(StorageError) as info:
        await engine.init()
    assert str(missing.parent) in str(info.value) or str(missing) in str(info.value)
    assert not missing.parent.exists()


# -- errors nobody can print, and truth tests that raise ---------------------------------------


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str for you")


class NoTruth:
    def __bool__(self) -> bool:
        raise ValueError("The truth value of an array is ambiguous")


async def test_an_exception_whose_str_raises_is_recorded(engine: FluxEngine, store: Store) -> None:
    def bad(ctx: WorkflowContext) -> None:
        raise Unprintable()

    result = await engine.execute(create_workflow("unprintable").step("bad", bad))
    assert result.status is WorkflowStatus.FAILED
    state = await engine.get(result.id)
    assert state is not None
    assert state.history[0].error == "<Unprintable: str() raised RuntimeError>"
    assert state.history[0].error_type is not None
    assert state.history[0].error_type.endswith("Unprintable")
    assert await owner_of(store, result.id) is None


async def test_a_condition_whose_truth_test_raises_fails_its_step(
    engine: FluxEngine, store: Store
) -> None:
    flow = create_workflow("truth").step("s", lambda ctx: None, when=lambda ctx: NoTruth())
    result = await engine.execute(flow)
    assert result.status is WorkflowStatus.FAILED
    assert isinstance(result.error, ValueError)
    state = await engine.get(result.id)
    assert state is not None and state.history[0].status is StepStatus.FAILED
    assert await owner_of(store, result.id) is None


# -- every error raised after a run exists names it -------------------------------------------


class FailingApply:
    """Patches a store so that its n-th apply raises StorageError."""

    def __init__(self, store: Store, fail_at: int) -> None:
        self.calls = 0
        self.inner = store.apply
        self.fail_at = fail_at
        store.apply = self  # type: ignore[method-assign]

    async def __call__(self, t: Transition) -> Applied:
        self.calls += 1
        if self.calls == self.fail_at:
            raise StorageError("disk full")
        return await self.inner(t)


async def test_a_storage_error_after_the_run_was_saved_names_the_run(
    engine: FluxEngine, store: Store
) -> None:
    FailingApply(store, fail_at=2)
    flow = create_workflow("named").step("a", lambda ctx: None).step("b", lambda ctx: None)
    with pytest.raises(StorageError) as info:
        await engine.execute(flow)
    run_id = info.value.workflow_id
    assert run_id is not None and run_id in str(info.value)
    assert await engine.get(run_id) is not None


# -- runs cut off by close() or by a cancelled caller are released -----------------------------


async def test_a_cancelled_execute_releases_its_run(engine: FluxEngine, store: Store) -> None:
    started = asyncio.Event()

    async def forever(ctx: WorkflowContext) -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.ensure_future(engine.execute(create_workflow("cut").step("forever", forever)))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (run,) = await engine.list()
    assert run.status is WorkflowStatus.PENDING
    assert await owner_of(store, run.id) is None  # recover() can take it at once


async def test_close_with_queued_sync_steps_gives_a_clear_error_and_releases(
    tmp_path: Path,
) -> None:
    store = SQLiteStorage(tmp_path / "close.db")
    engine = FluxEngine(storage=store)
    await engine.init()
    release = threading.Event()
    entered: list[str] = []

    def hold(ctx: WorkflowContext) -> None:
        entered.append(ctx.id)
        release.wait(30)

    flow = create_workflow("queued").step("hold", hold)
    pool = engine._thread_pool()
    width: int = pool._max_workers  # type: ignore[attr-defined]
    tasks = [asyncio.ensure_future(engine.execute(flow)) for _ in range(width + 2)]
    while len(entered) < width:  # every thread busy; two calls wait in the queue
        await asyncio.sleep(0.01)
    closing = asyncio.ensure_future(engine.close(timeout=0.1))
    done, _ = await asyncio.wait(tasks, timeout=30, return_when=asyncio.FIRST_EXCEPTION)
    cut = [t for t in done if t.exception() is not None]
    release.set()
    await closing
    results = await asyncio.gather(*tasks, return_exceptions=True)
    closed = [r for r in results if isinstance(r, EngineClosedError)]
    assert len(closed) == 2 and all(c.workflow_id for c in closed)
    assert len(cut) >= 1
    async with FluxEngine(storage=SQLiteStorage(tmp_path / "close.db")) as other:
        for error in closed:
            assert error.workflow_id is not None
            assert await owner_of(other.storage, error.workflow_id) is None
            state = await other.get(error.workflow_id)
            assert state is not None and state.status is WorkflowStatus.PENDING


async def test_delete_refuses_a_run_another_engine_is_executing(tmp_path: Path) -> None:
    path = tmp_path / "busy.db"
    started, release = asyncio.Event(), asyncio.Event()

    async def hold(ctx: WorkflowContext) -> None:
        started.set()
        await release.wait()

    async with (
        FluxEngine(storage=SQLiteStorage(path)) as one,
        FluxEngine(storage=SQLiteStorage(path)) as two,
    ):
        task = asyncio.ensure_future(one.execute(create_workflow("busy").step("hold", hold)))
        await started.wait()
        (run,) = await two.list()
        with pytest.raises(RunBusyError):
            await two.delete(run.id)
        release.set()
        assert (await task).status is WorkflowStatus.COMPLETED
        assert await two.delete(run.id) is True


# -- no handler is kept alive by the engine ----------------------------------------------------


async def test_workflows_built_per_call_are_not_kept_alive(engine: FluxEngine) -> None:
    refs = []
    for i in range(5):

        async def handler(ctx: WorkflowContext) -> None:
            ctx.data["i"] = 1

        refs.append(weakref.ref(handler))
        await engine.execute(create_workflow(f"per-call-{i}").step("s", handler))
        del handler
    gc.collect()
    assert [r() for r in refs] == [None] * 5


@pytest.mark.parametrize("lease", [1e13, float("inf"), 0, -1])
def test_out_of_range_leases_are_refused(lease: float) -> None:
    with pytest.raises(InvalidArgumentError):
        FluxEngine(lease=lease)


# -- a lease renewal that comes late is reported -------------------------------------------------


def test_a_late_lease_renewal_is_logged() -> None:
    from fluxrun._lease import LeaseKeeper
    from fluxrun._trace import _Log
    from fluxrun.storage.memory import MemoryStorage

    class Capture:
        def __init__(self) -> None:
            self.lines: list[str] = []

        def debug(self, message: str) -> None: ...
        def info(self, message: str) -> None: ...
        def error(self, message: str) -> None: ...

        def warning(self, message: str) -> None:
            self.lines.append(message)

    capture = Capture()
    keeper = LeaseKeeper(MemoryStorage(), owner="me", lease_seconds=0.3, log=_Log(capture))
    stalls = [0.4]  # the first renewal stalls, as if a C call held the GIL

    def renew_now() -> None:
        if stalls:
            time.sleep(stalls.pop())

    keeper.renew_now = renew_now  # type: ignore[method-assign]
    keeper.hold("run-1", 1)
    try:
        deadline = time.monotonic() + 30
        while not capture.lines:
            assert time.monotonic() < deadline, "no warning about the late renewal"
            time.sleep(0.02)
    finally:
        keeper.stop()
    assert "late" in capture.lines[0] and "GIL" in capture.lines[0]


def test_a_failing_hook_is_visible_without_any_logging_setup() -> None:
    import subprocess
    import sys
    import textwrap

    program = textwrap.dedent(
        """
        import asyncio
        from fluxrun import FluxEngine, create_workflow

        def broken(step_name, ctx, execution):
            raise RuntimeError("hook bug")

        async def main():
            async with FluxEngine(on={"step_complete": broken}) as engine:
                result = await engine.execute(create_workflow("w").step("s", lambda ctx: None))
                print(result.status.value)

        asyncio.run(main())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "completed"  # the hook never changes the outcome
    assert "hook step_complete failed" in done.stderr and "hook bug" in done.stderr


# -- bad input to the new entry points -----------------------------------------------------------


@pytest.mark.parametrize("grace", [-1, float("nan"), "60", True])
def test_a_bad_sync_timeout_grace_is_refused(grace: Any) -> None:
    with pytest.raises(InvalidArgumentError):
        FluxEngine(sync_timeout_grace=grace)


async def test_bad_arguments_to_the_operator_actions(engine: FluxEngine) -> None:
    flow = create_workflow("ops").step("a", lambda ctx: None)
    run = await engine.execute(flow)
    for bad in (None, 1, "", "x\x00"):
        with pytest.raises(InvalidArgumentError):
            await engine.attempts(bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError):
            await engine.skip_compensation(flow, run.id, "a", note=bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError):
            await engine.skip_compensation(flow, run.id, bad, note="n")  # type: ignore[arg-type]
    state = await engine.get(run.id)
    assert state is not None and state.status is WorkflowStatus.COMPLETED
    assert [a.status for a in await engine.attempts(run.id)] == [StepStatus.COMPLETED]
    for timeout in (-1, float("inf"), "10", None):
        with pytest.raises(InvalidArgumentError):
            await engine.close(timeout=timeout)  # type: ignore[arg-type]
