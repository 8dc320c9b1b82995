"""Who owns a run: the owner id an engine writes into its leases, and recognising, on the same
host, an owner process that is gone.

An owner id is ``"<host>:<pid>:<random>"``. On Linux it ends with ``"#<boot id>/<pid
namespace>/<process start time>"``: enough to tell for certain that the owner process has
died (no such pid, or the pid now belongs to a later process) when the reader runs on the
same boot of the same machine, in the same pid namespace. Anything else (another host,
another container, an id without the suffix) is never judged dead here: its lease decides.
SQLite uses this so that the runs of a killed process continue at once instead of after
their lease; every process sharing one SQLite file is on one host.
"""

from __future__ import annotations

import functools
import os
import uuid

__all__ = ["boot_id", "is_dead_local_owner", "new_owner_id"]


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as fh:
            return fh.read().strip()
    except (OSError, ValueError):
        return None


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat)."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


@functools.cache
def boot_id() -> str | None:
    """The id of the machine's current boot (Linux), or None where it cannot be known.

    Read once per process: a process never outlives the boot it started in.
    """
    return _read("/proc/sys/kernel/random/boot_id") or None


@functools.cache
def _machine() -> str | None:
    """``"<boot id>/<pid namespace>"``, or None where it cannot be known (not Linux)."""
    boot = boot_id()
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    if not boot:
        return None
    return f"{boot}/{namespace.removeprefix('pid:').strip('[]')}"


def new_owner_id() -> str:
    """A new owner id for an engine of this process."""
    base = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
    machine = _machine()
    started = _start_time(os.getpid())
    return base if machine is None or started is None else f"{base}#{machine}/{started}"


def is_dead_local_owner(owner: str) -> bool:
    """Whether ``owner`` is certainly a process of this machine that no longer runs."""
    base, sep, identity = owner.rpartition("#")
    machine = _machine()
    if not sep or machine is None:
        return False
    recorded_machine, _, started = identity.rpartition("/")
    if recorded_machine != machine:
        return False  # another boot, host or container: only the lease can tell
    parts = base.split(":")
    if len(parts) < 3 or not parts[-2].isdigit():
        return False
    now_started = _start_time(int(parts[-2]))
    return now_started is None or now_started != started
