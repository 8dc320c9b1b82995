"""The kill -9 test: worker processes are SIGKILLed at random moments while they drive
hundreds of runs; each new worker recovers what the dead one left. Afterwards nothing may be
lost, no step result may be recorded twice, and repeated side effects must stay within
``kills x steps in flight``.

The workflow (``crash_worker.py``): 5 steps; 1 run in 6 fails at its last step and is rolled
back (steps 0 and 2 have compensations); 1 run in 10 waits at step 2 for the signal ``go``,
which the next worker sends. Each worker drives at most ``CONCURRENCY`` runs at a time.

The RNG that picks the kill moments is seeded; the seed is printed with the summary line, and
``FLUXRUN_CRASH_SEED=<seed>`` replays the same kill schedule.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from crash_worker import (
    COMPENSATED,
    GATE,
    NAME,
    STEPS,
    build_flow,
    make_storage,
    run_input,
    signal_payload,
    step_output,
)

from fluxrun import FluxEngine, StepStatus, WorkflowFilter, WorkflowStatus

WORKER = Path(__file__).with_name("crash_worker.py")
RUNS = 300
KILLS = 5
CONCURRENCY = 20
LEASE = 1.0
SEED_ENV = "FLUXRUN_CRASH_SEED"
_RECOVERING = re.compile(r"recovering run \S+ \(status (\w+)")


@dataclass
class Rounds:
    """What happened to the worker processes."""

    kills: int = 0
    workers: int = 0
    errors: list[str] = field(default_factory=list)
    #: Runs taken over from a dead worker, by the status they were found in.
    recovered: collections.Counter[str] = field(default_factory=collections.Counter)


def _spawn(config: dict[str, Any], log: Path) -> subprocess.Popen[str]:
    with open(log, "w") as err:
        return subprocess.Popen(
            [sys.executable, str(WORKER), json.dumps(config)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )


def _finish(proc: subprocess.Popen[str], rounds: Rounds, log: Path, timeout: float) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    errors = [line for line in out.splitlines() if line.startswith("ERROR")]
    if errors:
        rounds.errors += [*errors, f"(stderr of that worker: {log})"]
    rounds.recovered.update(_RECOVERING.findall(log.read_text()))
    return out


def run_workers(backend: str, target: str, tmp: Path, rng: random.Random) -> Rounds:
    """``KILLS`` workers killed at random moments, then one final worker that finishes."""
    fx_dir = tmp / "effects"
    fx_dir.mkdir()
    config: dict[str, Any] = {
        "backend": backend,
        "target": target,
        "fx_dir": str(fx_dir),
        "runs": RUNS,
        "concurrency": CONCURRENCY,
        "lease": LEASE,
        # Above the number of kills: a run in flight at every kill is still not a crash loop.
        "max_recoveries": KILLS + 2,
    }
    rounds = Rounds()
    for n in range(KILLS):
        log = tmp / f"worker-{n}.log"
        proc = _spawn(config, log)
        rounds.workers += 1
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "START", log.read_text()
        time.sleep(rng.uniform(0.3, 1.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            rounds.kills += 1
        _finish(proc, rounds, log, timeout=60)
        assert proc.returncode in (0, -signal.SIGKILL), log.read_text()
        # The next worker recovers at init: let the dead worker's leases expire first.
        time.sleep(LEASE + 0.3)
    log = tmp / "worker-final.log"
    proc = _spawn({**config, "final": True}, log)
    rounds.workers += 1
    out = _finish(proc, rounds, log, timeout=180)
    assert proc.returncode == 0, log.read_text()
    assert out.splitlines()[-1] == "DONE", out
    return rounds


@dataclass
class Report:
    runs: int = 0
    lost: int = 0
    duplicate_records: int = 0
    problems: list[str] = field(default_factory=list)
    expected_effects: int = 0
    effects: int = 0
    max_repeats: int = 0
    signals: int = 0
    rolled_back: int = 0
    integrity: str = "n/a"

    def problem(self, text: str) -> None:
        if len(self.problems) < 20:
            self.problems.append(text)


def expected_statuses(idx: int) -> list[str]:
    if not run_input(idx)["fail"]:
        return [StepStatus.COMPLETED.value] * STEPS
    out = [
        StepStatus.COMPENSATED.value if i in COMPENSATED else StepStatus.COMPLETED.value
        for i in range(STEPS - 1)
    ]
    return [*out, StepStatus.FAILED.value]


def expected_effects(idx: int) -> set[str]:
    keys = {f"s{i}" for i in range(STEPS)}
    if run_input(idx)["fail"]:
        keys |= {f"u{i}" for i in COMPENSATED}
    return keys


async def check(backend: str, target: str, fx_dir: Path) -> Report:
    """The offline checker: every run, every step row and every side effect."""
    report = Report()
    engine = FluxEngine(storage=make_storage(backend, target))
    engine.register(build_flow())
    async with engine:
        states = await engine.list(WorkflowFilter(name=NAME))
        report.runs = len(states)
        by_idx: dict[int, list[Any]] = collections.defaultdict(list)
        for state in states:
            by_idx[state.input["idx"]].append(state)
        run_idx: dict[str, int] = {}
        for idx in range(RUNS):
            found = by_idx.get(idx, [])
            if len(found) != 1:
                report.lost += not found
                report.problem(f"run idx {idx}: {len(found)} runs in the store")
                continue
            state = found[0]
            run_idx[state.id] = idx
            want = (
                WorkflowStatus.ROLLED_BACK if run_input(idx)["fail"] else WorkflowStatus.COMPLETED
            )
            if state.status != want:
                report.lost += state.status not in (
                    WorkflowStatus.COMPLETED,
                    WorkflowStatus.FAILED,
                    WorkflowStatus.ROLLED_BACK,
                    WorkflowStatus.COMPENSATION_FAILED,
                    WorkflowStatus.CANCELLED,
                )
                report.problem(f"run {idx}: status {state.status.value}, want {want.value}")
            report.rolled_back += state.status == WorkflowStatus.ROLLED_BACK
            row = await engine.storage.load(state.id)
            assert row is not None
            indexes = [s.index for s in row.steps]
            report.duplicate_records += len(indexes) - len(set(indexes))
            if indexes != list(range(STEPS)):
                report.problem(f"run {idx}: recorded step indexes {indexes}")
                continue
            statuses = [s.status for s in row.steps]
            if statuses != expected_statuses(idx):
                report.problem(f"run {idx}: step statuses {statuses}")
            for s in row.steps:
                if s.fence > row.fence:
                    report.problem(f"run {idx} step {s.index}: fence {s.fence} > {row.fence}")
                if s.status == StepStatus.FAILED.value:
                    continue
                got = None if s.output is None else json.loads(s.output)
                if s.index == GATE and run_input(idx)["wait"]:
                    want_out: Any = signal_payload(idx)
                    report.signals += got == want_out
                else:
                    want_out = step_output(idx, s.index)
                if got != want_out:
                    report.problem(f"run {idx} step {s.index}: output {got!r}, want {want_out!r}")
            forward = [s.fence for s in row.steps if s.status == StepStatus.COMPLETED.value]
            if forward != sorted(forward):
                report.problem(f"run {idx}: fences of completed steps {forward} decrease")

    seen: collections.Counter[tuple[str, str]] = collections.Counter()
    for path in fx_dir.iterdir():
        for line in path.read_text().splitlines():
            run_id, key, _attempt = line.split(",")
            seen[(run_id, key)] += 1
    for run_id, idx in run_idx.items():
        for key in expected_effects(idx):
            report.expected_effects += 1
            if seen[(run_id, key)] == 0:
                report.problem(f"run {idx}: {key} recorded but its side effect never happened")
    for run_id, key in seen:
        idx_of = run_idx.get(run_id)
        if idx_of is None or key not in expected_effects(idx_of):
            report.problem(f"unexpected side effect {key} of run {run_id}")
    report.effects = sum(seen.values())
    report.max_repeats = max(seen.values(), default=1) - 1
    return report


def _sqlite_checks(path: str, report: Report) -> None:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        report.integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        dup = conn.execute(
            "SELECT count(*) FROM (SELECT run_id, idx FROM flux_steps "
            "GROUP BY run_id, idx HAVING count(*) > 1)"
        ).fetchone()[0]
        report.duplicate_records += dup
    finally:
        conn.close()


def _postgres_checks(dsn: str, report: Report) -> None:
    import psycopg

    with psycopg.connect(dsn) as conn:
        dup = conn.execute(
            "SELECT count(*) FROM (SELECT run_id, idx FROM flux_steps "
            "GROUP BY run_id, idx HAVING count(*) > 1) AS d"
        ).fetchone()
        assert dup is not None
        report.duplicate_records += dup[0]


def _counts(counter: collections.Counter[str]) -> str:
    return " ".join(f"{k} {v}" for k, v in sorted(counter.items())) or "none"


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_kill_9_storm_loses_nothing(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    if backend == "postgres":
        target = request.getfixturevalue("fresh_pg_dsn")
    else:
        target = str(tmp_path / "runs.db")
    seed = int(os.environ.get(SEED_ENV) or random.randrange(2**32))
    rng = random.Random(seed)
    started = time.monotonic()

    try:
        rounds = run_workers(backend, target, tmp_path, rng)
        report = asyncio.run(check(backend, target, tmp_path / "effects"))
        if backend == "sqlite":
            _sqlite_checks(target, report)
        else:
            _postgres_checks(target, report)
    except BaseException as exc:
        exc.add_note(f"{backend}: seed {seed} ({SEED_ENV}={seed} replays the kill schedule)")
        raise

    repeats = report.effects - report.expected_effects
    bound = rounds.kills * CONCURRENCY
    # The step commits of the runs in flight were grouped (so kills met batches in flight).
    grouped = max(
        (int(n) for f in tmp_path.glob("group-*.log") for n in f.read_text().split()),
        default=0,
    )
    with capsys.disabled():
        print(
            f"\n{backend}: {report.runs} runs, {rounds.kills} kills, lost {report.lost}, "
            f"duplicate step records {report.duplicate_records}, repeated side effects "
            f"{repeats} (bound {bound}, max {report.max_repeats} per step), "
            f"{report.rolled_back} rolled back, {report.signals} signalled, recovered "
            f"{sum(rounds.recovered.values())} ({_counts(rounds.recovered)}), "
            f"integrity {report.integrity}, largest group commit {grouped}; seed {seed}, "
            f"{time.monotonic() - started:.1f}s"
        )
    assert rounds.errors == [], f"seed {seed}: {rounds.errors}"
    assert report.problems == [], f"seed {seed}: {report.problems}"
    assert report.runs == RUNS
    assert report.lost == 0
    assert report.duplicate_records == 0
    assert 0 <= repeats <= bound, f"seed {seed}"
    assert rounds.kills >= 1, f"seed {seed}: every worker finished before its kill"
    assert grouped >= 2, f"seed {seed}: no step commits were grouped"
    if backend == "sqlite":
        assert report.integrity == "ok"
