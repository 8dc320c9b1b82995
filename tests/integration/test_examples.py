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
RUN_ID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"  # printed in full
OUTCOME = re.compile(rf"=> (\w+) \(run ({RUN_ID})\)")


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
    """Every run in ``db``, by id, read back through a fresh engine."""
    async with FluxEngine(storage=SQLiteStorage(db)) as engine:
        return {r.id: r for r in await engine.list()}


def steps(state: WorkflowState) -> dict[str, str]:
    return {h.name: h.status.value for h in state.history}


def section(out: str, title: str) -> str:
    """The lines printed under ``title`` up to the next blank line."""
    return out.split(title, 1)[1].split("\n\n", 1)[0]


async def test_order_fulfilment(tmp_path: Path) -> None:
    db = tmp_path / "orders.db"
    out = run_example("order_fulfilment", "--db", str(db))

    outcomes = OUTCOME.findall(out)
    statuses = [status for status, _ in outcomes]
    assert statuses == ["completed", "rolled_back", "completed", "failed", "completed"]
    ids = [run_id for _, run_id in outcomes]
    assert ids[3] == ids[4]  # (d) failed, then the same run was finished forward

    # (b): the payment is refused before the commit completed: compensations, newest first.
    rolled = section(out, "(b)")
    assert re.search(r"capture\s+failed\s+1 .*payment refused: insufficient funds", rolled)
    comp = [line.split()[0] for line in rolled.splitlines() if "compensated" in line]
    assert comp == ["authorize", "reserve"]
    assert rolled.index("capture    failed") < rolled.index("compensated")
    assert rolled.rindex("compensated") < rolled.index("=> rolled_back")
    assert "ship" not in rolled

    # (c): suspended, then signalled, then the remaining steps and completion.
    waited = section(out, "(c)")
    order = [
        "approval   suspended",
        f"run {ids[2]} is suspended",
        "approval   signalled",
        "capture    completed",
        "ship       completed",
    ]
    positions = [waited.index(text) for text in order]
    assert positions == sorted(positions)

    # (d): ship fails after the commit step completed. The pivot rule: nothing is compensated,
    # the run ends failed with an error naming the commit step; resume finishes it forward
    # from ship and the commit step does not run again.
    after = section(out, "(d)")
    assert re.search(r"capture\s+completed\s+1", after)
    assert len(re.findall(r"ship\s+retrying\s+\d", after)) == 4
    assert re.search(r"ship\s+failed\s+5 .*carrier unreachable for Nuuk", after)
    assert "compensated" not in after
    stored_error = re.search(r"stored error: (.*)", after)
    assert stored_error is not None and "capture" in stored_error.group(1)
    resumed = after.split("engine.resume(order, run_id)", 1)[1]
    assert re.search(r"ship\s+completed", resumed)
    assert "capture" not in resumed.split("=>", 1)[0]  # nothing before ship ran again
    assert "capture ran 1 time(s) in this run" in after
    kept = re.search(r"attempts: (.*)", after)
    assert kept is not None
    assert "ship failed x5" in kept.group(1) and "ship completed x1" in kept.group(1)
    assert "capture completed x1" in kept.group(1)

    # (e): the listing read back from the database shows the four runs with their full ids.
    listing = section(out, "(e)").splitlines()[2:]
    assert len(listing) == 4
    assert {line.split()[0] for line in listing} == set(ids)

    runs = await stored_runs(db)
    # What was printed is what was stored (the last outcome printed for each run).
    final = dict(zip(ids, statuses, strict=True))
    assert {run_id: runs[run_id].status.value for run_id in ids} == final
    a, b, c, d = (runs[run_id] for run_id in ids[:4])
    assert steps(a)["approval"] == "skipped" and steps(a)["ship"] == "completed"
    assert steps(b) == {
        "reserve": "compensated",
        "approval": "skipped",
        "authorize": "compensated",
        "capture": "failed",
        "ship": "pending",
    }
    assert b.error == "payment refused: insufficient funds"
    assert b.data == {"reserved": [], "hold": None}
    assert steps(c)["approval"] == "completed" and c.history[1].output == {"by": "maria"}
    assert steps(c)["ship"] == "completed"
    assert steps(d) == {
        "reserve": "completed",
        "approval": "skipped",
        "authorize": "completed",
        "capture": "completed",
        "ship": "completed",
    }
    assert d.error is None
    assert d.data["reserved"] == ["bike"] and d.data["hold"] and d.data["payment"]
    assert d.data["tracking"]

    trace = [
        json.loads(line) for line in (tmp_path / "orders.trace.ndjson").read_text().splitlines()
    ]
    types = [event["type"] for event in trace]
    assert types.count("workflow:start") == 4  # resume does not start a new run
    assert types.count("step:compensate") == 2  # (b) only: (d) is past its commit step
    assert types.count("signal:received") == 1


async def test_order_fulfilment_twice_on_one_db(tmp_path: Path) -> None:
    db = tmp_path / "orders.db"
    first = OUTCOME.findall(run_example("order_fulfilment", "--db", str(db)))
    out = run_example("order_fulfilment", "--db", str(db))
    second = OUTCOME.findall(out)

    listing = section(out, "(e)").splitlines()[2:]
    assert len(listing) == 8
    assert {line.split()[0] for line in listing} == {i for _, i in first + second}

    runs = await stored_runs(db)
    assert len(runs) == 8
    assert sorted(r.status.value for r in runs.values()) == ["completed"] * 6 + ["rolled_back"] * 2
    trace = (tmp_path / "orders.trace.ndjson").read_text().splitlines()
    assert [json.loads(line)["type"] for line in trace].count("workflow:start") == 8


async def test_approval(tmp_path: Path) -> None:
    db = tmp_path / "approval.db"
    out = run_example("approval", "--db", str(db))

    assert re.search(rf"\[process 1\] run {RUN_ID} is suspended", out)
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
    assert steps(run) == {
        "submit": "completed",
        "approval": "completed",
        "pay_out": "completed",
        "notify": "completed",
    }
    assert run.history[1].output == {"by": "ann"}
    assert run.data["approved_by"] == "ann" and run.data["paid"] == 420
    assert run.data["notified"] == "kim"
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

    # Every attempt of the failed run, with the qualified type of its exception.
    attempts = [
        re.match(r"\s+(\w+)\s+#(\d+)\s+(\w+)\s*(.*)", line)
        for line in section(full, "attempts:").splitlines()[1:]
        if " #" in line
    ]
    listed = [(m.group(1), int(m.group(2)), m.group(3)) for m in attempts if m]
    assert listed == [
        ("fetch", 1, "failed"),
        ("fetch", 2, "failed"),
        ("fetch", 3, "completed"),
        ("render", 1, "failed"),
        ("render", 2, "failed"),
    ]
    errors = [m.group(4) for m in attempts if m]
    assert errors[0] == "builtins.ConnectionError: sales API unavailable"
    assert errors[2] == ""
    assert re.match(r"fluxrun\.(errors\.)?StepTimeoutError: step 'render' timed out", errors[3])

    runs = await stored_runs(db)
    done, failed = (runs[run_id] for _, run_id in outcomes)
    assert done.status.value == "completed"
    assert [(h.name, h.status.value, h.retries) for h in done.history] == [
        ("fetch", "completed", 2),
        ("render", "completed", 1),
        ("publish", "completed", 0),
    ]
    assert done.data["report"] == "summary report of 1250 rows"
    assert done.data["sent_to"] == "sales@example.com"
    assert failed.status.value == "failed"
    assert [(h.name, h.status.value, h.retries) for h in failed.history] == [
        ("fetch", "completed", 2),
        ("render", "failed", 1),
        ("publish", "pending", 0),
    ]
    assert failed.error is not None and "timed out" in failed.error
    assert failed.history[1].error_type is not None
    assert failed.history[1].error_type.endswith("StepTimeoutError")
    assert failed.completed_at is not None
