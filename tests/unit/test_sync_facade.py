"""The synchronous facade (SPEC §1.3): the whole API from plain blocking code."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from fluxrun import (
    FluxResult,
    InvalidArgumentError,
    InvalidStateError,
    MemoryStorage,
    RetryPolicy,
    SQLiteStorage,
    SyncFluxEngine,
    WorkflowContext,
    WorkflowFilter,
    WorkflowNotSuspendedError,
    WorkflowStatus,
    create_workflow,
    wait,
)

FAST = RetryPolicy(initial_delay=0, jitter=False)


@pytest.fixture(params=["memory", "sqlite"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Any]:
    if request.param == "memory":
        return MemoryStorage
    return lambda: SQLiteStorage(tmp_path / "flux.db", synchronous="NORMAL")


@pytest.fixture
def engine(make_store: Callable[[], Any]) -> Iterator[SyncFluxEngine]:
    with SyncFluxEngine(storage=make_store(), retry_policy=FAST) as e:
        yield e


class Approval:
    """order: reserve -> wait for approval -> charge (fails until allowed)."""

    def __init__(self) -> None:
        self.charge_ok = False
        self.threads: set[str] = set()

    def flow(self) -> Any:
        def reserve(ctx: WorkflowContext) -> None:
            self.threads.add(threading.current_thread().name)
            ctx.data["reserved"] = ctx.input["sku"]

        def ask(ctx: WorkflowContext) -> Any:
            return wait("approved")

        async def charge(ctx: WorkflowContext) -> str:
            if not self.charge_ok:
                raise RuntimeError("card declined")
            ctx.data["charged_by"] = ctx.signals["approved"]["by"]
            return "receipt-1"

        return (
            create_workflow("order")
            .step("reserve", reserve)
            .step("ask", ask)
            .step("charge", charge)
        )


def test_end_to_end_from_blocking_code(engine: SyncFluxEngine) -> None:
    app = Approval()
    flow = app.flow()

    first = engine.execute(flow, {"sku": "A1"})
    assert isinstance(first, FluxResult)
    assert first.status is WorkflowStatus.SUSPENDED
    assert first.data == {"reserved": "A1"}

    state = engine.get(first.id)
    assert state is not None and state.status is WorkflowStatus.SUSPENDED
    assert state.history[1].waiting_for == "approved"

    failed = engine.signal(flow, first.id, "approved", {"by": "ann"})
    assert failed.status is WorkflowStatus.FAILED
    assert isinstance(failed.error, RuntimeError)

    app.charge_ok = True
    done = engine.resume(flow, first.id)
    assert done is not None and done.status is WorkflowStatus.COMPLETED
    assert done.data == {"reserved": "A1", "charged_by": "ann"}

    again = engine.retry_step(flow, first.id, "charge")
    assert again is not None and again.status is WorkflowStatus.COMPLETED

    state = engine.get(first.id)
    assert state is not None
    assert state.status is WorkflowStatus.COMPLETED
    assert state.data == done.data
    assert state.history[2].output == "receipt-1"
    assert state.completed_at is not None

    second = engine.execute(flow, {"sku": "B2"})
    listed = engine.list()
    assert [s.id for s in listed] == [second.id, first.id]
    assert [s.id for s in engine.list(WorkflowFilter(status="suspended"))] == [second.id]
    assert engine.list(WorkflowFilter(name="other")) == []
    assert engine.delete(second.id) is True
    assert engine.delete(second.id) is False
    assert engine.get(second.id) is None
    assert engine.resume(flow, "unknown") is None
    # Sync handlers never run on the caller's thread.
    assert threading.current_thread().name not in app.threads


def test_registered_names_and_errors_pass_through(engine: SyncFluxEngine) -> None:
    app = Approval()
    engine.register(app.flow())
    run = engine.execute("order", {"sku": "C3"})
    assert run.status is WorkflowStatus.SUSPENDED
    failed = engine.signal("order", run.id, "approved")
    assert failed.status is WorkflowStatus.FAILED
    with pytest.raises(WorkflowNotSuspendedError, match="not suspended"):
        engine.signal("order", run.id, "approved")
    with pytest.raises(InvalidArgumentError, match="run id must be a str"):
        engine.get(42)  # type: ignore[arg-type]
    assert engine.recover() == []


def test_data_survives_a_new_facade_on_the_same_file(tmp_path: Path) -> None:
    app = Approval()
    flow = app.flow()
    path = tmp_path / "durable.db"
    with SyncFluxEngine(storage=SQLiteStorage(path), retry_policy=FAST) as engine:
        run = engine.execute(flow, {"sku": "D4"})
    app.charge_ok = True
    with SyncFluxEngine(storage=SQLiteStorage(path), retry_policy=FAST) as engine:
        done = engine.signal(flow, run.id, "approved", {"by": "bo"})
        assert done.status is WorkflowStatus.COMPLETED
        assert engine.get(run.id) is not None


def test_init_is_optional_and_idempotent(engine: SyncFluxEngine) -> None:
    engine.init()
    engine.init()
    assert engine.list() == []


def test_every_call_after_close_raises_a_clear_error(make_store: Callable[[], Any]) -> None:
    app = Approval()
    flow = app.flow()
    engine = SyncFluxEngine(storage=make_store(), retry_policy=FAST)
    run = engine.execute(flow, {"sku": "E5"})
    engine.close()
    engine.close()  # idempotent
    calls: dict[str, Callable[[], Any]] = {
        "init": engine.init,
        "execute": lambda: engine.execute(flow, {"sku": "F6"}),
        "signal": lambda: engine.signal(flow, run.id, "approved"),
        "resume": lambda: engine.resume(flow, run.id),
        "retry_step": lambda: engine.retry_step(flow, run.id, "reserve"),
        "get": lambda: engine.get(run.id),
        "list": engine.list,
        "delete": lambda: engine.delete(run.id),
        "recover": engine.recover,
    }
    for call in calls.values():
        with pytest.raises(InvalidStateError, match="SyncFluxEngine is closed"):
            call()


def test_context_manager_closes(make_store: Callable[[], Any]) -> None:
    with SyncFluxEngine(storage=make_store()) as engine:
        engine.init()
    with pytest.raises(InvalidStateError, match="closed"):
        engine.list()


def test_bad_options_raise_and_leave_no_thread_behind() -> None:
    before = {t.ident for t in threading.enumerate()}
    with pytest.raises(InvalidArgumentError, match="default_retries"):
        SyncFluxEngine(default_retries=-1)
    with pytest.raises(TypeError):
        SyncFluxEngine(no_such_option=1)
    after = {t.ident for t in threading.enumerate() if t.name == "fluxrun-sync"}
    assert not (after - before)


def test_operator_actions_work_blocking(engine: SyncFluxEngine) -> None:
    def broken(ctx: Any) -> None:
        raise RuntimeError("cannot undo")

    def fail(ctx: Any) -> None:
        raise RuntimeError("boom")

    flow = (
        create_workflow("sync-ops").step("a", lambda ctx: None, compensate=broken).step("b", fail)
    )
    stuck = engine.execute(flow)
    assert stuck.status == WorkflowStatus.COMPENSATION_FAILED
    done = engine.skip_compensation(flow, stuck.id, "a", note="undone by hand")
    assert done.status == WorkflowStatus.ROLLED_BACK
    kinds = [(a.step, a.kind, a.status.value) for a in engine.attempts(stuck.id)]
    assert kinds == [
        ("a", "step", "completed"),
        ("b", "step", "failed"),
        ("a", "compensation", "failed"),
        ("a", "compensation", "skipped"),
    ]


def test_schedules_blocking(engine: SyncFluxEngine) -> None:
    flow = create_workflow("nightly").step("a", lambda ctx: None).build()
    assert engine.schedule("n", "0 3 * * *", flow, {"x": 1}, timezone="Europe/Paris") == "n"
    [info] = engine.list_schedules()
    assert (info.id, info.workflow, info.cron) == ("n", "nightly", "0 3 * * *")
    assert info.input == {"x": 1} and info.timezone == "Europe/Paris"
    assert info.next_at is not None and info.next_at.astimezone(ZoneInfo("Europe/Paris")).hour == 3
    assert engine.unschedule("n") is True
    assert engine.list_schedules() == []
