"""Group commit: the step commits of many runs in flight share one durable commit.

A run in flight waits for the commit of its step before it starts the next one (the
durability contract). When many runs are in flight, their commits queue up behind one
another, one fsync each. A :class:`GroupCommitter` takes the commits that are waiting when
a writer is free and hands them to the store's ``flush`` as one batch: one transaction (or
one statement), one fsync. Each caller gets its own outcome, and resumes only after the
commit that holds its write.

There is no timer: a lone commit starts at once (nobody waits for company), and commits
that arrive while ``writers`` batches are being written wait only for one of them to end,
then go together. A store whose writes do not let the event loop run meanwhile (SQLite's,
made on the loop) passes ``write_alone_at_once=False``: a write then waits for the writer
task, which runs once the steps that are ready in this turn of the loop have all queued
theirs (one hand-over, no timer). The store's ``flush`` keeps each write's own
compare-and-set and fence, so one run's refusal never fails or delays the others of its
batch. Only the commits of the forward path are batched (:func:`groupable`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import operator
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from ._types import KEEP, Transition

__all__ = ["GroupCommitter", "groupable"]

W = TypeVar("W")
R = TypeVar("R")

Flush = Callable[[Sequence[W]], Awaitable[Sequence[R | BaseException]]]


_RUNNING = "running"
_COMPLETED = "completed"
# The fields the two grouped commits set; every other must keep its default.
_SHAPED = frozenset(
    {
        "run_id",
        "expected_version",
        "updated_at",
        "fence",
        "insert_step",
        "current_step",
        "status",
        "error",
        "completed_at",
        "release",
        "requested",
    }
)
_DEFAULTS = tuple(
    (f.name, f.default)
    for f in dataclasses.fields(Transition)
    if f.name not in _SHAPED and f.default is not dataclasses.MISSING
)
# One C-level call reads them all (this runs for every step commit).
_READ_OTHERS = operator.attrgetter(*(name for name, _ in _DEFAULTS))
_OTHERS_DEFAULT = tuple(default for _, default in _DEFAULTS)
assert all(
    f.default is not dataclasses.MISSING for f in dataclasses.fields(Transition)
    if f.name not in _SHAPED
), "a new required field of Transition must be judged here"  # fmt: skip


def groupable(t: Transition) -> bool:
    """Whether ``t`` is one of the two commits of the forward path, the only writes a store
    batches: a step's outcome (the run stays or becomes ``running``), or the last step's
    outcome with the run's completion (``completed``, error cleared, let go, any request
    cleared). Every other write (a claim, a signal taken, a suspension, an operator's
    action) is made alone and at once, as before: what it decides is seen by the next
    caller without a turn of the loop in between."""
    if t.insert_step is None or t.fence is None or isinstance(t.current_step, type(KEEP)):
        return False
    if _READ_OTHERS(t) != _OTHERS_DEFAULT:
        return False
    if t.release:  # the last step with the run's completion
        return (
            t.status == _COMPLETED
            and t.error is None
            and isinstance(t.completed_at, dt.datetime)
            and t.requested is None
        )
    return (
        (t.status is KEEP or t.status == _RUNNING)
        and t.error is KEEP
        and t.completed_at is KEEP
        and t.requested is KEEP
    )


class GroupCommitter(Generic[W, R]):
    """Batches the writes submitted while a flush is under way (see the module).

    ``flush(writes)`` writes a batch and returns one outcome per write, in order: a result,
    or the exception that write's caller must get. An exception ``flush`` raises itself
    goes to every caller of the batch.
    """

    def __init__(
        self,
        flush: Flush[W, R],
        *,
        writers: int = 1,
        max_batch: int = 256,
        write_alone_at_once: bool = True,
    ) -> None:
        self._flush = flush
        self._at_once = write_alone_at_once
        self._writers = writers
        self._max_batch = max_batch
        self._queue: list[tuple[W, asyncio.Future[R]]] = []
        self._busy = 0
        self._tasks: set[asyncio.Task[None]] = set()  # the loop keeps only weak references
        self.batches = 0  # batches written (for tests and benchmarks)
        self.largest = 0  # the most writes one batch held

    async def submit(self, write: W) -> R:
        """Queue ``write`` and wait for the commit that holds it."""
        if self._at_once and self._busy < self._writers and not self._queue:
            # Nobody to wait for: written at once, in the caller's task (no hand-over).
            self._busy += 1
            try:
                self.batches += 1
                self.largest = max(self.largest, 1)
                outcome = (await self._flush([write]))[0]
            finally:
                self._hand_over()
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((write, fut))
        if self._busy < self._writers:
            self._busy += 1
            self._hand_over()
        return await fut

    def _hand_over(self) -> None:
        """Give up this writer's turn: to a writer task of its own for the writes that
        queued meanwhile (a caller that is cancelled must not stop a batch), if any."""
        if not self._queue:
            self._busy -= 1
            return
        task = asyncio.get_running_loop().create_task(self._write())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(self) -> None:
        try:
            while self._queue:
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                self.batches += 1
                self.largest = max(self.largest, len(batch))
                try:
                    outcomes = await self._flush([w for w, _ in batch])
                except BaseException as exc:  # every caller of the batch gets it
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (_, fut), outcome in zip(batch, outcomes, strict=True):
                    if fut.done():
                        continue  # its caller was cancelled; the write stands
                    if isinstance(outcome, BaseException):
                        fut.set_exception(outcome)
                    else:
                        fut.set_result(outcome)
        finally:
            self._busy -= 1
