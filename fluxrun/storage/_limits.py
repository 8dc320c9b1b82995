"""Range checks every store applies the same way, before a value reaches a database driver.

SQLite binds integers as signed 64-bit values (a larger one makes its driver raise a bare
``OverflowError``) and PostgreSQL's ``INTEGER`` columns are 32-bit. So the stores agree on one
rule: version and fence numbers are 64-bit, step indexes, step numbers and counts are 32-bit,
and anything outside is refused with :class:`~fluxrun.errors.InvalidArgumentError` before any
write. Page sizes and offsets are clamped to 64 bits (no table has that many rows) and lease
durations to :data:`MAX_LEASE_SECONDS` (a longer lease is "forever" in practice, and its expiry
must stay a representable time on every backend).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from dataclasses import replace

from ..errors import InvalidArgumentError
from ._base import KEEP, ListQuery, RunRow, Transition

__all__ = [
    "INT32_MAX",
    "INT64_MAX",
    "MAX_LEASE_SECONDS",
    "check_new_run",
    "check_transition_numbers",
    "lease_expiry",
    "lease_seconds",
    "on_store_clock",
    "page",
    "row_limit",
    "usable_fences",
]

INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1
#: The longest lease a store grants (100 years); longer ones are shortened to it.
MAX_LEASE_SECONDS = 100 * 365 * 86400.0
_MAX_TIME = dt.datetime.max.replace(tzinfo=dt.UTC)


def lease_seconds(value: float) -> float:
    """A lease duration clamped into ``[0, MAX_LEASE_SECONDS]``; NaN or a non-number is refused."""
    # Compare before converting: float() of a huge int overflows, and ints compare exactly.
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise InvalidArgumentError(f"a lease duration must be a number of seconds, got {value!r}")
    if value >= MAX_LEASE_SECONDS:
        return MAX_LEASE_SECONDS
    return float(value) if value > 0 else 0.0


def lease_expiry(now: dt.datetime, seconds: float) -> dt.datetime:
    """``now`` plus a clamped lease, or the latest representable time if that overflows."""
    try:
        return now + dt.timedelta(seconds=lease_seconds(seconds))
    except OverflowError:  # only with an injected clock near year 9999
        return _MAX_TIME


def page(query: ListQuery) -> tuple[int | None, int]:
    """``(limit, offset)`` of a listing, clamped to 64 bits; negative values are refused."""
    limit = None if query.limit is None else row_limit(query.limit, "limit")
    return limit, row_limit(query.offset, "offset")


def row_limit(value: int, what: str) -> int:
    """A row count or offset: an int >= 0, clamped to 64 bits."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgumentError(f"{what} must be an int >= 0, got {value!r}")
    return min(value, INT64_MAX)


def usable_fences(fences: Mapping[str, int]) -> tuple[dict[str, int], set[str]]:
    """Split lease-renewal fences into those a database can hold and the ids that cannot
    match any run (a fence outside 64 bits never equals a stored one: the lease is lost)."""
    usable = {k: v for k, v in fences.items() if -INT64_MAX - 1 <= v <= INT64_MAX}
    return usable, set(fences) - set(usable)


def check_new_run(run: RunRow) -> None:
    """Refuse a run whose numbers no backend can store."""
    _int(run.id, run.version, 64, "version")
    _int(run.id, run.fence, 64, "fence")
    _int(run.id, run.current_step, 32, "current_step")
    _int(run.id, run.attempt, 32, "attempt")
    _int(run.id, run.priority, 32, "priority")


_FAST = INT32_MAX


def check_transition_numbers(t: Transition) -> None:
    """Refuse a transition carrying a number no backend can store (nothing is written)."""
    step = t.insert_step
    # The usual step commit, checked in one expression (this runs for every step on every
    # store); anything else, or anything unusual, takes the precise path below.
    if (
        0 <= t.expected_version < _FAST
        and (t.fence is None or 0 <= t.fence < _FAST)
        and (type(t.current_step) is not int or 0 <= t.current_step < _FAST)
        and t.update_step is None
        and t.delete_steps_from is None
        and not t.keep_steps
        and not t.attempts
        and t.attempt is KEEP
        and t.consume_signal is None
        and t.snapshot is None
        and (
            step is None
            or (
                0 <= step.index < _FAST
                and 0 <= step.retries < _FAST
                and 0 <= step.fence < _FAST
                and (step.duration_ms is None or -1e300 < step.duration_ms < 1e300)
            )
        )
    ):
        return
    _check_all(t)


def _check_all(t: Transition) -> None:
    run_id = t.run_id
    _int(run_id, t.expected_version, 64, "expected_version")
    if t.fence is not None:
        _int(run_id, t.fence, 64, "fence")
    if t.current_step is not KEEP:
        _int(run_id, t.current_step, 32, "current_step")  # type: ignore[arg-type]
    if t.delete_steps_from is not None:
        _int(run_id, t.delete_steps_from, 32, "delete_steps_from")
    if t.snapshot is not None:
        _int(run_id, t.snapshot.at, 32, "snapshot.at")
    for index in t.keep_steps:
        _int(run_id, index, 32, "keep_steps")
    for step in (t.insert_step, t.update_step):
        if step is not None:
            _int(run_id, step.index, 32, "step index")
            _int(run_id, step.retries, 32, "step retries")
            _int(run_id, step.fence, 64, "step fence")
            _duration(run_id, step.duration_ms)
    if t.attempt is not KEEP:
        _int(run_id, t.attempt, 32, "attempt")  # type: ignore[arg-type]
    if t.consume_signal is not None:
        _int(run_id, t.consume_signal.seq, 32, "signal seq")
        _int(run_id, t.consume_signal.step, 32, "consuming step")
    for attempt in t.attempts:
        _int(run_id, attempt.index, 32, "attempt step index")
        _int(run_id, attempt.attempt, 32, "attempt number")
        _duration(run_id, attempt.duration_ms)


def _int(run_id: str, value: int, bits: int, what: str) -> None:
    bound = INT64_MAX if bits == 64 else INT32_MAX
    if not -bound - 1 <= value <= bound:
        raise InvalidArgumentError(
            f"run {run_id!r}: {what} {value} is outside the {bits}-bit range a store can hold",
            workflow_id=run_id,
        )


def _duration(run_id: str, value: float | None) -> None:
    # SQLite would store NaN as NULL, so a non-finite duration could not read back the same.
    if isinstance(value, int):
        _int(run_id, value, 64, "duration_ms")
    elif value is not None and not math.isfinite(value):
        raise InvalidArgumentError(
            f"run {run_id!r}: a duration must be a finite number of milliseconds, got {value!r}",
            workflow_id=run_id,
        )


def on_store_clock(t: Transition, now: dt.datetime) -> Transition:
    """``t`` with a delay in ``run_after`` (see ``run_after_from``) made an instant by the
    store's clock reading ``now`` (for the stores that read their clock in Python)."""
    if t.run_after_from is None or not isinstance(t.run_after, dt.datetime):
        return t
    return replace(t, run_after=now + (t.run_after - t.run_after_from), run_after_from=None)
