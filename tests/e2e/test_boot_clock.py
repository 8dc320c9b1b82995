"""Leases between two real processes on one SQLite file are judged by the boot clock.

A child process (``recovery_child.py``, real clocks) holds a run and blocks in its step b.
This process opens stores on the same file whose wall clocks are stepped (as by an NTP
correction or a resumed VM; simulated per store, the machine's clock is left alone): a live
lease is not given away, however far the wall clock jumps past it. When the child is stopped
(SIGSTOP: alive, so not recognised as a dead owner, but renewing nothing) its lease runs out
on the boot clock and is found even by a store whose wall clock went back a day. Nothing
waits for a guessed time: the tests poll for what they wait for under a deadline that only
catches a hang, and the "kept" side uses a lease far longer than the test.

Uses the child program and flows of ``test_recovery.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_recovery import NAMES, Paths, child_argv, counts, ran, saga_input, until

from fluxrun.errors import RunBusyError
from fluxrun.storage._base import Claim, ListQuery, RunRow, Transition
from fluxrun.storage._sqlite_lease import system_boot_clock
from fluxrun.storage.sqlite import BootClock, SQLiteStorage

pytestmark = pytest.mark.skipif(system_boot_clock() is None, reason="no CLOCK_BOOTTIME here")

DAY = 86400.0
#: Far longer than the test, so the "kept" side never depends on the lease keeper's timing.
LONG_LEASE = 600.0
#: The "taken" side waits for this lease to run out on the boot clock (by polling).
SHORT_LEASE = 0.5


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return Paths(db=str(tmp_path / "runs.db"), fx=str(tmp_path / "effects.log"), tmp=tmp_path)


@pytest.fixture
def child(paths: Paths, request: pytest.FixtureRequest) -> Iterator[subprocess.Popen[str]]:
    """A child executing the saga with a lease of ``request.param`` seconds, blocked in step
    b until ``paths.tmp / "release-b"`` exists; released, resumed and reaped at the end."""
    release = paths.tmp / "release-b"
    proc = subprocess.Popen(
        child_argv(
            paths,
            lease=request.param,
            action="execute",
            flow="saga",
            input=saga_input(paths, block={"at": "b", "until": str(release)}),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        release.touch()
        if proc.poll() is None:
            proc.kill()  # also ends a stopped child
        proc.communicate(timeout=60)


def stepped(db: str, seconds: float, boot_id: str | None = None) -> SQLiteStorage:
    """A store of this process whose wall clock is ``seconds`` off the machine's (and, with
    ``boot_id``, whose boot clock claims to be of that boot)."""
    system = system_boot_clock()
    assert system is not None
    boot = system if boot_id is None else BootClock(boot_id, system.read)
    return SQLiteStorage(db, clock=lambda: time.time() + seconds, boot_clock=boot)


async def the_run(store: SQLiteStorage) -> RunRow:
    (row,) = await store.list_runs(ListQuery())
    return row


@pytest.mark.parametrize("child", [LONG_LEASE], indirect=True)
async def test_a_wall_clock_step_gives_no_live_run_away(
    paths: Paths, child: subprocess.Popen[str]
) -> None:
    await until("step b to block the child", ran(paths, "b"), child)
    # Steps past the lease: by the wall clock alone, the first two would end it.
    for step in (LONG_LEASE + 1, DAY, -DAY):
        store = stepped(paths.db, step)
        try:
            row = await the_run(store)
            assert row.owner is not None and row.lease_until is not None
            assert await store.find_recoverable(NAMES, 10) == [], step
            assert await store.claim_due("other", NAMES, 10, 30) == [], step
            with pytest.raises(RunBusyError):
                await store.apply(
                    Transition(row.id, row.version, row.updated_at, claim=Claim("x", 1))
                )
            with pytest.raises(RunBusyError):
                await store.delete(row.id)
        finally:
            await store.close()
    # Control: the same lease is over for a store of another boot.
    elsewhere = stepped(paths.db, 0.0, boot_id="another-boot")
    try:
        assert [r.id for r in await elsewhere.find_recoverable(NAMES, 10)] == [row.id]
    finally:
        await elsewhere.close()
    (paths.tmp / "release-b").touch()
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    assert json.loads(out) == {"statuses": ["completed"]}
    assert counts(paths, row.id) == dict.fromkeys("abcd", 1)


@pytest.mark.parametrize("child", [SHORT_LEASE], indirect=True)
async def test_a_lease_that_ran_out_on_the_boot_clock_is_found_after_a_backward_step(
    paths: Paths, child: subprocess.Popen[str]
) -> None:
    await until("step b to block the child", ran(paths, "b"), child)
    store = stepped(paths.db, -DAY)  # by its wall clock, every lease has a day to go
    try:
        row = await the_run(store)
        assert row.lease_until is not None
        os.kill(child.pid, signal.SIGSTOP)  # alive (not a dead owner), renewing nothing

        async def found() -> bool:
            return [r.id for r in await store.find_recoverable(NAMES, 10)] == [row.id]

        await until("the stopped child's lease to run out on the boot clock", found)
        assert row.lease_until.timestamp() > time.time() - DAY  # by the wall clock: live
    finally:
        await store.close()
        os.kill(child.pid, signal.SIGCONT)
