"""SPEC §7, worker mode: ``fluxrun worker MODULE:ATTR`` runs an engine's scheduler as a
process of its own; a ``FluxClient`` in another process starts runs by name and gets their
results; SIGTERM drains the worker (a step still running is cut short at ``--drain``, its run
released at once) and another worker finishes what it left. Real processes on one SQLite
file; nothing depends on timing (``HANG`` is a hang guard only).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fluxrun import FluxClient, SQLiteStorage, WorkflowStatus

HANG = 60.0

FLOWS = """
import asyncio, os
from fluxrun import FluxEngine, SQLiteStorage, create_workflow

async def work(ctx):
    gate = ctx.input.get("gate")
    if gate:
        open(gate + ".began", "w").close()
        while not os.path.exists(gate):
            await asyncio.sleep(0.01)
    ctx.data["n"] = ctx.input["n"] * 2

flow = create_workflow("job").step("work", work).step("after", lambda ctx: None)

def make():
    engine = FluxEngine(storage=SQLiteStorage(os.environ["FLUX_DB"]), poll_interval=0.1)
    engine.register(flow)
    return engine
"""


class Worker:
    """One ``fluxrun worker`` process."""

    def __init__(self, tmp: Path, name: str, *args: str) -> None:
        self.log = tmp / f"{name}.log"
        env = {**os.environ, "FLUX_DB": str(tmp / "flux.db")}
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fluxrun", "worker", "flows:make", *args],
                cwd=tmp,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def text(self) -> str:
        return self.log.read_text()

    async def ready(self) -> None:
        deadline = time.monotonic() + HANG
        while "ready; workflows: job" not in self.text():
            assert self.proc.poll() is None, f"the worker ended:\n{self.text()}"
            assert time.monotonic() < deadline, f"the worker never got ready:\n{self.text()}"
            await asyncio.sleep(0.05)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=HANG)


@pytest.fixture
def tmp(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "flows.py").write_text(FLOWS)
    yield tmp_path


@pytest.fixture
def workers(tmp: Path) -> Iterator[list[Worker]]:
    made: list[Worker] = []
    yield made
    for w in made:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait()


async def _until(what: str, check: Any) -> None:
    deadline = time.monotonic() + HANG
    while not await check():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        await asyncio.sleep(0.05)


async def test_a_worker_drives_runs_a_client_starts_and_drains_on_sigterm(
    tmp: Path, workers: list[Worker]
) -> None:
    first = Worker(tmp, "first", "--concurrency", "4", "--drain", "0.2")
    workers.append(first)
    await first.ready()
    async with FluxClient(SQLiteStorage(str(tmp / "flux.db")), poll_interval=0.05) as client:
        handles = [await client.start("job", {"n": n}) for n in range(5)]
        results = [await h.result(timeout=HANG) for h in handles]
        assert [r.status for r in results] == [WorkflowStatus.COMPLETED] * 5
        assert [r.data for r in results] == [{"n": 2 * n} for n in range(5)]
        # A run whose step is still running when the worker is told to stop.
        gate = tmp / "gate"
        held = await client.start("job", {"n": 21, "gate": str(gate)})
        await _until("the held step to begin", lambda: _exists(Path(str(gate) + ".began")))
        assert first.stop() == 0
        assert "fluxrun worker stopped" in first.text()
        row = await client.storage.load(held.id)
        assert row is not None and row.owner is None  # released, not left for its lease
        assert row.status in ("pending", "running")
        # Another worker finishes it.
        gate.touch()
        second = Worker(tmp, "second")
        workers.append(second)
        await second.ready()
        done = await held.result(timeout=HANG)
        assert done.status is WorkflowStatus.COMPLETED and done.data == {"n": 42}
        assert second.stop() == 0


async def _exists(path: Path) -> bool:
    return path.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["worker", "nocolon"], "expected MODULE:ATTR"),
        (["worker", "no_such_module:engine"], "cannot import module"),
        (["worker", "flows:nothing"], "has no attribute"),
        (["worker", "flows:FLOWS_NOT_HERE"], "has no attribute"),
        (["worker", "flows:flow"], "not a FluxEngine"),
        (["worker", "flows:make", "--concurrency", "0"], "--concurrency must be at least 1"),
    ],
)
def test_a_bad_command_line_says_what_is_wrong(tmp: Path, args: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fluxrun", *args],
        cwd=tmp,
        env={**os.environ, "FLUX_DB": str(tmp / "flux.db")},
        capture_output=True,
        text=True,
        timeout=HANG,
    )
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_worker_help_has_an_example() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fluxrun", "worker", "--help"],
        capture_output=True,
        text=True,
        timeout=HANG,
    )
    assert proc.returncode == 0
    assert "fluxrun worker myapp.flows:engine" in proc.stdout
