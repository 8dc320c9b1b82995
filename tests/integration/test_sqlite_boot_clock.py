"""SQLiteStorage judges leases by the boot clock (``fluxrun/storage/_sqlite_lease.py``).

Two stores on one file stand for two processes of one host: they read the same fake clocks,
a wall clock and a boot clock, which the tests step. A step of the wall clock, forwards or
back, neither gives a live lease away nor keeps one whose boot-clock deadline passed; a lease
of another boot is over; timers stay on the wall clock; a store without a boot clock judges
by the wall clock as before schema 4. No test depends on real time passing.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fluxrun._owner import new_owner_id
from fluxrun.errors import InvalidArgumentError, RunBusyError
from fluxrun.storage import _sqlite_lease
from fluxrun.storage._base import Claim, RunRow, StepRow, Store, Transition
from fluxrun.storage._sqlite_lease import system_boot_clock
from fluxrun.storage.sqlite import BootClock, SQLiteStorage, to_micros

LEASE = 30.0
WALL0 = 1_900_000_000.0  # seconds since the epoch (2030)
BOOT0 = 1_000.0  # seconds on the boot clock
T = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)  # updated_at of the transitions (caller's clock)
#: One run per way of taking a run over, each a workflow of its own name.
NAMES = ("claim", "apply", "delete")
DAY = 86400.0


class Host:
    """The fake clocks of one machine, read by every store the test opens on it."""

    def __init__(self) -> None:
        self.wall = WALL0
        self.boot = BOOT0
        self.reads = 0

    def read_wall(self) -> float:
        self.reads += 1
        return self.wall

    def read_boot(self) -> float:
        self.reads += 1
        return self.boot

    def store(self, path: Path, boot_id: str = "boot-1") -> SQLiteStorage:
        """A store of a process of this host (``boot_id``: which boot it runs in)."""
        return SQLiteStorage(
            path, clock=self.read_wall, boot_clock=BootClock(boot_id, self.read_boot)
        )


@pytest.fixture
def host() -> Host:
    return Host()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "runs.db"


@pytest.fixture
async def mine(host: Host, db: Path) -> Any:
    """The store of the process that owns the runs."""
    store = host.store(db)
    await store.init()
    yield store
    await store.close()


@pytest.fixture
async def other(host: Host, db: Path) -> Any:
    """The store of another process on the same host and boot."""
    store = host.store(db)
    await store.init()
    yield store
    await store.close()


def run(run_id: str, *, status: str = "running", **fields: Any) -> RunRow:
    return RunRow(
        id=run_id,
        name=run_id,
        status=status,
        input="{}",
        step_names=("a", "b"),
        current_step=0,
        created_at=T,
        updated_at=T,
        version=1,
        fence=1,
        **fields,
    )


async def lease_all(store: Store, owner: str = "worker-a") -> None:
    for name in NAMES:
        await store.create(run(name), lease_owner=owner, lease_seconds=LEASE)


async def assert_kept(other: Store) -> None:
    """No way of taking a run over works: every lease of ``NAMES`` is live for ``other``."""
    assert await other.find_recoverable(NAMES, 10) == []
    assert await other.claim_due("worker-b", NAMES, 10, LEASE) == []
    with pytest.raises(RunBusyError):
        await other.apply(Transition("apply", 1, T, claim=Claim("worker-b", LEASE)))
    with pytest.raises(RunBusyError):
        await other.apply(Transition("apply", 1, T, status="cancelled"))  # unowned write
    with pytest.raises(RunBusyError):
        await other.delete("delete")


async def assert_taken(other: Store) -> None:
    """Every way of taking a run over works: no lease of ``NAMES`` is live for ``other``."""
    assert sorted(r.id for r in await other.find_recoverable(NAMES, 10)) == sorted(NAMES)
    applied = await other.apply(Transition("apply", 1, T, claim=Claim("worker-b", LEASE)))
    assert (applied.version, applied.fence) == (2, 2)
    assert await other.delete("delete") is True
    claimed = await other.claim_due("worker-b", ["claim"], 10, LEASE)
    assert [(r.id, r.owner, r.fence) for r in claimed] == [("claim", "worker-b", 2)]


def lease_columns(path: Path, run_id: str) -> tuple[Any, ...]:
    with sqlite3.connect(path) as conn:
        row = conn.execute(
            "SELECT owner, fence, lease_until, lease_boot, lease_boot_until, lease_boot_fence "
            "FROM flux_runs WHERE id = ?",
            (run_id,),
        ).fetchone()
    conn.close()
    return tuple(row)


def us(seconds: float) -> int:
    return int(seconds * 1_000_000)


# -- wall-clock steps ---------------------------------------------------------------------------


@pytest.mark.parametrize("step", [LEASE, LEASE + 1, DAY, -DAY], ids=["+30s", "+31s", "+1d", "-1d"])
async def test_a_wall_clock_step_neither_gives_a_live_lease_away_nor_keeps_a_dead_one(
    host: Host, mine: SQLiteStorage, other: SQLiteStorage, step: float
) -> None:
    await lease_all(mine)
    host.wall += step
    await assert_kept(other)
    host.boot += LEASE - 1
    await assert_kept(other)
    host.boot += 1  # the boot-clock deadline is now: the lease is over, whatever the wall says
    await assert_taken(other)


async def test_the_owner_keeps_writing_across_a_wall_clock_step(
    host: Host, mine: SQLiteStorage, other: SQLiteStorage
) -> None:
    await lease_all(mine)
    host.wall += DAY
    assert await other.claim_due("worker-b", NAMES, 10, LEASE) == []
    step = StepRow(0, "a", "completed", started_at=T, completed_at=T, fence=1)
    applied = await mine.apply(Transition("claim", 1, T, fence=1, insert_step=step))
    assert (applied.version, applied.fence) == (2, 1)
    renewed = mine.renew_leases("worker-a", {"claim": 1, "apply": 1}, LEASE)
    assert (renewed.lost, renewed.requested) == (set(), {})


async def test_a_renewal_moves_the_boot_clock_deadline(
    host: Host, mine: SQLiteStorage, other: SQLiteStorage
) -> None:
    await lease_all(mine)
    host.boot += 20
    renewed = mine.renew_leases("worker-a", dict.fromkeys(NAMES, 1), LEASE)
    assert renewed.lost == set()
    host.wall += DAY
    host.boot += 20  # 40 s after the claim, 20 s after the renewal
    await assert_kept(other)
    host.boot += 10
    await assert_taken(other)


# -- other boots, other writers -------------------------------------------------------------------


async def test_a_lease_of_another_boot_is_over(host: Host, db: Path, mine: SQLiteStorage) -> None:
    await lease_all(mine)
    # The machine rebooted: a new boot id, and its boot clock starts again near zero.
    host.boot = 5.0
    after_reboot = host.store(db, boot_id="boot-2")
    try:
        await after_reboot.init()
        await assert_taken(after_reboot)
    finally:
        await after_reboot.close()


async def test_a_lease_of_another_boot_is_over_even_if_its_clock_reads_less(
    host: Host, db: Path, mine: SQLiteStorage
) -> None:
    await lease_all(mine)
    after_reboot = host.store(db, boot_id="boot-2")  # same reading, far below the deadline
    try:
        await assert_taken(after_reboot)
    finally:
        await after_reboot.close()


async def test_a_claim_by_an_older_fluxrun_is_judged_by_lease_until(
    host: Host, db: Path, mine: SQLiteStorage, other: SQLiteStorage
) -> None:
    """A fluxrun before schema 4 (still running while a newer one migrated the file) claims
    with a new fence and ``lease_until`` only; the boot columns it leaves are stale."""
    await lease_all(mine)
    host.boot += LEASE  # mine's lease is over by the boot clock
    with sqlite3.connect(db) as conn:
        conn.executemany(
            "UPDATE flux_runs SET owner = 'old-worker', lease_until = ?, fence = fence + 1, "
            "claims = claims + 1, version = version + 1 WHERE id = ?",
            [(us(host.wall + LEASE), name) for name in NAMES],
        )
    conn.close()
    assert await other.find_recoverable(NAMES, 10) == []
    assert await other.claim_due("worker-b", NAMES, 10, LEASE) == []
    with pytest.raises(RunBusyError):
        await other.delete("delete")
    host.wall += LEASE
    assert sorted(r.id for r in await other.find_recoverable(NAMES, 10)) == sorted(NAMES)


async def test_the_lease_columns_follow_claim_renewal_and_release(
    host: Host, db: Path, mine: SQLiteStorage
) -> None:
    await mine.create(run("r1"), lease_owner="worker-a", lease_seconds=LEASE)
    assert lease_columns(db, "r1") == (
        "worker-a",
        1,
        us(WALL0 + LEASE),
        "boot-1",
        us(BOOT0 + LEASE),
        1,
    )
    host.wall += 5
    host.boot += 7
    mine.renew_leases("worker-a", {"r1": 1}, LEASE)
    assert lease_columns(db, "r1")[2:] == (
        us(WALL0 + 5 + LEASE),
        "boot-1",
        us(BOOT0 + 7 + LEASE),
        1,
    )
    await mine.apply(Transition("r1", 1, T, fence=1, release=True))
    assert lease_columns(db, "r1") == (None, 1, None, None, None, None)
    await mine.apply(Transition("r1", 2, T, claim=Claim("worker-c", 60)))
    assert lease_columns(db, "r1") == (
        "worker-c",
        2,
        us(WALL0 + 5 + 60),
        "boot-1",
        us(BOOT0 + 7 + 60),
        2,
    )
    # A store without a boot clock writes none (and clears the last one's).
    wall_only = SQLiteStorage(db, clock=host.read_wall, boot_clock=None)
    try:
        await wall_only.apply(Transition("r1", 3, T, fence=2, renew_lease=LEASE))
        assert lease_columns(db, "r1")[2:] == (us(WALL0 + 5 + LEASE), None, None, 2)
    finally:
        await wall_only.close()


async def test_a_plain_step_commit_reads_no_clock_and_leaves_the_lease_alone(
    host: Host, db: Path, mine: SQLiteStorage
) -> None:
    await mine.create(run("r1"), lease_owner="worker-a", lease_seconds=LEASE)
    before = lease_columns(db, "r1")
    host.reads = 0
    step = StepRow(0, "a", "completed", started_at=T, completed_at=T, fence=1)
    await mine.apply(Transition("r1", 1, T, fence=1, insert_step=step, current_step=1))
    assert host.reads == 0
    assert lease_columns(db, "r1") == before


# -- timers, dead owners -------------------------------------------------------------------------


async def test_timers_stay_on_the_wall_clock(host: Host, mine: SQLiteStorage) -> None:
    due_at = dt.datetime.fromtimestamp(WALL0 + 60, dt.UTC)
    await mine.create(
        run("claim", status="suspended", run_after=due_at, wait_kind="sleep"),
        lease_owner=None,
        lease_seconds=LEASE,
    )
    assert await mine.next_due(["claim"]) == due_at
    host.boot += DAY  # the boot clock says nothing about a timer
    assert await mine.claim_due("worker-b", ["claim"], 10, LEASE) == []
    host.wall += 60
    claimed = await mine.claim_due("worker-b", ["claim"], 10, LEASE)
    assert [r.id for r in claimed] == ["claim"]


def _dead_owner() -> str:
    code = "from fluxrun._owner import new_owner_id; print(new_owner_id())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.strip()


async def test_the_leases_of_a_dead_owner_end_at_once(
    host: Host, mine: SQLiteStorage, other: SQLiteStorage
) -> None:
    dead, alive = _dead_owner(), new_owner_id()
    await mine.create(run("claim"), lease_owner=dead, lease_seconds=LEASE)
    await mine.create(run("apply"), lease_owner=alive, lease_seconds=LEASE)
    claimed = await other.claim_due("worker-b", NAMES, 10, LEASE)
    assert [(r.id, r.owner) for r in claimed] == [("claim", "worker-b")]
    assert await other.find_recoverable(NAMES, 10) == []  # the live owner keeps its run


# -- no boot clock ------------------------------------------------------------------------------


async def test_without_a_boot_clock_leases_follow_the_wall_clock(host: Host, db: Path) -> None:
    """The fallback (no CLOCK_BOOTTIME or boot id): a wall-clock step gives leases away."""
    store = SQLiteStorage(db, clock=host.read_wall, boot_clock=None)
    try:
        await store.init()
        await lease_all(store)
        host.boot += DAY
        await assert_kept(store)
        host.wall += LEASE
        await assert_taken(store)
    finally:
        await store.close()


async def test_a_boot_clock_store_judges_wall_clock_leases_by_lease_until(
    host: Host, db: Path, other: SQLiteStorage
) -> None:
    wall_only = SQLiteStorage(db, clock=host.read_wall, boot_clock=None)
    try:
        await lease_all(wall_only)
        host.boot += DAY
        await assert_kept(other)
        host.wall += LEASE
        await assert_taken(other)
    finally:
        await wall_only.close()


@pytest.fixture
def no_boot_id(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(_sqlite_lease, "boot_id", lambda: None)
    yield


async def test_the_system_boot_clock_needs_a_boot_id(
    no_boot_id: None, host: Host, db: Path
) -> None:
    assert system_boot_clock() is None
    store = SQLiteStorage(db, clock=host.read_wall)  # "system": falls back to the wall clock
    try:
        await store.init()
        await lease_all(store)
        host.wall += LEASE
        await assert_taken(store)
    finally:
        await store.close()


def test_the_system_boot_clock_needs_clock_boottime(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(time, "CLOCK_BOOTTIME", raising=False)
    assert system_boot_clock() is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="CLOCK_BOOTTIME is Linux's")
def test_the_system_boot_clock_is_clock_boottime_of_this_boot() -> None:
    clock = system_boot_clock()
    assert clock is not None
    with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
        assert clock.boot_id == fh.read().strip()
    before = time.clock_gettime(time.CLOCK_BOOTTIME)
    reading = clock.read()
    after = time.clock_gettime(time.CLOCK_BOOTTIME)
    assert before <= reading <= after


@pytest.mark.parametrize("bad", ["wall", 5, lambda: 1.0])
def test_a_bad_boot_clock_is_refused(db: Path, bad: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="boot_clock"):
        SQLiteStorage(db, boot_clock=bad)


async def test_a_huge_lease_is_clamped(host: Host, db: Path, mine: SQLiteStorage) -> None:
    host.boot = 9e15  # a boot clock far beyond any real one
    await mine.create(run("r1"), lease_owner="worker-a", lease_seconds=1e300)
    columns = lease_columns(db, "r1")
    assert columns[4] == 2**63 - 1
    assert columns[2] is not None and columns[2] > to_micros(T)  # type: ignore[operator]
