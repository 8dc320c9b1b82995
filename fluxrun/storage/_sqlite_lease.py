"""How :class:`~fluxrun.storage.sqlite.SQLiteStorage` writes and judges leases.

Every process sharing one SQLite file runs on one host, so where the platform allows it
leases are judged by a clock that steps of the wall clock (an NTP correction, a resumed VM)
do not move: Linux's ``CLOCK_BOOTTIME``, one clock for every process of a boot that also
counts the time the machine was suspended (a lease should end during a suspend). Its
readings mean something only within one boot, so each lease records the boot id it was
written in; a lease of another boot is over. A lease is live iff it was written in this
boot and its boot-clock deadline is in the future.

``lease_until`` (wall clock) is still written with every lease: it is what ``RunRow`` shows,
and what judges the leases written without a boot clock (before schema 4, by a fluxrun that
predates it, or by a process with no boot clock). The boot columns count only while
``lease_boot_fence`` equals the run's fence: an older fluxrun that claims the run moves the
fence without touching them, and its lease is then judged by ``lease_until``.

Where ``CLOCK_BOOTTIME`` or the boot id is missing (not Linux) the store judges leases by
its wall clock, as before schema 4. Timers (``run_after``) are wall-clock instants by
meaning and are always compared with the wall clock. (Processes in different Linux time
namespaces, such as ones restored by CRIU, see offset boot clocks; sharing a file between
them is not supported.)
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._owner import boot_id, is_dead_local_owner
from ._limits import lease_seconds

__all__ = [
    "CLAIM_LEASE",
    "MAX_MICROS",
    "RELEASE_LEASE",
    "RENEW_LEASE",
    "BootClock",
    "LeaseClock",
    "LeaseNow",
    "expire_dead_owners",
    "system_boot_clock",
]

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
#: Microseconds of the latest time a datetime can hold: a lease expiry never goes past it.
MAX_MICROS = (dt.datetime.max.replace(tzinfo=dt.UTC) - _EPOCH) // dt.timedelta(microseconds=1)
_MAX_INT64 = 2**63 - 1

#: SET clauses that write a lease: ``lease_until, lease_boot, lease_boot_until`` are bound
#: (see :meth:`LeaseClock.lease`); an UPDATE's expressions read the row before the update,
#: so with ``fence = fence + 1`` in the same SET a claim records the new fence.
RENEW_LEASE = "lease_until = ?, lease_boot = ?, lease_boot_until = ?, lease_boot_fence = fence"
CLAIM_LEASE = "lease_until = ?, lease_boot = ?, lease_boot_until = ?, lease_boot_fence = fence + 1"
RELEASE_LEASE = (
    "lease_until = NULL, lease_boot = NULL, lease_boot_until = NULL, lease_boot_fence = NULL"
)

# True when no live lease holds the row. Parameters: (now) by the wall clock; (boot id, boot
# clock now, wall clock now) by the boot clock.
_WALL_EXPIRED = "(owner IS NULL OR lease_until IS NULL OR lease_until <= ?)"
_BOOT_EXPIRED = (
    "(owner IS NULL OR lease_until IS NULL OR "
    "CASE WHEN lease_boot_until IS NOT NULL AND lease_boot_fence = fence "
    "THEN lease_boot IS NOT ? OR lease_boot_until <= ? "
    "ELSE lease_until <= ? END)"
)


@dataclass(frozen=True, slots=True)
class BootClock:
    """A clock shared by every process of one boot that wall-clock steps do not move.

    Attributes:
        boot_id: Names the boot whose clock ``read`` is; a lease written under another boot
            id is over.
        read: Seconds on that clock (any origin, the same for every process of the boot).
    """

    boot_id: str
    read: Callable[[], float]


def system_boot_clock() -> BootClock | None:
    """``CLOCK_BOOTTIME`` with the boot id, or None where either is missing (not Linux)."""
    clock_id: int | None = getattr(time, "CLOCK_BOOTTIME", None)
    boot = boot_id()
    if clock_id is None or boot is None:
        return None
    try:
        time.clock_gettime(clock_id)
    except OSError:
        return None  # declared but not served by this kernel

    def read() -> float:
        return time.clock_gettime(clock_id)

    return BootClock(boot, read)


@dataclass(frozen=True, slots=True)
class LeaseNow:
    """One reading of a store's clocks: wall clock and (if any) boot clock, in microseconds."""

    wall: int
    boot: str | None
    boot_us: int | None


class LeaseClock:
    """The clocks of one SQLite store: ``clock`` (wall, seconds since the epoch) for
    timestamps and timers, ``boot`` for leases (None: leases by the wall clock too)."""

    __slots__ = ("_boot", "_clock")

    def __init__(self, clock: Callable[[], float], boot: BootClock | None) -> None:
        self._clock = clock
        self._boot = boot

    def wall_us(self) -> int:
        """The wall clock in microseconds since the epoch."""
        return int(self._clock() * 1_000_000)

    def now(self) -> LeaseNow:
        """Read both clocks (the boot clock only where leases are judged by it)."""
        if self._boot is None:
            return LeaseNow(self.wall_us(), None, None)
        return LeaseNow(self.wall_us(), self._boot.boot_id, int(self._boot.read() * 1_000_000))

    def expired(self, now: LeaseNow) -> tuple[str, tuple[Any, ...]]:
        """SQL that is true for a run no live lease holds at ``now``, and its parameters."""
        if now.boot is None:
            return _WALL_EXPIRED, (now.wall,)
        return _BOOT_EXPIRED, (now.boot, now.boot_us, now.wall)

    @staticmethod
    def lease(now: LeaseNow, seconds: float) -> tuple[int, str | None, int | None]:
        """``(lease_until, lease_boot, lease_boot_until)`` of a lease of ``seconds`` from
        ``now``; ``lease_until`` is clamped to a datetime, the boot deadline to 64 bits."""
        length = int(lease_seconds(seconds) * 1_000_000)
        until = min(now.wall + length, MAX_MICROS)
        if now.boot_us is None:
            return until, None, None
        return until, now.boot, min(now.boot_us + length, _MAX_INT64)


def expire_dead_owners(conn: sqlite3.Connection, clock: LeaseClock) -> None:
    """End now the leases of owners that were processes of this machine and are gone.

    Every process sharing the file runs on this host, so a killed owner is recognised by its
    process (see :mod:`fluxrun._owner`) and its runs continue at once rather than after
    their lease; owners it cannot judge keep their lease.
    """
    expired, params = clock.expired(clock.now())
    owners = conn.execute(
        "SELECT DISTINCT owner FROM flux_runs WHERE lease_until IS NOT NULL AND NOT " + expired,
        params,
    ).fetchall()
    dead = [o for (o,) in owners if is_dead_local_owner(o)]
    if not dead:
        return
    conn.execute("BEGIN IMMEDIATE")
    now = clock.now()  # read again: the write lock may have been waited for
    expired, params = clock.expired(now)
    conn.execute(
        "UPDATE flux_runs SET "
        + RENEW_LEASE
        + " WHERE NOT "
        + expired
        + " AND owner IN ("
        + ",".join("?" * len(dead))
        + ")",
        (*clock.lease(now, 0), *params, *dead),
    )
    conn.execute("COMMIT")
