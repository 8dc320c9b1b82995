"""Concurrency limits in the store: what every backend shares.

A workflow declared with ``.concurrency(limit, key=...)`` has at most ``limit`` runs per key
*holding a slot* at once, across every engine and worker of the database. The engine passes
the limits of the workflows it claims for to :meth:`Store.claim_due`; the runs carry their
group in ``concurrency_key`` (``""`` when the limit has no key).

A run holds a slot when it runs or rolls back (``running``, ``rolling_back``: also after
its owner died, until another engine takes it over, and while it backs off between
attempts in memory), or when an engine owns it and is about to continue it (``pending``,
``suspended`` or ``paused`` with an owner). A run waiting unowned (on a signal, a sleep, a
stored backoff, a pause) holds none.

The claim takes a run that holds no slot only while fewer than ``limit`` runs of its
workflow and key hold one, and counts and claims under one lock per group (SQLite's write
lock; a PostgreSQL transaction-scoped advisory lock, tried rather than waited for, like
``SKIP LOCKED``), so two claimers never fill the same free slot. A run that holds a slot
already (a dead owner's) is claimed as any run, or it could never finish. Runs with a
pending cancel or pause are taken at once too: the operator's request is not held back by
the limit (a cancelled run's compensations may so run beside ``limit`` others). A run
started by name whose key is not known yet (``concurrency_key`` NULL) is claimed without
the limit; the engine that claims it only computes its key and puts it back.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from ..errors import InvalidArgumentError
from ._limits import INT32_MAX

if TYPE_CHECKING:
    from ._base import RunRow

__all__ = [
    "HOLDS_LIMIT_SQL",
    "MAX_KEY_LENGTH",
    "NEEDS_SLOT_SQL",
    "SlotGate",
    "check_limits",
    "holds_limit_slot",
]

MAX_KEY_LENGTH = 512
"""The longest ``concurrency_key`` (characters) a key function may produce."""

HOLDS_LIMIT_SQL = (
    "(status IN ('running', 'rolling_back') "
    "OR (owner IS NOT NULL AND status IN ('pending', 'suspended', 'paused')))"
)
"""A run that holds a slot of its workflow's concurrency limit (``holds_limit_slot``)."""

NEEDS_SLOT_SQL = (
    "(concurrency_key IS NOT NULL AND requested IS NULL AND NOT " + HOLDS_LIMIT_SQL + ")"
)
"""A run of a limited workflow that the claim takes only into a free slot."""


def holds_limit_slot(status: str, owner: str | None) -> bool:
    """Whether a run holds a slot of its workflow's concurrency limit (see the module)."""
    return status in ("running", "rolling_back") or (
        owner is not None and status in ("pending", "suspended", "paused")
    )


def check_limits(limits: Mapping[str, int] | None) -> dict[str, int]:
    """The limits as a plain dict, each a positive 32-bit integer.

    Raises:
        InvalidArgumentError: a limit is not a positive integer, or a name is not text.
    """
    if not limits:
        return {}
    checked: dict[str, int] = {}
    for name, limit in limits.items():
        if not isinstance(name, str):
            raise InvalidArgumentError(
                f"concurrency limits are keyed by workflow name, got {name!r}"
            )
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= INT32_MAX:
            raise InvalidArgumentError(
                f"the concurrency limit of {name!r} must be a positive integer, got {limit!r}"
            )
        checked[name] = limit
    return checked


class SlotGate:
    """The slots held per workflow and key, for a claim that admits runs one by one (the
    in-memory store's claim, under its lock)."""

    def __init__(self, limits: Mapping[str, int], runs: Iterable[RunRow]) -> None:
        self._limits = limits
        self._held: Counter[tuple[str, str]] = Counter(
            (r.name, r.concurrency_key)
            for r in runs
            if r.name in limits
            and r.concurrency_key is not None
            and holds_limit_slot(r.status, r.owner)
        )

    def admit(self, r: RunRow) -> bool:
        """Whether the claim may take ``r`` now; if it needs a slot, it takes one."""
        limit = self._limits.get(r.name)
        if (
            limit is None
            or r.concurrency_key is None
            or r.requested is not None
            or holds_limit_slot(r.status, r.owner)
        ):
            return True
        group = (r.name, r.concurrency_key)
        if self._held[group] >= limit:
            return False
        self._held[group] += 1
        return True
