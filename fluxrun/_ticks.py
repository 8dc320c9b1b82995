"""When a schedule fires: a cron expression in a time zone, or a plain interval.

Cron expressions are read by ``cronsim`` (the ``fluxrun[cron]`` extra), imported only when a
cron schedule is made or fired, so ``import fluxrun`` needs nothing extra. Ticks are computed
in the schedule's time zone (so "every day at 09:00" stays at 09:00 across DST changes) and
handed out as aware UTC datetimes, which is how stores keep them.

An interval's ticks are ``anchor + k * every``: whole microseconds, computed with integers,
so they never drift however many have passed.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ._context import MAX_WAIT_SECONDS
from .errors import InvalidArgumentError

__all__ = ["MAX_COUNTED", "Catchup", "TickRule", "check_timezone", "tick_rule"]

_UTC = dt.UTC
_SECOND = dt.timedelta(seconds=1)
_MICRO = dt.timedelta(microseconds=1)

#: How many missed ticks a catch-up counts one by one; beyond it, the count is "at least".
MAX_COUNTED = 1000

#: Nicknames cron implementations commonly accept, as the 5-field expressions they stand for.
_NICKNAMES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


@dataclass(frozen=True, slots=True)
class Catchup:
    """What firing a due schedule at ``now`` means: the one tick to fire (the latest that
    is not after ``now``), how many earlier ticks since the due one are skipped (at most
    :data:`MAX_COUNTED`; ``more`` when there were more than that), and the next tick."""

    tick: dt.datetime
    skipped: int
    more: bool
    next_at: dt.datetime | None


def check_timezone(name: object) -> ZoneInfo:
    """The time zone called ``name`` (an IANA name such as ``"Europe/Paris"``).

    Raises:
        InvalidArgumentError: not a string, or no such time zone.
    """
    if not isinstance(name, str) or not name.strip():
        raise InvalidArgumentError(f"timezone must be an IANA time zone name, got {name!r}")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise InvalidArgumentError(
            f"unknown time zone {name!r} (expected an IANA name such as 'Europe/Paris')"
        ) from None


def _cronsim() -> Any:
    try:
        import cronsim
    except ImportError:
        raise InvalidArgumentError(
            "cron schedules need the cronsim package: pip install 'fluxrun[cron]' "
            "(intervals, every=..., need nothing extra)"
        ) from None
    return cronsim


class TickRule:
    """The ticks of one schedule: ``cron`` in ``timezone``, or every ``every_us`` microseconds
    from ``anchor`` (the schedule's first tick)."""

    __slots__ = ("_expr", "_zone", "cron", "every_us")

    def __init__(self, cron: str | None, every_us: int | None, zone: ZoneInfo) -> None:
        self.cron = cron
        self.every_us = every_us
        self._zone = zone
        self._expr = None if cron is None else _NICKNAMES.get(cron.strip().lower(), cron)

    def _iter(self, start: dt.datetime, *, reverse: bool = False) -> Any:
        # cronsim walks local wall-clock time in the zone (its DST handling needs the zone),
        # strictly after ``start`` going forward (at or before it, with microseconds, back).
        zone: dt.tzinfo = _UTC if self._zone.key == "UTC" else self._zone
        return _cronsim().CronSim(self._expr, start.astimezone(zone), reverse=reverse)

    def _next_cron(self, after: dt.datetime) -> dt.datetime | None:
        try:
            found: dt.datetime = next(self._iter(after))
        except StopIteration:  # no tick in the next 50 years (cronsim's horizon)
            return None
        return found.astimezone(_UTC)

    def first_after(self, now: dt.datetime) -> dt.datetime | None:
        """The first tick strictly after ``now`` (an interval's: ``now + every``)."""
        if self.every_us is not None:
            return now + self.every_us * _MICRO
        return self._next_cron(now)

    def catch_up(self, due: dt.datetime, now: dt.datetime) -> Catchup:
        """Fire a schedule whose next tick ``due`` is not after ``now``: only the latest tick
        not after ``now`` fires; the ticks from ``due`` up to it are skipped."""
        if self.every_us is not None:
            step = self.every_us * _MICRO
            n = max(0, (now - due) // step)
            tick = due + n * step
            return Catchup(tick, min(n, MAX_COUNTED), n > MAX_COUNTED, tick + step)
        tick, skipped = due, 0
        while True:
            following = self._next_cron(tick)
            if following is None or following > now:
                return Catchup(tick, skipped, False, following)
            if skipped == MAX_COUNTED:
                break
            tick, skipped = following, skipped + 1
        # A long downtime of a frequent schedule: find the latest tick by walking back from
        # now instead of forward over every tick missed.
        latest = self._latest_at_or_before(now)
        if latest is None or latest <= tick:
            latest = tick
        return Catchup(latest, skipped, True, self._next_cron(latest))

    def _latest_at_or_before(self, now: dt.datetime) -> dt.datetime | None:
        try:
            # From just after now (cronsim's reverse walk starts at the start's whole second
            # when it has microseconds), so a tick exactly at now counts.
            found: dt.datetime = next(self._iter(now + _MICRO, reverse=True))
        except StopIteration:
            return None
        return found.astimezone(_UTC)


def tick_rule(cron: object, every: object, timezone: object) -> TickRule:
    """A validated tick rule: exactly one of ``cron`` (5 fields, or 6 with seconds first,
    or a nickname such as ``@daily``) and ``every`` (seconds > 0, or a timedelta).

    Raises:
        InvalidArgumentError: both or neither given, a malformed expression or one that
            never fires, an interval that is not a positive duration, an unknown time zone.
    """
    zone = check_timezone(timezone)
    if (cron is None) == (every is None):
        raise InvalidArgumentError(
            "a schedule needs exactly one of cron (an expression) and every (an interval), "
            f"got cron={cron!r}, every={every!r}"
        )
    if every is not None:
        return TickRule(None, _every_us(every), zone)
    if not isinstance(cron, str) or not cron.strip():
        raise InvalidArgumentError(f"cron must be a non-empty expression string, got {cron!r}")
    rule = TickRule(cron.strip(), None, zone)
    assert rule._expr is not None
    fields = len(rule._expr.split())
    if fields not in (5, 6):
        raise InvalidArgumentError(
            f"invalid cron expression {cron!r}: expected 5 fields (minute hour day month "
            f"weekday) or 6 (seconds first), got {fields}"
        )
    module = _cronsim()
    try:
        first = rule.first_after(dt.datetime.now(_UTC))
    except (module.CronSimError, ValueError, LookupError) as exc:
        raise InvalidArgumentError(f"invalid cron expression {cron!r}: {exc}") from None
    if first is None:
        raise InvalidArgumentError(f"cron expression {cron!r} never fires")
    return rule


def _every_us(every: object) -> int:
    if isinstance(every, dt.timedelta):
        seconds = every.total_seconds()
    elif isinstance(every, int | float) and not isinstance(every, bool):
        seconds = float(every)
    else:
        raise InvalidArgumentError(
            f"every must be a timedelta or a number of seconds, got {type(every).__name__}"
        )
    if not math.isfinite(seconds) or seconds <= 0:
        raise InvalidArgumentError(f"every must be a duration > 0, got {every!r}")
    if seconds > MAX_WAIT_SECONDS:
        raise InvalidArgumentError(f"every must be at most 100 years, got {every!r}")
    us = round(seconds * 1_000_000)
    if us < 1000:
        raise InvalidArgumentError(f"every must be at least 1 millisecond, got {every!r}")
    return us
