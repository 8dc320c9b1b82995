"""Recovery of unfinished runs: ``register`` + ``recover``, ``recover_on_start``, the
crash-loop cap (``max_recoveries``) and leases kept alive from a thread.

Runs are left unfinished the honest way: a child process (``recovery_child.py``) drives them
and dies inside a step (``os._exit(1)`` or SIGKILL). Every step and compensation appends a
line to an effects file, so the tests count real executions, not just what the store says.
Leases are short (0.5 s) to keep the tests fast; the tests wait for a lease to expire by
polling the store, never by asserting how long anything took. Where a lease must *not*
expire while a step blocks, the stores read a shared clock that stands still
(``FileClock``) and the test moves it on only after the lease keeper renewed, so a busy
machine that starves the keeper thread for a moment cannot fake a lost lease. Steps block
until the test saw what it waits for, not for a guessed number of seconds.
"""

from __future__ import annotations

import asyncio
import collections
import json
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from recovery_flows import FileClock, read_effects, saga, store_on, waiter

from fluxrun import (
    FluxEngine,
    LeaseLostError,
    RetryPolicy,
    StepStatus,
    WorkflowState,
    WorkflowStatus,
)

CHILD = Path(__file__).with_name("recovery_child.py")
LEASE = 0.5
NAMES = [saga.name, waiter.name]


@dataclass
class Paths:
    db: str
    fx: str
    tmp: Path


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return Paths(db=str(tmp_path / "runs.db"), fx=str(tmp_path / "effects.log"), tmp=tmp_path)


def make_engine(db: str, *, clock: Callable[[], float] | None = None, **kw: Any) -> FluxEngine:
    engine = FluxEngine(
        storage=store_on(db, clock),
        lease=LEASE,
        retry_policy=RetryPolicy(initial_delay=0, jitter=False),
        **kw,
    )
    engine.register(saga)
    engine.register(waiter)
    return engine


def child_argv(p: Paths, **config: Any) -> list[str]:
    config = {"db": p.db, "lease": LEASE, **config}
    return [sys.executable, str(CHILD), json.dumps(config)]


def run_child(p: Paths, **config: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(child_argv(p, **config), capture_output=True, text=True, timeout=60)


def counts(p: Paths, run_id: str) -> dict[str, int]:
    """How many times each step / compensation of ``run_id`` really ran."""
    return dict(collections.Counter(key for rid, key, _ in read_effects(p.fx) if rid == run_id))


def statuses(state: WorkflowState) -> dict[str, str]:
    return {h.name: h.status.value for h in state.history}


async def only_run(engine: FluxEngine) -> WorkflowState:
    runs = await engine.list()
    assert len(runs) == 1, runs
    return runs[0]


async def until_recoverable(engine: FluxEngine, run_id: str) -> None:
    """Wait (by polling the store) until the dead owner's lease on ``run_id`` has expired."""
    deadline = time.monotonic() + 30
    while run_id not in {r.id for r in await engine.storage.find_recoverable(NAMES, 100)}:
        assert time.monotonic() < deadline, f"run {run_id} never became recoverable"
        await asyncio.sleep(0.05)


async def until(
    what: str, condition: Callable[[], bool | Awaitable[bool]], proc: Any = None
) -> None:
    """Poll ``condition`` until it holds (a generous deadline only catches a hang); with
    ``proc``, fail at once if that child process ended meanwhile."""
    deadline = time.monotonic() + 60
    while True:
        met = condition()
        if not isinstance(met, bool):
            met = await met
        if met:
            return
        if proc is not None:
            assert proc.poll() is None, (what, proc.communicate())
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        await asyncio.sleep(0.01)


def ran(p: Paths, key: str) -> Callable[[], bool]:
    """Whether step ``key`` (of the only run) has really started."""
    return lambda: any(k == key for _, k, _ in read_effects(p.fx))


#: The shared clock is moved on by three leases while a step blocks, half a lease at a time.
ADVANCES = 6


async def three_leases_pass(
    clock: FileClock, renewed: Callable[[], Awaitable[bool]], poll: Callable[[], Awaitable[Any]]
) -> int:
    """Move ``clock`` on by three leases, half a lease at a time. Before the first move and
    after each, wait until the keeper ``renewed`` at the current time, then ``poll`` once
    (so the lease never runs out on the clock unless renewals are missing). Returns the
    number of polls."""
    polls = 0
    for advance in range(ADVANCES + 1):
        if advance:
            clock.advance(LEASE / 2)
        await until("a lease renewal at the current time", renewed)
        await poll()
        polls += 1
    return polls


def saga_input(p: Paths, **extra: Any) -> dict[str, Any]:
    return {"fx": p.fx, **extra}


def crash_once(p: Paths, at: str, mode: str) -> dict[str, Any]:
    """A crash at ``at`` the first time only: the recovered run then goes through."""
    return {"at": at, "mode": mode, "once": str(p.tmp / f"crashed-at-{at}")}


# -- pending, running and rolling-back runs ------------------------------------------------------


@pytest.mark.parametrize(
    ("crash_at", "mode", "stopped_as"),
    [("a", "exit", "pending"), ("b", "exit", "running"), ("c", "kill", "running")],
)
async def test_recover_finishes_a_run_whose_executor_died(
    paths: Paths, crash_at: str, mode: str, stopped_as: str
) -> None:
    child = run_child(
        paths,
        action="execute",
        flow="saga",
        input=saga_input(paths, crash=crash_once(paths, crash_at, mode)),
    )
    assert child.returncode == (1 if mode == "exit" else -9), child.stderr
    async with make_engine(paths.db) as engine:
        before = await only_run(engine)
        assert before.status.value == stopped_as
        done_before = ["a", "b", "c"][: ["a", "b", "c"].index(crash_at)]
        assert [h.name for h in before.history if h.status == StepStatus.COMPLETED] == done_before

        await until_recoverable(engine, before.id)
        results = await engine.recover()

        assert [(r.id, r.status) for r in results] == [(before.id, WorkflowStatus.COMPLETED)]
        after = await engine.get(before.id)
        assert after is not None
        assert after.status == WorkflowStatus.COMPLETED
        assert statuses(after) == dict.fromkeys("abcd", "completed")
        assert after.data == {k: f"{k}-done" for k in "abcd"}
        # d saw the data of every step before it, replayed from the store after the crash.
        assert after.history[3].output["seen"] == ["a", "b", "c"]
        # Steps recorded before the crash did not run again; the one in flight ran twice.
        expected = dict.fromkeys("abcd", 1)
        expected[crash_at] = 2
        assert counts(paths, before.id) == expected
        assert await engine.recover() == []


async def test_recover_continues_the_compensations_of_a_rolling_back_run(paths: Paths) -> None:
    child = run_child(
        paths,
        action="execute",
        flow="saga",
        input=saga_input(paths, fail=True, crash=crash_once(paths, "undo_b", "kill")),
    )
    assert child.returncode == -9, child.stderr
    async with make_engine(paths.db) as engine:
        before = await only_run(engine)
        assert before.status == WorkflowStatus.ROLLING_BACK
        # c was compensated, b's compensation was in flight, a's not started yet.
        assert statuses(before) == {
            "a": "completed",
            "b": "compensating",
            "c": "compensated",
            "d": "failed",
        }

        await until_recoverable(engine, before.id)
        results = await engine.recover()

        assert [(r.id, r.status) for r in results] == [(before.id, WorkflowStatus.ROLLED_BACK)]
        after = await engine.get(before.id)
        assert after is not None
        assert after.status == WorkflowStatus.ROLLED_BACK
        assert after.error == "d failed on purpose"
        assert statuses(after) == {
            "a": "compensated",
            "b": "compensated",
            "c": "compensated",
            "d": "failed",
        }
        # undo_c is not repeated; undo_b was in flight when the process died, so it runs again.
        assert counts(paths, before.id) == {
            "a": 1,
            "b": 1,
            "c": 1,
            "d": 1,
            "undo_c": 1,
            "undo_b": 2,
            "undo_a": 1,
        }
        assert all(after.data[f"undo_{k}"] is True for k in "abc")


async def test_recover_on_start_finishes_runs_at_init(paths: Paths) -> None:
    child = run_child(
        paths,
        action="execute",
        flow="saga",
        input=saga_input(paths, crash=crash_once(paths, "c", "kill")),
    )
    assert child.returncode == -9, child.stderr
    async with make_engine(paths.db) as probe:
        run = await only_run(probe)
        assert run.status == WorkflowStatus.RUNNING
        await until_recoverable(probe, run.id)

    engine = make_engine(paths.db, recover_on_start=True)
    await engine.init()
    try:
        state = await engine.get(run.id)
        assert state is not None
        assert state.status == WorkflowStatus.COMPLETED
        assert counts(paths, run.id) == {"a": 1, "b": 1, "c": 2, "d": 1}
    finally:
        await engine.close()


async def test_run_crashed_after_its_signal_is_recovered_with_the_payload(paths: Paths) -> None:
    first = run_child(
        paths,
        action="execute",
        flow="waiter",
        input=saga_input(paths, crash=crash_once(paths, "c", "kill")),
    )
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == {"statuses": ["suspended"]}
    async with make_engine(paths.db) as engine:
        run = await only_run(engine)
        second = run_child(paths, action="signal", flow="waiter", run_id=run.id, payload={"ok": 1})
        assert second.returncode == -9, second.stderr
        before = await engine.get(run.id)
        assert before is not None
        assert before.status == WorkflowStatus.RUNNING
        assert statuses(before) == {"a": "completed", "gate": "completed", "c": "pending"}

        await until_recoverable(engine, run.id)
        results = await engine.recover()

        assert [r.status for r in results] == [WorkflowStatus.COMPLETED]
        after = await engine.get(run.id)
        assert after is not None
        assert after.history[1].output == {"ok": 1}
        assert after.history[2].output["signals"] == {"go": {"ok": 1}}
        assert counts(paths, run.id) == {"a": 1, "gate": 1, "c": 2}


# -- runs that must be left alone -------------------------------------------------------------


async def test_suspended_run_is_not_recovered(paths: Paths) -> None:
    child = run_child(paths, action="execute", flow="waiter", input=saga_input(paths), then="kill")
    assert child.returncode == -9, child.stderr
    # This engine's clock is an hour ahead: any lease the dead process held is over for it.
    async with make_engine(paths.db, clock=lambda: time.time() + 3600) as engine:
        run = await only_run(engine)
        assert run.status == WorkflowStatus.SUSPENDED
        assert await engine.storage.find_recoverable(NAMES, 100) == []
        assert await engine.recover() == []
        state = await engine.get(run.id)
        assert state is not None
        assert state.status == WorkflowStatus.SUSPENDED
        assert counts(paths, run.id) == {"a": 1, "gate": 1}

        result = await engine.signal(waiter, run.id, "go", "later")
        assert result.status == WorkflowStatus.COMPLETED
        assert counts(paths, run.id) == {"a": 1, "gate": 1, "c": 1}


async def test_run_of_a_live_process_blocking_its_loop_is_left_alone(paths: Paths) -> None:
    """The child's step blocks its event loop while three leases pass on the shared clock;
    its lease thread keeps the run."""
    clock = FileClock.start(str(paths.tmp / "clock"))
    release = paths.tmp / "release-b"
    proc = subprocess.Popen(
        child_argv(
            paths,
            clock=clock.path,
            action="execute",
            flow="saga",
            input=saga_input(paths, block={"at": "b", "until": str(release)}),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        async with make_engine(paths.db, clock=clock) as engine:
            await until("step b to block the child", ran(paths, "b"), proc)
            run = await only_run(engine)

            async def renewed() -> bool:
                assert proc.poll() is None, proc.communicate()
                row = await engine.storage.load(run.id)
                assert row is not None and row.lease_until is not None
                return row.lease_until.timestamp() >= clock() + LEASE - 0.001

            recovered: list[Any] = []

            async def poll() -> None:
                found = await engine.storage.find_recoverable(NAMES, 100)
                # Recovering a found run would block this loop in its step b until the
                # deadline: note what would be taken instead. Else (the clock stands still
                # meanwhile) recover() runs and must take nothing.
                recovered.extend(found or await engine.recover())

            polls = await three_leases_pass(clock, renewed, poll)
            release.touch()
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            assert json.loads(out) == {"statuses": ["completed"]}
            assert polls == ADVANCES + 1  # recover() really ran while the step was blocking
            assert recovered == []
            state = await engine.get(run.id)
            assert state is not None
            assert state.status == WorkflowStatus.COMPLETED
            assert counts(paths, run.id) == dict.fromkeys("abcd", 1)
    finally:
        release.touch()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _count_renewals(
    engine: FluxEngine, monkeypatch: pytest.MonkeyPatch, *, renew: bool
) -> list[int]:
    """Count the lease keeper's renewal rounds; with ``renew=False`` they renew nothing."""
    rounds = [0]
    renew_now = engine._keeper.renew_now

    def counted() -> None:
        if renew:
            renew_now()
        rounds[0] += 1

    monkeypatch.setattr(engine._keeper, "renew_now", counted)
    return rounds


def _other_engine_while_b_blocks(
    p: Paths,
    clock: FileClock,
    rounds: list[int],
    release: Path,
    *,
    recover: bool,
    seen: list[Any],
    polls: list[int],
    errors: list[BaseException],
) -> threading.Thread:
    """Another engine (own store, own event loop, own thread) on the same SQLite file and
    clock: once step b blocks the test's loop, three leases pass while it polls; then b is
    released. Each move of the clock waits for two keeper rounds, so one ran wholly after
    the previous move (renewing at the current time, when renewals are on)."""

    async def main() -> None:
        try:
            # Only looking (recover=False): with no workflow registered its scheduler claims
            # nothing, where it would take the run over and block in step b.
            other_engine = (
                make_engine(p.db, clock=clock)
                if recover
                else FluxEngine(storage=store_on(p.db, clock), lease=LEASE)
            )
            async with other_engine as other:

                async def renewed() -> bool:
                    start = rounds[0]
                    await until("two lease keeper rounds", lambda: rounds[0] >= start + 2)
                    return True

                async def poll() -> None:
                    found = await other.storage.find_recoverable(NAMES, 100)
                    if found or not recover:
                        # Recovering a found run would block this loop in its step b until
                        # the deadline: note what would be taken instead.
                        seen.extend(r.id for r in found)
                    else:
                        # The clock stands still meanwhile: recover() runs and takes nothing.
                        seen.extend(await other.recover())
                    polls[0] += 1

                await until("step b to block", ran(p, "b"))
                await three_leases_pass(clock, renewed, poll)
        except BaseException as exc:
            errors.append(exc)
        finally:
            release.touch()

    thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    thread.start()
    return thread


async def _execute_while_three_leases_pass(
    p: Paths, monkeypatch: pytest.MonkeyPatch, *, renew: bool, recover: bool, seen: list[Any]
) -> tuple[Any, int]:
    clock = FileClock.start(str(p.tmp / "clock"))
    release = p.tmp / "release-b"
    polls = [0]
    errors: list[BaseException] = []
    engine = make_engine(p.db, clock=clock)
    await engine.init()
    rounds = _count_renewals(engine, monkeypatch, renew=renew)
    thread = _other_engine_while_b_blocks(
        p, clock, rounds, release, recover=recover, seen=seen, polls=polls, errors=errors
    )
    try:
        result = await engine.execute(saga, saga_input(p, block={"at": "b", "until": str(release)}))
    finally:
        release.touch()
        thread.join(timeout=60)
        await engine.close()
    assert not thread.is_alive()
    assert errors == []
    return result, polls[0]


async def test_blocking_step_keeps_its_lease_against_another_engine(
    paths: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    recovered: list[Any] = []
    result, polls = await _execute_while_three_leases_pass(
        paths, monkeypatch, renew=True, recover=True, seen=recovered
    )
    assert polls == ADVANCES + 1  # recover() really ran while the step was blocking
    assert recovered == []
    assert result.status == WorkflowStatus.COMPLETED
    assert counts(paths, result.id) == dict.fromkeys("abcd", 1)


async def test_without_renewal_the_blocked_run_would_be_taken(
    paths: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Control for the test above: it fails if the lease is not renewed during the block.

    Without renewal the run is up for the taking once b returns: the other engine saw it so,
    and this engine's own scheduler may take it over before b's outcome is written (it then
    drives the run to its end), in which case the late write is refused (rule: an owner that
    lost its lease gets ``LeaseLostError``)."""
    seen: list[Any] = []
    try:
        result, _ = await _execute_while_three_leases_pass(
            paths, monkeypatch, renew=False, recover=False, seen=seen
        )
        run_id = result.id
    except LeaseLostError as exc:
        run_id = exc.workflow_id
    assert run_id in seen


def _poll_in_thread(
    db: str,
    stop: threading.Event,
    *,
    recover: bool,
    seen: list[Any],
    polls: list[int],
    start_when: Callable[[], bool] = lambda: True,
) -> threading.Thread:
    """Another engine (own store, own event loop, own thread) polling the same SQLite file,
    from when ``start_when()`` holds."""

    async def main() -> None:
        # The engine starts only once ``start_when()`` holds: with workflows registered, its
        # scheduler claims due runs as soon as it starts (before its first recover()).
        while not stop.is_set() and not start_when():
            await asyncio.sleep(0.05)
        if stop.is_set():
            return
        # Without recover, it only looks: an engine with no workflows registered has a
        # scheduler that claims nothing.
        engine = make_engine(db) if recover else FluxEngine(storage=store_on(db), lease=LEASE)
        async with engine as other:
            while not stop.is_set():
                if start_when():
                    if recover:
                        seen.extend(await other.recover())
                    else:
                        seen.extend(r.id for r in await other.storage.find_recoverable(NAMES, 100))
                    polls[0] += 1
                await asyncio.sleep(0.05)

    thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    thread.start()
    return thread


# -- the crash-loop cap ------------------------------------------------------------------------


async def test_run_that_keeps_crashing_its_executor_is_failed_after_max_recoveries(
    paths: Paths,
) -> None:
    max_recoveries = 3
    crash = {"at": "c", "mode": "exit"}  # every time, in every process
    first = run_child(paths, action="execute", flow="saga", input=saga_input(paths, crash=crash))
    assert first.returncode == 1, first.stderr
    crashes = 1
    async with make_engine(paths.db) as engine:
        run = await only_run(engine)
        stopped_at = run.current_step
        outputs = []
        for _ in range(max_recoveries + 3):  # bounded: a loop here is the bug under test
            await until_recoverable(engine, run.id)
            child = run_child(paths, action="recover", max_recoveries=max_recoveries)
            if child.returncode == 0:
                outputs.append(json.loads(child.stdout))
                break
            assert child.returncode == 1, child.stderr
            crashes += 1
        assert crashes == max_recoveries
        assert outputs == [{"statuses": ["failed"]}]

        state = await engine.get(run.id)
        assert state is not None
        assert state.status == WorkflowStatus.FAILED
        assert state.error is not None and f"max_recoveries={max_recoveries}" in state.error
        assert state.completed_at is not None
        assert state.current_step == stopped_at
        assert statuses(state) == {
            "a": "completed",
            "b": "completed",
            "c": "pending",
            "d": "pending",
        }
        # Each crashed executor ran c once; the one that gave up did not run it.
        assert counts(paths, run.id) == {"a": 1, "b": 1, "c": max_recoveries}
        assert await engine.recover() == []


async def test_recover_drops_a_run_it_lost_to_another_engine(
    paths: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recovering engine that loses its lease (here: its renewals are switched off while a
    step blocks its loop) gives the run up quietly; the new owner finishes it.

    The other engine starts polling only once this one is inside b (so this one claims the
    run first), and b blocks until the other engine ran it too (so it took the run over)."""
    child = run_child(
        paths,
        action="execute",
        flow="saga",
        input=saga_input(
            paths, crash=crash_once(paths, "a", "exit"), block={"at": "b", "until_count": 2}
        ),
    )
    assert child.returncode == 1, child.stderr
    engine = make_engine(paths.db)
    await engine.init()
    monkeypatch.setattr(engine._keeper, "renew_now", lambda: None)
    run = await only_run(engine)
    await until_recoverable(engine, run.id)
    stop = threading.Event()
    taken: list[Any] = []
    polls = [0]
    thread = _poll_in_thread(
        paths.db, stop, recover=True, seen=taken, polls=polls, start_when=ran(paths, "b")
    )
    try:
        results = await engine.recover()
        # The other engine took the run over while this one was blocked (by its recover()
        # or by its scheduler, whichever claimed first); wait for the run to end.
        deadline = time.monotonic() + 30
        while (state := await engine.get(run.id)) is None or state.status not in (
            WorkflowStatus.COMPLETED,
            WorkflowStatus.FAILED,
        ):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        thread.join(timeout=30)
    try:
        assert results == []
        assert [r.status for r in taken] in ([], [WorkflowStatus.COMPLETED])
        state = await engine.get(run.id)
        assert state is not None
        assert state.status == WorkflowStatus.COMPLETED
        # b ran in both engines (at-least-once); only one result was recorded.
        assert counts(paths, run.id) == {"a": 2, "b": 2, "c": 1, "d": 1}
    finally:
        await engine.close()
