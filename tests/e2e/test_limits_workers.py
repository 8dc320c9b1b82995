"""SPEC §7, limits across workers: four ``fluxrun worker`` processes on one PostgreSQL drive
runs of a workflow declared ``.concurrency(3)`` and of one declared ``.concurrency(1,
key=...)``; every step counts the executions in progress in a file shared by the processes
(under an exclusive ``flock``). The most ever counted is the limit (per key for the keyed
one), never more.

Nothing depends on timing: the first executions wait (with a hang guard) until the limit is
reached, so that the limit is met for sure, then everything runs through.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fluxrun import FluxClient, PostgresStorage, WorkflowStatus

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

HANG = 120.0
WORKERS = 4

FLOWS = """
import asyncio, fcntl, json, os
from fluxrun import FluxEngine, PostgresStorage, create_workflow

COUNTER = os.environ["FLUX_COUNTER"]

def _change(group, by, wave):
    # One JSON file: executions in progress and the most seen, per group; whether the
    # group's first wave (limit executions at once) was reached.
    with open(COUNTER, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        state = json.load(f)
        g = state.setdefault(group, {"now": 0, "most": 0, "full": False})
        g["now"] += by
        g["most"] = max(g["most"], g["now"])
        if g["now"] >= wave:
            g["full"] = True
        f.seek(0)
        f.truncate()
        json.dump(state, f)
        return g["full"]

async def counted(ctx, group, wave):
    full = _change(group, 1, wave)
    try:
        for _ in range(12000):  # the first wave waits for the limit to be met (a hang guard)
            if full:
                break
            await asyncio.sleep(0.01)
            full = _change(group, 0, wave)
        await asyncio.sleep(0.005)
    finally:
        _change(group, -1, wave)

async def capped_step(ctx):
    await counted(ctx, "capped", 3)

async def keyed_step(ctx):
    await counted(ctx, "key-" + ctx.input["customer"], 1)

capped = create_workflow("capped").concurrency(3).step("work", capped_step).step("b", capped_step)
keyed = (
    create_workflow("keyed")
    .concurrency(1, key=lambda i: i["customer"])
    .step("work", keyed_step)
    .step("b", keyed_step)
)

def make():
    engine = FluxEngine(
        storage=PostgresStorage(os.environ["FLUX_DSN"], max_size=4),
        poll_interval=0.1,
        max_concurrent_runs=16,
    )
    engine.register(capped)
    engine.register(keyed)
    return engine
"""


def _worker(tmp: Path, dsn: str, n: int) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp / f"worker-{n}.log"
    env = {**os.environ, "FLUX_DSN": dsn, "FLUX_COUNTER": str(tmp / "counter.json")}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fluxrun", "worker", "flows:make"],
            cwd=tmp,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return proc, log


async def _ready(procs: list[tuple[subprocess.Popen[bytes], Path]]) -> None:
    deadline = time.monotonic() + HANG
    for proc, log in procs:
        while "ready; workflows: capped, keyed" not in log.read_text():
            assert proc.poll() is None, f"a worker ended:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"a worker never got ready:\n{log.read_text()}"
            await asyncio.sleep(0.05)


async def test_four_workers_never_run_more_than_the_limit(
    tmp_path: Path, fresh_pg_dsn: str
) -> None:
    (tmp_path / "flows.py").write_text(FLOWS)
    (tmp_path / "counter.json").write_text("{}")
    async with FluxClient(PostgresStorage(fresh_pg_dsn, max_size=4)) as client:  # migrates
        procs = [_worker(tmp_path, fresh_pg_dsn, n) for n in range(WORKERS)]
        try:
            await _ready(procs)
            handles = [await client.start("capped", {"n": n}) for n in range(24)]
            handles += [await client.start("keyed", {"customer": c}) for c in "abcab" * 3]
            for h in handles:
                result = await h.result(timeout=HANG)
                assert result.status is WorkflowStatus.COMPLETED, result.error
        finally:
            for proc, _ in procs:
                proc.send_signal(signal.SIGTERM)
            for proc, _ in procs:
                proc.wait(timeout=HANG)
    counts = json.loads((tmp_path / "counter.json").read_text())
    most = {group: c["most"] for group, c in counts.items()}
    assert most == {"capped": 3, "key-a": 1, "key-b": 1, "key-c": 1}
    assert all(c["now"] == 0 for c in counts.values())
