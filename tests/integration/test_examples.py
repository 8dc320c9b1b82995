"""The examples are real programs: run each one as a subprocess, then check what it stored."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from fluxrun import FluxEngine, SQLiteStorage, WorkflowState

ROOT = Path(__file__).resolve().parents[2]
OUTCOME = re.compile(r"=> (\w+) \(run ([0-9a-f]{8})\)")


def run_example(name: str, *args: str, env: dict[str, str] | None = None) -> str:
    """Run examples/<name>.py; it must exit 0 without writing anything to stderr."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / f"{name}.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == "", done.stderr
    return done.stdout


async def stored_runs(db: Path) -> dict[str, WorkflowState]:
    """Every run in ``db``, by short id, read back through a fresh engine."""
    async with FluxEngine(storage=SQLiteStorage(db)) as engine:
        return {r.id[:8]: r for r in await engine.list()}


def steps(state: WorkflowState) -> dict[str, str]:
    return {h.name: h.status.value for h in state.history}


def section(out: str, title: str) -> str:
    """The lines printed under ``title`` up to the next blank line."""
    return out.split(title, 1)[1].split("\n\n", 1)[0]


async def test_order_fulfilment(tmp_path: Path) -> None:
    db = tmp_path / "orders.db"
    out = run_example("order_fulfilment", "--db", str(db))

    outcomes = OUTCOME.findall(out)
    assert [status for status, _ in outcomes] == ["completed", "rolled_back", "completed"]

    # (b): ship fails, then the compensations run newest first.
    rolled = section(out, "(b)")
    assert re.search(r"ship\s+failed\s+1", rolled)
    assert "-- rolling back: no carrier delivers to 'nowhere'" in rolled
    comp = [line.split()[0] for line in rolled.splitlines() if "compensated" in line]
    assert comp == ["authorize", "reserve"]
    assert rolled.index("rolling back") < rolled.index("compensated")

    # (c): suspended, then signalled, then the remaining steps and completion.
    waited = section(out, "(c)")
    order = ["approval   suspended", "is suspended", "approval   signalled", "charge     completed"]
    positions = [waited.index(text) for text in order]
    assert positions == sorted(positions)

    # (d): the listing read back from the database shows the three runs.
    listing = section(out, "(d)").splitlines()[2:]
    assert len(listing) == 3
    assert {line.split()[0] for line in listing} == {run_id for _, run_id in outcomes}

    runs = await stored_runs(db)
    # What was printed is what was stored.
    assert [(runs[run_id].status.value, run_id) for _, run_id in outcomes] == outcomes
    a, b, c = (runs[run_id] for _, run_id in outcomes)
    assert steps(a)["approval"] == "skipped" and steps(a)["charge"] == "completed"
    assert steps(b) == {
        "reserve": "compensated",
        "approval": "skipped",
        "authorize": "compensated",
        "ship": "failed",
        "charge": "pending",
    }
    assert b.error == "no carrier delivers to 'nowhere'"
    assert b.data == {"reserved": [], "hold": None}
    assert steps(c)["approval"] == "completed" and c.history[1].output == {"by": "maria"}
    assert c.data["charged"] == 4200

    trace = [
        json.loads(line) for line in (tmp_path / "orders.trace.ndjson").read_text().splitlines()
    ]
    types = [event["type"] for event in trace]
    assert types.count("workflow:start") == 3
    assert types.count("step:compensate") == 2
    assert types.count("signal:received") == 1


async def test_order_fulfilment_twice_on_one_db(tmp_path: Path) -> None:
    db = tmp_path / "orders.db"
    first = OUTCOME.findall(run_example("order_fulfilment", "--db", str(db)))
    out = run_example("order_fulfilment", "--db", str(db))
    second = OUTCOME.findall(out)

    listing = section(out, "(d)").splitlines()[2:]
    assert len(listing) == 6
    assert {line.split()[0] for line in listing} == {i for _, i in first + second}

    runs = await stored_runs(db)
    assert len(runs) == 6
    assert sorted(r.status.value for r in runs.values()) == ["completed"] * 4 + ["rolled_back"] * 2
    trace = (tmp_path / "orders.trace.ndjson").read_text().splitlines()
    assert [json.loads(line)["type"] for line in trace].count("workflow:start") == 6


async def test_approval(tmp_path: Path) -> None:
    db = tmp_path / "approval.db"
    out = run_example("approval", "--db", str(db))

    assert re.search(r"\[process 1\] run ([0-9a-f]{8}) is suspended", out)
    assert "[process 1] step 'approval' waits for signal 'approved'" in out
    assert "[process 2] loaded run" in out and ": suspended" in out
    assert "wrong signal refused" in out
    assert "[process 2] signal 'approved' delivered -> run is completed" in out
    assert "stored status: completed" in out
    assert out.index("[process 1]") < out.index("[process 2]")

    runs = list((await stored_runs(db)).values())
    assert len(runs) == 1
    (run,) = runs
    assert run.status.value == "completed"
    assert steps(run) == {"submit": "completed", "approval": "completed", "pay_out": "completed"}
    assert run.history[1].output == {"by": "ann"}
    assert run.data["approved_by"] == "ann" and run.data["paid"] == 420
    assert run.completed_at is not None


def test_approval_default_db_is_a_temp_file(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    out = run_example("approval", env=env)
    assert "run is completed" in out
    assert list(tmp_path.glob("fluxrun-*/approval.db"))


async def test_report(tmp_path: Path) -> None:
    db = tmp_path / "report.db"
    out = run_example("report", "--db", str(db))

    outcomes = OUTCOME.findall(out)
    assert [status for status, _ in outcomes] == ["completed", "failed"]
    summary, full = section(out, "summary allowed:"), section(out, "full report only:")
    for text in (summary, full):
        assert "fetch   attempt 1 failed: sales API unavailable  [step:retry 1/3]" in text
        assert "fetch   attempt 2 failed: sales API unavailable  [step:retry 2/3]" in text
        assert "fetch   attempt 3 completed" in text
        assert "render  attempt 1 failed: step 'render' timed out after 0.2s" in text
    assert "render  attempt 2 completed" in summary
    assert "summary report of 1250 rows" in summary
    assert "render  attempt 2 failed: step 'render' timed out" in full
    assert "error: StepTimeoutError: step 'render' timed out after 0.2s (attempt 2)" in full

    runs = await stored_runs(db)
    done, failed = (runs[run_id] for _, run_id in outcomes)
    assert done.status.value == "completed"
    assert [(h.name, h.status.value, h.retries) for h in done.history] == [
        ("fetch", "completed", 2),
        ("render", "completed", 1),
    ]
    assert done.data["report"] == "summary report of 1250 rows"
    assert failed.status.value == "failed"
    assert [(h.name, h.status.value, h.retries) for h in failed.history] == [
        ("fetch", "completed", 2),
        ("render", "failed", 1),
    ]
    assert failed.error is not None and "timed out" in failed.error
    assert failed.completed_at is not None
