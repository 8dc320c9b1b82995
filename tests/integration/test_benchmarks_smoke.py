"""``python -m benchmarks --quick`` runs every section and prints it (speed is never checked)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DSN_ENV = "FLUXRUN_BENCH_PG_DSN"


def run_benchmarks(*args: str) -> str:
    """Run the entry point as a subprocess from the repository root; return its stdout."""
    env = {k: v for k, v in os.environ.items() if k != DSN_ENV}
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-m", "benchmarks", "--quick", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert proc.stderr == "", proc.stderr
    return proc.stdout


def test_quick_run_prints_every_section() -> None:
    out = run_benchmarks()
    for text in (
        "Python 3.",
        "SQLite 3.",
        "cores",
        "1. Memory store",
        "bare asyncio loop",
        "engine overhead over the bare loop",
        "2. SQLite store",
        "floor: raw BEGIN IMMEDIATE;INSERT;COMMIT",
        "engine sequential",
        "in flight (asyncio.gather)",
        "3. SQLite sequential, ~100 KB ctx.data",
        "small data",
        "4. PostgreSQL store",
        "skipped: no DSN given",
        "5. Timers",
        "floor: 20 bare asyncio.sleep(1) tasks: p50 / p99",
        "SQLite: p50 / p99",
        "SQLite: earliest wake-up",
        "6. Sleeping runs",
        "memory store: RSS growth, all asleep",
        "SQLite: tasks / threads / coroutines",
        "7. Restart",
        "SQLite: kill -9 to the first step",
        "8. continuing a run",
        "send_signal → next step",
        "signal() with its result",
        "9. Batches: storing 100 items in bulk",
        "SQLite: start_batch of 100 inputs",
        "SQLite: floor: 100 plain rows in one transaction",
        "workflows, group commit",
        "11. ctx.data size",
        "1 MB structured, one key replaced per step",
        "Targets:",
    ):
        assert text in out, f"{text!r} missing from:\n{out}"
    # Every target row carries a verdict; which one depends on the machine, not on the code.
    targets = [line for line in out.splitlines() if "target ≤" in line or "target ≥" in line]
    assert len(targets) == 9, out
    assert all(line.endswith(("PASS", "MISS")) for line in targets), out


def test_only_and_profile_options() -> None:
    out = run_benchmarks("--only", "memory", "--profile")
    assert "1. Memory store" in out
    assert "2. SQLite store" not in out
    assert "Profile: MemoryStorage" in out
    assert "_runner.py" in out  # the engine's hot path shows up in the profile


def test_postgres_section_with_dsn(fresh_pg_dsn: str) -> None:
    out = run_benchmarks("--only", "postgres", "--pg-dsn", fresh_pg_dsn)
    assert "4. PostgreSQL store" in out
    assert "ERROR" not in out
    # Either the store exists and the section measured it, or it says why it did not.
    assert "floor: raw autocommit INSERT" in out or "skipped: " in out, out
    if "floor: raw autocommit INSERT" in out:
        assert "engine sequential" in out
        assert "in flight (asyncio.gather)" in out


def test_scheduler_sections_on_postgres(fresh_pg_dsn: str) -> None:
    out = run_benchmarks("--only", "timers", "restart", "batches", "--pg-dsn", fresh_pg_dsn)
    assert "ERROR" not in out, out
    for text in (
        "5. Timers",
        "PostgreSQL: p50 / p99",
        "PostgreSQL: earliest wake-up",
        "7. Restart",
        "PostgreSQL: kill -9 to the first step",
        "lease 1s",
        "PostgreSQL: start_batch of 100 inputs",
    ):
        assert text in out, f"{text!r} missing from:\n{out}"


@pytest.mark.slow
def test_pg_start_runs_a_throwaway_server() -> None:
    out = run_benchmarks("--only", "postgres", "--pg-start")
    if "did not start" in out:
        pytest.skip("no PostgreSQL server binaries on this machine")
    assert "--pg-start: throwaway server postgresql://" in out
    assert "4. PostgreSQL store" in out
    assert "ERROR" not in out
