"""Runs that move on their own (SPEC §5) survive real processes being killed.

A child process (``sched_child.py``) runs an engine whose scheduler drives runs of the
workflows in ``sched_flows.py``; the test SIGKILLs it at a chosen moment (while runs sleep,
back off, take signals, compensate, ...) and another engine continues. Every step and
compensation appends a line to an effects file (with the pid and the machine clock), so the
tests count real executions, not only what the store says. Each test prints what it
measured as ``lost=N duplicated=N early=N`` and asserts all are 0:

* *lost*: a run, a step, a signal or a compensation that never happened (or ended wrong);
* *duplicated*: something done twice that must be done once: a step recorded before the kill
  that ran again, a step run twice by one process, a signal taken twice, a compensation
  that completed twice (a compensation *started* again because the kill cut it off is
  allowed; starts and completions are counted apart);
* *early*: a step after a sleep or a backoff that started before its time (by the machine
  clock, which is the store's: SQLite reads it, and the PostgreSQL server runs on this
  machine), or whatever else came before its cause (see each test).

Nothing waits for a guessed time: the tests poll the store, the effects file and the
child's report file, each wait under a deadline that only catches a hang; no test asserts
how long anything took (the restart-to-first-step time is printed, not checked).
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sched_flows import BACKOFF, FLOWS, LIVE_STEPS, Effect, make_storage, read_effects

from fluxrun import FluxEngine, StepStatus, WorkflowStatus
from fluxrun.storage._base import RunRow

pytestmark = pytest.mark.slow

CHILD = Path(__file__).with_name("sched_child.py")
#: A wait longer than this is a hang, not a slow machine.
HANG = 60.0
#: The engines here look at the store this often for work other processes made due.
POLL = 0.05
#: The children's lease (short, so PostgreSQL, which judges only leases, continues soon).
LEASE = 2.0

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@dataclass
class Env:
    backend: str
    target: str
    tmp: Path
    fx: str
    release: str
    children: list[Child]

    def inp(self, **extra: Any) -> dict[str, Any]:
        """A run input naming this test's effects and release files."""
        return {"fx": self.fx, "release": self.release, **extra}


@pytest.fixture(params=BACKENDS)
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Env]:
    if request.param == "postgres":
        target = request.getfixturevalue("fresh_pg_dsn")
    else:
        target = str(tmp_path / "runs.db")
    e = Env(
        backend=request.param,
        target=target,
        tmp=tmp_path,
        fx=str(tmp_path / "effects.log"),
        release=str(tmp_path / "release"),
        children=[],
    )
    try:
        yield e
    finally:
        Path(e.release).touch()
        for child in e.children:
            child.reap()


class Child:
    """One ``sched_child.py`` process; it reports by appending lines to ``self.out``."""

    def __init__(self, env: Env, name: str, **config: Any) -> None:
        self.out = env.tmp / f"{name}.out"
        self.err = env.tmp / f"{name}.err"
        config = {"backend": env.backend, "target": env.target, "out": str(self.out), **config}
        with open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(CHILD), json.dumps(config)],
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        self.pid = self.proc.pid
        env.children.append(self)

    def said(self, prefix: str) -> str | None:
        """The rest of the first report line that starts with ``prefix``, if any."""
        if not self.out.exists():
            return None
        for line in self.out.read_text().splitlines():
            if line.startswith(prefix):
                return line[len(prefix) :]
        return None

    async def wait_for(self, prefix: str) -> str:
        await until(f"the child to say {prefix!r}", lambda: self.said(prefix) is not None, self)
        found = self.said(prefix)
        assert found is not None
        return found

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr(self) -> str:
        return self.err.read_text() if self.err.exists() else ""

    def kill(self) -> float:
        """SIGKILL the child and reap it; the time of the kill (machine clock)."""
        assert self.alive(), f"the child ended before its kill:\n{self.stderr()}"
        killed = time.time()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=HANG)
        assert self.proc.returncode == -signal.SIGKILL
        return killed

    def stop(self, signum: int) -> int:
        """Send ``signum`` and wait for the child to end; its exit status."""
        self.proc.send_signal(signum)
        return self.proc.wait(timeout=HANG)

    def reap(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait(timeout=HANG)


async def until(
    what: str, condition: Callable[[], bool | Awaitable[bool]], child: Child | None = None
) -> None:
    """Poll ``condition`` until it holds; with ``child``, fail at once if it died."""
    deadline = time.monotonic() + HANG
    while True:
        met = condition()
        if not isinstance(met, bool):
            met = await met
        if met:
            return
        if child is not None:
            assert child.alive(), f"the child died waiting for {what}:\n{child.stderr()}"
        assert time.monotonic() < deadline, f"gave up waiting for {what} (a hang)"
        await asyncio.sleep(0.02)


def engine(env: Env, *, drive: bool, **kw: Any) -> FluxEngine:
    """An engine of this test process: with ``drive``, one that registers the workflows (its
    scheduler continues their runs); without, one that only looks and asks (it claims
    nothing)."""
    settings: dict[str, Any] = {"poll_interval": POLL, "lease": LEASE, **kw}
    e = FluxEngine(storage=make_storage(env.backend, env.target), **settings)
    if drive:
        for flow in FLOWS.values():
            e.register(flow)
    return e


async def load_all(e: FluxEngine, ids: list[str]) -> dict[str, RunRow]:
    rows = {}
    for run_id in ids:
        row = await e.storage.load(run_id)
        assert row is not None, run_id
        rows[run_id] = row
    return rows


async def until_all(e: FluxEngine, ids: list[str], status: WorkflowStatus, what: str) -> None:
    async def done() -> bool:
        rows = await load_all(e, ids)
        return all(r.status == status.value for r in rows.values())

    await until(what, done)


def by_run(effects: list[Effect]) -> dict[str, list[Effect]]:
    out: dict[str, list[Effect]] = collections.defaultdict(list)
    for e in effects:
        out[e.run_id].append(e)
    return out


@dataclass
class Tally:
    lost: int = 0
    duplicated: int = 0
    early: int = 0

    def __post_init__(self) -> None:
        self.problems: list[str] = []

    def add(self, kind: str, problem: str, n: int = 1) -> None:
        setattr(self, kind, getattr(self, kind) + n)
        if len(self.problems) < 30:
            self.problems.append(f"{kind}: {problem}")

    def steps(
        self,
        run_id: str,
        effects: list[Effect],
        keys: list[str],
        recorded: set[str],
        killed: int | None,
    ) -> None:
        """Steps ``keys`` of one finished run: a step recorded before the kill (``recorded``)
        never runs again; any other ran once after it, and at most once (cut off) in the
        killed process; no process ran one step twice."""
        for key in keys:
            mine = [e for e in effects if e.key == key]
            in_killed = sum(1 for e in mine if killed is not None and e.pid == killed)
            later = len(mine) - in_killed
            if in_killed > 1:
                self.add("duplicated", f"{run_id} {key} ran {in_killed} times before the kill")
            if key in recorded:
                if later:
                    self.add("duplicated", f"{run_id} {key} was recorded, yet ran again")
            elif later == 0:
                self.add("lost", f"{run_id} {key} never ran (to its record)")
            elif later > 1:
                self.add("duplicated", f"{run_id} {key} ran {later} times")

    def report(
        self, name: str, env: Env, capsys: pytest.CaptureFixture[str], extra: str = ""
    ) -> None:
        with capsys.disabled():
            print(
                f"\n{name}[{env.backend}]: lost={self.lost} duplicated={self.duplicated} "
                f"early={self.early}{extra}"
            )
        assert self.problems == []
        assert (self.lost, self.duplicated, self.early) == (0, 0, 0)


def recorded_steps(row: RunRow) -> set[str]:
    """The steps of ``row`` with a recorded outcome (their handlers never run again)."""
    return {s.name for s in row.steps if s.status != StepStatus.PENDING.value}


def run_ids(child_line: str) -> list[str]:
    ids = json.loads(child_line)
    assert isinstance(ids, list)
    return ids


# -- 1. kill during a sleep ----------------------------------------------------------------------


async def test_kill_during_sleep(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    n = 20
    starts = [["sc-sleep", env.inp(secs=1.5 + i * 0.05)] for i in range(n)]
    child = Child(env, "sleeper", action="serve", starts=starts, lease=LEASE)
    ids = run_ids(await child.wait_for("STARTED "))
    seen_wake: dict[str, float] = {}
    async with engine(env, drive=False) as looker:

        async def all_asleep_or_past() -> bool:
            rows = await load_all(looker, ids)
            for run_id, row in rows.items():
                if row.status == "suspended" and row.run_after is not None:
                    seen_wake[run_id] = row.run_after.timestamp()
            return all(recorded_steps(r) for r in rows.values())

        await until("every run to have gone to sleep", all_asleep_or_past, child)
        killed = child.kill()
        at_kill = await load_all(looker, ids)
    asleep = sum(1 for r in at_kill.values() if r.status == "suspended")
    assert asleep > 0, "every run woke before the kill: the kill tested nothing"

    async with engine(env, drive=True) as e:
        await until_all(e, ids, WorkflowStatus.COMPLETED, "every run to complete")
        after = await load_all(e, ids)

    tally = Tally()
    effects = by_run(read_effects(env.fx))
    for run_id in ids:
        mine = effects[run_id]
        tally.steps(run_id, mine, ["nap", "after"], recorded_steps(at_kill[run_id]), child.pid)
        naps = [e for e in mine if e.key == "nap"]
        if not naps:
            continue
        wake = float(naps[0].note)
        stored = seen_wake.get(run_id)
        if stored is not None and abs(stored - wake) > 1e-3:
            tally.add("early", f"{run_id}: stored wake {stored} is not the asked {wake}")
        for e in mine:
            if e.key == "after" and e.at < wake:
                tally.add("early", f"{run_id}: after started {wake - e.at:.3f}s before its wake")
        nap_row = next(s for s in after[run_id].steps if s.name == "nap")
        assert nap_row.completed_at is not None
        if nap_row.completed_at.timestamp() < wake:
            tally.add("early", f"{run_id}: the sleep was completed before its wake time")
    tally.report(
        "kill during a sleep",
        env,
        capsys,
        f" ({n} runs, {asleep} asleep at the kill, {time.time() - killed:.1f}s after it)",
    )


# -- 2. kill during a stored backoff ---------------------------------------------------------------


async def test_kill_during_stored_backoff(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    n = 10
    starts = [["sc-backoff", env.inp()] for _ in range(n)]
    child = Child(env, "backoff", action="serve", starts=starts, lease=LEASE)
    ids = run_ids(await child.wait_for("STARTED "))
    seen_wake: dict[str, float] = {}
    async with engine(env, drive=False) as looker:

        async def all_backing_off_or_past() -> bool:
            rows = await load_all(looker, ids)
            for run_id, row in rows.items():
                if row.wait_kind == "backoff" and row.run_after is not None:
                    seen_wake[run_id] = row.run_after.timestamp()
                    assert row.attempt == 1, row
                    assert row.owner is None, "a run backing off in the store holds a lease"
            return all(r.wait_kind == "backoff" or r.steps for r in rows.values())

        await until("every run to back off in the store", all_backing_off_or_past, child)
        child.kill()
        at_kill = await load_all(looker, ids)
    waiting = sum(1 for r in at_kill.values() if r.wait_kind == "backoff")
    assert waiting > 0, "every run retried before the kill: the kill tested nothing"

    async with engine(env, drive=True) as e:
        await until_all(e, ids, WorkflowStatus.COMPLETED, "every run to complete")
        after = await load_all(e, ids)
        attempts = {run_id: await e.attempts(run_id) for run_id in ids}

    tally = Tally()
    effects = by_run(read_effects(env.fx))
    for run_id in ids:
        mine = effects[run_id]
        tally.steps(run_id, mine, ["after"], recorded_steps(at_kill[run_id]), child.pid)
        flaky = [e for e in mine if e.key == "flaky"]
        numbers = collections.Counter(e.attempt for e in flaky)
        if numbers[1] != 1:
            # A second attempt 1 means the crash reset the attempt count.
            tally.add("duplicated", f"{run_id}: attempt 1 ran {numbers[1]} times")
        if numbers[2] == 0:
            tally.add("lost", f"{run_id}: attempt 2 never ran")
        elif numbers[2] > 1:
            tally.add("duplicated", f"{run_id}: attempt 2 ran {numbers[2]} times")
        if set(numbers) - {1, 2}:
            tally.add("duplicated", f"{run_id}: attempts {sorted(numbers)} (only 1 and 2 due)")
        first = [e for e in flaky if e.attempt == 1]
        if not first:
            continue
        # The backoff's end as stored, where seen; else a lower bound of it.
        wake = seen_wake.get(run_id, first[0].at + BACKOFF)
        for e in flaky:
            if e.attempt == 2 and e.at < wake:
                tally.add("early", f"{run_id}: attempt 2 came {wake - e.at:.3f}s early")
        row = next(s for s in after[run_id].steps if s.name == "flaky")
        if row.retries != 1 or row.status != StepStatus.COMPLETED.value:
            tally.add("lost", f"{run_id}: flaky recorded {row.status} with {row.retries} retries")
        logged = [(a.step, a.attempt, a.status.value) for a in attempts[run_id]]
        if logged[:2] != [("flaky", 1, "failed"), ("flaky", 2, "completed")]:
            tally.add("lost", f"{run_id}: attempt log {logged}")
    tally.report(
        "kill during a stored backoff",
        env,
        capsys,
        f" ({n} runs, {waiting} backing off at the kill)",
    )


# -- 3. kill between send_signal and its consumption ---------------------------------------------


async def test_kill_between_send_signal_and_consumption(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    n = 20
    starts = [["sc-inbox", env.inp()] for _ in range(n)]
    child = Child(env, "inbox", action="serve", starts=starts, lease=LEASE)
    ids = run_ids(await child.wait_for("STARTED "))
    payloads: dict[str, list[dict[str, Any]]] = {}
    async with engine(env, drive=False) as sender:

        async def all_waiting() -> bool:
            rows = await load_all(sender, ids)
            return all(r.wait_kind == "signal" and r.current_step == 0 for r in rows.values())

        await until("every run to wait for its first signal", all_waiting, child)

        def taking() -> bool:
            return any(e.pid == child.pid and e.key == "w2" for e in read_effects(env.fx))

        for i, run_id in enumerate(ids):
            if i == n // 2:
                # The child has begun to take the signals sent so far: kill it in the midst.
                await until("the child to take a signal", taking, child)
                child.kill()
            payloads[run_id] = [{"run": i, "n": 1}, {"run": i, "n": 2}]
            for payload in payloads[run_id]:
                assert await sender.send_signal(run_id, "go", payload)
        at_kill = await load_all(sender, ids)

    async with engine(env, drive=True) as e:
        await until_all(e, ids, WorkflowStatus.COMPLETED, "every run to complete")
        after = await load_all(e, ids)
        signals = {run_id: await e.storage.list_signals(run_id) for run_id in ids}
        states = {run_id: await e.get(run_id) for run_id in ids}

    tally = Tally()
    effects = by_run(read_effects(env.fx))
    for run_id in ids:
        # at_kill was read after every signal was sent, but nothing drove the runs since.
        recorded = recorded_steps(at_kill[run_id])
        tally.steps(run_id, effects[run_id], ["w1", "w2", "after"], recorded, child.pid)
        rows = signals[run_id]
        if len(rows) != 2:
            tally.add("lost" if len(rows) < 2 else "duplicated", f"{run_id}: inbox {rows}")
            continue
        for step, (row, payload) in enumerate(zip(rows, payloads[run_id], strict=True)):
            if row.consumed_by_step is None:
                tally.add("lost", f"{run_id}: signal {row.seq} was never consumed")
            elif row.consumed_by_step != step:
                tally.add(
                    "duplicated", f"{run_id}: signal {row.seq} went to step {row.consumed_by_step}"
                )
            if json.loads(row.payload) != payload:
                tally.add("lost", f"{run_id}: inbox row {row.seq} holds {row.payload}")
            if row.consumed_at is not None and row.consumed_at < row.created_at:
                tally.add("early", f"{run_id}: signal {row.seq} consumed before it was sent")
        state = states[run_id]
        assert state is not None
        outputs = [h.output for h in state.history[:2]]
        if outputs != payloads[run_id]:
            taken = [o for o in outputs if o in payloads[run_id]]
            kind = "duplicated" if len(taken) == 2 and taken[0] == taken[1] else "lost"
            tally.add(kind, f"{run_id}: the waits took {outputs}, sent {payloads[run_id]}")
        assert after[run_id].status == WorkflowStatus.COMPLETED.value
    consumed_by_child = sum(
        1
        for r in at_kill.values()
        for s in r.steps
        if s.name != "after" and s.status == StepStatus.COMPLETED.value
    )
    assert consumed_by_child > 0
    tally.report(
        "kill between send_signal and consumption",
        env,
        capsys,
        f" ({n} runs, {2 * n} signals, {consumed_by_child} waits done by the killed child)",
    )


# -- 4. kill during a cancel's compensations -------------------------------------------------------


async def test_kill_during_cancel_compensations(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    n = 6
    starts = [["sc-cancel", env.inp()] for _ in range(n)]
    child = Child(env, "cancel", action="serve", starts=starts, lease=LEASE)
    ids = run_ids(await child.wait_for("STARTED "))
    async with engine(env, drive=False) as asker:

        async def all_waiting() -> bool:
            rows = await load_all(asker, ids)
            return all(r.wait_kind == "signal" for r in rows.values())

        await until("every run to wait after two steps", all_waiting, child)
        for run_id in ids:
            assert await asker.cancel(run_id, reason="test cancel")

        def in_undo_a() -> bool:
            started = {e.run_id for e in read_effects(env.fx) if e.key == "undo_a:start"}
            return started >= set(ids)

        await until("every run to be inside its slow compensation", in_undo_a, child)
        child.kill()
        at_kill = await load_all(asker, ids)
    Path(env.release).touch()  # the slow compensation goes through from now on

    async with engine(env, drive=True) as e:
        await until_all(e, ids, WorkflowStatus.CANCELLED, "every run to end cancelled")
        after = await load_all(e, ids)

    tally = Tally()
    effects = by_run(read_effects(env.fx))
    restarted = 0
    for run_id in ids:
        mine = effects[run_id]
        tally.steps(run_id, mine, ["a", "b", "gate"], recorded_steps(at_kill[run_id]), child.pid)
        count = collections.Counter(e.key for e in mine)
        for key in ("undo_a", "undo_b"):
            done = count[f"{key}:done"]
            if done == 0:
                tally.add("lost", f"{run_id}: {key} never completed")
            elif done > 1:
                tally.add("duplicated", f"{run_id}: {key} completed {done} times")
        if count["undo_b:start"] != 1:
            tally.add("duplicated", f"{run_id}: undo_b (done before the kill) started again")
        restarted += count["undo_a:start"] - 1
        if count["undo_a:start"] > 2:
            tally.add("duplicated", f"{run_id}: undo_a started {count['undo_a:start']} times")
        # Compensations run last step first: undo_a never starts before undo_b is done.
        order = [e.key for e in mine if e.key.startswith("undo_")]
        if "undo_b:done" not in order or order.index("undo_a:start") < order.index("undo_b:done"):
            tally.add("early", f"{run_id}: compensations in the order {order}")
        statuses = {s.name: s.status for s in after[run_id].steps}
        if statuses != {"a": "compensated", "b": "compensated", "gate": "suspended"}:
            tally.add("lost", f"{run_id}: steps {statuses}")
        if after[run_id].error is None or "test cancel" not in after[run_id].error:
            tally.add("lost", f"{run_id}: error {after[run_id].error!r} lost the reason")
    tally.report(
        "kill during a cancel's compensations",
        env,
        capsys,
        f" ({n} runs; {restarted} compensations cut off by the kill and started again)",
    )


# -- 5. two processes racing start with one idempotency key -------------------------------------


async def test_racing_starts_make_one_run_per_key(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = [f"key-{i}" for i in range(60)]
    barrier = env.tmp / "go"
    config = {"action": "race_start", "keys": keys, "barrier": str(barrier), "fx": env.fx}
    children = [Child(env, f"starter-{i}", **config) for i in range(2)]
    for c in children:
        await c.wait_for("READY")
    barrier.touch()
    answers = []
    for c in children:
        answers.append(json.loads(await c.wait_for("STARTS ")))
        await c.wait_for("DONE")
        assert c.proc.wait(timeout=HANG) == 0, c.stderr()

    async with engine(env, drive=False) as looker:
        states = await looker.list()
        rows = [await looker.storage.load(s.id) for s in states]
    tally = Tally()
    per_key = collections.defaultdict(list)
    for row in rows:
        assert row is not None
        per_key[row.idempotency_key].append(row)
    effects = by_run(read_effects(env.fx))
    for key in keys:
        found = per_key.get(key, [])
        if not found:
            tally.add("lost", f"{key}: no run")
            continue
        if len(found) > 1:
            tally.add("duplicated", f"{key}: {len(found)} runs", len(found) - 1)
        ids = {a[key][0] for a in answers}
        if ids != {found[0].id}:
            tally.add("duplicated", f"{key}: the processes got runs {ids}")
        created = sum(1 for a in answers if a[key][1])
        if created != 1:
            tally.add("duplicated" if created else "lost", f"{key}: created {created} times")
        for row in found:
            if row.status != WorkflowStatus.COMPLETED.value:
                tally.add("lost", f"{key}: run {row.id} is {row.status}")
            ran = len(effects.get(row.id, []))
            if ran != 1:  # no crash here: each run is driven once, by one of the two
                tally.add("duplicated" if ran else "lost", f"{key}: its step ran {ran} times")
    unkeyed = [r for r in rows if r is not None and r.idempotency_key not in keys]
    if unkeyed:
        tally.add("duplicated", f"runs without a key: {unkeyed}", len(unkeyed))
    tally.report("racing start", env, capsys, f" ({len(keys)} keys, 2 processes)")


# -- 6. two processes racing send_signal with one dedupe key ------------------------------------


async def test_racing_send_signal_keeps_one_per_dedupe_key(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    n = 40
    async with engine(env, drive=True) as e:
        ids = [(await e.start(FLOWS["sc-wait"], env.inp())).id for _ in range(n)]

        async def all_waiting() -> bool:
            rows = await load_all(e, ids)
            return all(r.wait_kind == "signal" for r in rows.values())

        await until("every run to wait for its signal", all_waiting)
        barrier = env.tmp / "go"
        config = {"action": "race_signal", "runs": ids, "barrier": str(barrier)}
        children = [Child(env, f"sender-{i}", **config) for i in range(2)]
        for c in children:
            await c.wait_for("READY")
        barrier.touch()
        answers = []
        for c in children:
            answers.append(json.loads(await c.wait_for("SIGNALS ")))
            assert c.proc.wait(timeout=HANG) == 0, c.stderr()
        await until_all(e, ids, WorkflowStatus.COMPLETED, "every run to take its signal")
        signals = {run_id: await e.storage.list_signals(run_id) for run_id in ids}
        states = {run_id: await e.get(run_id) for run_id in ids}

    tally = Tally()
    effects = by_run(read_effects(env.fx))
    for run_id in ids:
        rows = signals[run_id]
        if len(rows) != 1:
            tally.add("lost" if not rows else "duplicated", f"{run_id}: {len(rows)} inbox rows")
        true = sum(1 for a in answers if a[run_id])
        if true != 1:
            tally.add("duplicated" if true else "lost", f"{run_id}: True {true} times")
        if not rows:
            continue
        payload = json.loads(rows[0].payload)
        winner = next((c.pid for c, a in zip(children, answers, strict=True) if a[run_id]), None)
        if payload.get("pid") != winner:
            tally.add("lost", f"{run_id}: stored {payload}, but process {winner} got True")
        state = states[run_id]
        assert state is not None
        if state.history[0].output != payload or rows[0].consumed_by_step != 0:
            tally.add("lost", f"{run_id}: gate took {state.history[0].output}, stored {payload}")
        tally.steps(run_id, effects[run_id], ["gate", "after"], set(), None)
    tally.report("racing send_signal", env, capsys, f" ({n} runs, 2 processes)")


# -- 7. cancel against a live run driven by another process ---------------------------------------


async def test_cancel_of_a_run_another_process_drives(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    per = 2
    blocks = [b for b in range(LIVE_STEPS) for _ in range(per)]
    starts = [["sc-live", env.inp(block_at=b)] for b in blocks]
    # The owner sees a cancel asked elsewhere at its next lease renewal (a third of a lease).
    child = Child(env, "live", action="serve", starts=starts, lease=1.5)
    ids = run_ids(await child.wait_for("STARTED "))
    block_at = dict(zip(ids, blocks, strict=True))

    def all_blocked() -> bool:
        started = {(e.run_id, e.key) for e in read_effects(env.fx)}
        return all((r, f"s{block_at[r]}:start") in started for r in ids)

    await until("every run to be inside its blocking step", all_blocked, child)
    async with engine(env, drive=False) as asker:
        for run_id in ids:
            assert await asker.cancel(run_id, reason="stop it")
        await until_all(asker, ids, WorkflowStatus.CANCELLED, "every run to end cancelled")
        after = await load_all(asker, ids)
    assert child.alive(), child.stderr()

    tally = Tally()
    effects = by_run(read_effects(env.fx))
    for run_id in ids:
        b = block_at[run_id]
        count = collections.Counter(e.key for e in effects[run_id])
        for i in range(LIVE_STEPS):
            starts_i, done_i = count[f"s{i}:start"], count[f"s{i}:done"]
            if i < b and (starts_i, done_i) != (1, 1):
                tally.add("duplicated" if starts_i > 1 else "lost", f"{run_id} s{i}: {count}")
            if i == b and (starts_i, done_i) != (1, 0):
                tally.add("duplicated", f"{run_id}: the interrupted s{i} ran on: {count}")
            if i > b and starts_i:
                tally.add("early", f"{run_id}: s{i} started after the cancel")
            undone = count[f"u{i}:done"]
            if i < b and undone != 1:
                tally.add("lost" if not undone else "duplicated", f"{run_id} u{i} done {undone}x")
            if i >= b and count[f"u{i}:start"]:
                tally.add("duplicated", f"{run_id}: u{i} compensated a step that never completed")
        statuses = [s.status for s in sorted(after[run_id].steps, key=lambda s: s.index)]
        if statuses != ["compensated"] * b:
            tally.add("lost", f"{run_id} (blocked at {b}): steps {statuses}")
    assert child.stop(signal.SIGTERM) == 0, child.stderr()
    assert child.said("CLOSED") is not None
    tally.report(
        "cancel of a live run in another process",
        env,
        capsys,
        f" ({len(ids)} runs; early counts steps started after the cancel)",
    )


# -- recovery without waiting for a lease; clean stops release at once -------------------------


async def test_kill_9_on_sqlite_continues_without_waiting_for_the_default_lease(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = Env(
        backend="sqlite",
        target=str(tmp_path / "runs.db"),
        tmp=tmp_path,
        fx=str(tmp_path / "effects.log"),
        release=str(tmp_path / "release"),
        children=[],
    )
    n = 10
    try:
        starts = [["sc-busy", env.inp()] for _ in range(n)]
        child = Child(env, "busy", action="serve", starts=starts)  # the default lease: 15 s
        ids = run_ids(await child.wait_for("STARTED "))

        def all_working() -> bool:
            return {e.run_id for e in read_effects(env.fx) if e.key == "work:start"} >= set(ids)

        await until("every run to be inside its step", all_working, child)
        killed = child.kill()
        Path(env.release).touch()
        e = engine(env, drive=True, lease=15.0)
        started = time.time()
        await e.init()
        try:

            def first_here() -> bool:
                return any(x.pid == os.getpid() for x in read_effects(env.fx))

            await until("the new engine's first step", first_here)
            first = min(x.at for x in read_effects(env.fx) if x.pid == os.getpid())
            await until_all(e, ids, WorkflowStatus.COMPLETED, "every run to complete")
        finally:
            await e.close()
    finally:
        Path(env.release).touch()
        for c in env.children:
            c.reap()
    tally = Tally()
    effects = by_run(read_effects(env.fx))
    for run_id in ids:
        tally.steps(run_id, effects[run_id], ["after"], set(), child.pid)
        works = collections.Counter(x.pid for x in effects[run_id] if x.key == "work:start")
        if works != {child.pid: 1, os.getpid(): 1}:
            tally.add("lost", f"{run_id}: work started by {dict(works)}")
    tally.report(
        "kill -9 with the default lease",
        env,
        capsys,
        f" ({n} runs; lease 15s; restart-to-first-step {first - started:.3f}s, "
        f"kill-to-first-step {first - killed:.3f}s)",
    )


@pytest.mark.parametrize(
    ("signum", "close_timeout"),
    [(signal.SIGTERM, None), (signal.SIGINT, 0.3)],
    ids=["SIGTERM-steps-finish", "SIGINT-steps-cut-off"],
)
async def test_clean_stop_releases_every_lease_at_once(
    env: Env, signum: int, close_timeout: float | None, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGTERM or SIGINT: the child leaves ``async with FluxEngine`` and its close releases
    the runs it holds, whether their steps finish in time (released at the next step
    boundary) or not (cut off after ``close(timeout=...)``)."""
    n = 6
    starts = [["sc-busy", env.inp()] for _ in range(n)]
    config: dict[str, Any] = {"action": "serve", "starts": starts}  # the default lease
    if close_timeout is not None:
        config["close_timeout"] = close_timeout
    child = Child(env, "stopped", **config)
    ids = run_ids(await child.wait_for("STARTED "))

    def all_working() -> bool:
        return {e.run_id for e in read_effects(env.fx) if e.key == "work:start"} >= set(ids)

    await until("every run to be inside its step", all_working, child)
    child.proc.send_signal(signum)
    if close_timeout is None:
        await child.wait_for("STOPPING")
        Path(env.release).touch()  # the steps end while the child closes
    assert child.proc.wait(timeout=HANG) == 0, child.stderr()
    assert child.said("CLOSED") is not None, child.stderr()
    async with engine(env, drive=False) as looker:
        rows = await load_all(looker, ids)
    tally = Tally()
    for run_id, row in rows.items():
        if row.owner is not None or row.lease_until is not None:
            tally.add("lost", f"{run_id} is still held: owner {row.owner}, {row.status}")
        if row.status in ("completed", "suspended"):
            tally.add("early", f"{run_id}: went on after the stop ({row.status})")
    Path(env.release).touch()
    async with engine(env, drive=True) as e:
        await until_all(e, ids, WorkflowStatus.COMPLETED, "another engine to finish the runs")
    effects = by_run(read_effects(env.fx))
    for run_id in ids:
        tally.steps(run_id, effects[run_id], ["after"], set(), None)
        done = [e.pid for e in effects[run_id] if e.key == "work:done"]
        # Finished in the child as it closed, or (cut off there) once by the next engine.
        want = [child.pid] if close_timeout is None else [os.getpid()]
        if done != want:
            tally.add("lost" if not done else "duplicated", f"{run_id}: work done by {done}")
    tally.report(f"clean {signal.Signals(signum).name}", env, capsys, f" ({n} runs)")


# -- child workflows across a kill -----------------------------------------------------------------


async def test_kill_while_parents_wait_for_their_children(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGKILL of the process driving children (in flight) whose parents wait for them:
    another engine finishes the children, and their ends wake the parents, each of which
    ends with its one child's data."""
    n = 8
    starts = [["sc-parent", env.inp()] for _ in range(n)]
    child = Child(env, "parents", action="serve", starts=starts, lease=LEASE)
    ids = run_ids(await child.wait_for("STARTED "))
    kids = [f"{run_id}:call" for run_id in ids]

    def all_kids_working() -> bool:
        return {e.run_id for e in read_effects(env.fx) if e.key == "kid:start"} >= set(kids)

    await until("every child to be inside its step", all_kids_working, child)
    async with engine(env, drive=False) as looker:

        async def parents_waiting() -> bool:
            rows = await load_all(looker, ids)
            return all(r.status == "suspended" and r.owner is None for r in rows.values())

        await until("every parent to wait for its child", parents_waiting, child)
        killed = child.kill()
    Path(env.release).touch()
    async with engine(env, drive=True) as e:
        await until_all(e, ids, WorkflowStatus.COMPLETED, "every parent to complete")
        after = await load_all(e, ids)
        children = {run_id: await e.storage.list_children(run_id) for run_id in ids}
    tally = Tally()
    effects = by_run(read_effects(env.fx))
    for run_id, kid_id in zip(ids, kids, strict=True):
        tally.steps(run_id, effects[run_id], ["before", "after"], {"before"}, child.pid)
        if [k.id for k in children[run_id]] != [kid_id]:
            tally.add("duplicated", f"{run_id}: children {[k.id for k in children[run_id]]}")
        starts_by = collections.Counter(x.pid for x in effects[kid_id] if x.key == "kid:start")
        if starts_by != {child.pid: 1, os.getpid(): 1}:
            tally.add("lost", f"{kid_id}: its step started by {dict(starts_by)}")
        call = next(s for s in after[run_id].steps if s.name == "call")
        if call.output is None or json.loads(call.output) != {"by": os.getpid()}:
            tally.add("lost", f"{run_id}: the step's output is {call.output}")
    tally.report(
        "kill while parents wait for their children",
        env,
        capsys,
        f" ({n} parents, {time.time() - killed:.1f}s after the kill)",
    )
