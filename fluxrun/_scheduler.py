"""The one scheduling loop of an engine: it claims due runs and drives them.

A run is *due* when nobody drives it and it can move: a pending run nobody owns, a timer
that came (a sleep, a stored retry backoff, a wait's timeout, a delayed start), a signal
waiting in the inbox of a run that waits for it, an owner whose lease expired (a crash),
or a cancel or pause asked of it. The store decides that (``claim_due``, by its own clock)
and hands each claimed run to exactly one claimer; the loop keeps at most
``max_concurrent_runs`` runs in flight (runs started here count too).

Each pass first fires the stored schedules of the registered workflows that are due
(:func:`fluxrun._schedules.fire_due`: one store transaction starts each tick's run and moves
the schedule past it), when the earliest schedule's tick has come or a poll interval has
passed since it last looked (another process may have stored a schedule).

Between passes the loop sleeps until the earliest timer (``next_due``) or schedule tick, a
local wake-up (a run started, signalled or released in this process, a slot freed, a
schedule stored), or the poll interval, whichever comes first; the poll is the net that
catches other processes' work.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import os
import socket
import time
from typing import Any

from ._records import FluxResult
from ._runtime import Runtime
from ._schedules import FIRE_LIMIT, fire_due
from .storage._workers import WorkerBeat

__all__ = ["Scheduler"]

_MAX_CLAIMS_PER_RECOVER = 50

_WATCH = 0.1
"""How often the loop asks a store that can tell (SQLite) whether another process committed:
a signal, a start or a release from another process is then seen within this, not within
the poll interval."""

_MIN_WAIT = 0.005
"""The shortest sleep between passes, so a timer the store does not yet see as due (its clock
is a little behind ours) costs a few polls, not a spin."""


class Scheduler:
    """Claims due runs of the registered workflows and drives them, up to a limit."""

    def __init__(self, runtime: Runtime, *, max_concurrent: int) -> None:
        self._rt = runtime
        self._max = max_concurrent
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        # Runs this loop claimed and drives now -> their task (recover() waits for them).
        self.inflight: dict[str, asyncio.Task[FluxResult | None]] = {}
        # Whether the loop waits for a slot to free up (then a finished drive wakes it).
        self._starved = False
        # Whether the last claim took fewer runs than it could with limits in play: a run
        # due now may be waiting for a slot of its concurrency limit.
        self._held_back = False
        # Whether the loop sleeps between passes now (tests and observers read it).
        self.idle = False
        # The store's count of other processes' commits when last seen (None: it has none).
        self._seen: int | None = None
        # Held from a claim until its runs are in ``inflight``: recover() never misses the
        # runs of a pass of the loop that was claiming when it looked.
        self._claiming = asyncio.Lock()
        # Schedules: the earliest next tick seen (None: none), when the loop last looked
        # (loop time; None: look at the next pass), and the ids whose failure was logged.
        self._tick_at: dt.datetime | None = None
        self._ticks_seen: float | None = None
        self._tick_warned: set[str] = set()
        # When this engine next records its heartbeat (time.monotonic()).
        self._next_beat = 0.0
        runtime.on_idle = self.wake
        runtime.on_drive_end = self._drive_ended

    def set_max(self, limit: int) -> None:
        """Drive at most ``limit`` runs at once from now on (a worker's ``--concurrency``)."""
        self._max = limit

    @property
    def running(self) -> bool:
        """Whether the loop runs."""
        return self._task is not None and not self._task.done()

    def free(self) -> int:
        """Slots free for more runs (a run this loop claimed is in ``inflight`` and, while
        it is driven, in ``active`` too: counted once)."""
        return self._max - len(self._rt.active.keys() | self.inflight.keys())

    def start(self) -> None:
        """Start the loop on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="fluxrun-scheduler"
            )

    def wake(self) -> None:
        """Look for due runs now (something became due or a slot freed up)."""
        self._wake.set()

    def schedules_changed(self) -> None:
        """A schedule was stored here: look at the schedules at the next pass, now."""
        self._ticks_seen = None
        self._wake.set()

    async def fire_schedules(self) -> None:
        """Fire the due schedules, if one may be due (see the module); never raises."""
        rt = self._rt
        names = rt.registry.names
        now = rt.settings.clock.now()
        looked = asyncio.get_running_loop().time()
        if not names or (
            self._ticks_seen is not None
            and looked - self._ticks_seen < rt.poll_interval
            and (self._tick_at is None or self._tick_at > now)
        ):
            return
        self._ticks_seen = looked
        try:
            done, stuck = await fire_due(rt, names, self._tick_warned)
        except Exception as exc:
            # Runs must still be claimed when schedules cannot fire; look again at the poll.
            self._tick_at = None
            rt.emitter.log.error("firing schedules failed; retrying", exc)
            return
        # A schedule that cannot fire here stays due: look again at the poll, not at once.
        self._tick_at = None if stuck else done.next_at
        if len(done.fired) >= FIRE_LIMIT:
            self._ticks_seen = None  # more may be due: a pass fires at most FIRE_LIMIT

    def _drive_ended(self, timer: bool) -> None:
        # A plain run ending wakes nobody (no claim pass per run on the fast path); a run
        # that now waits on a timer may be due before the loop meant to look again.
        if timer or self._starved:
            self._wake.set()

    async def stop(self) -> None:
        """Stop claiming (runs in flight go on; close() waits for them)."""
        self._stopping = True
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            try:
                await task
            except Exception as exc:  # the loop logs its errors; nothing more to do here
                self._rt.emitter.log.debug(f"scheduler stopped with {exc!r}")

    async def drain(self, timeout: float) -> None:
        """Wait (at most ``timeout``) for the runs the loop claimed, including those it
        claimed but had not started driving: at close they stop and are released."""
        tasks = list(self.inflight.values())
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    async def _run(self) -> None:
        try:
            self._seen = await self._rt.store.external_changes()
        except Exception:
            self._seen = None
        try:
            # Wake-ups from other processes (PostgreSQL's LISTEN); polling is the net.
            unlisten = await self._rt.store.listen(self.wake)
        except Exception as exc:
            self._rt.emitter.log.warning(f"no wake-ups from the store ({exc!r}); polling only")
            unlisten = None
        await self._beat()
        try:
            await self._loop()
        finally:
            if unlisten is not None:
                await unlisten()
            try:
                await self._rt.store.worker_stopped(self._rt.settings.owner)
            except Exception as exc:  # observation only: never fail a close on it
                self._rt.emitter.log.debug(f"could not record the worker's stop: {exc!r}")

    async def _beat(self) -> None:
        """Record this engine in the store's worker table (at most every third of a lease)."""
        rt = self._rt
        now = time.monotonic()
        if now < self._next_beat:
            return
        self._next_beat = now + rt.settings.lease_seconds / 3
        beat = WorkerBeat(
            id=rt.settings.owner,
            host=socket.gethostname(),
            pid=os.getpid(),
            workflows=tuple(rt.registry.names),
            concurrency=self._max,
            runs_held=len(rt.active.keys() | self.inflight.keys()),
        )
        try:
            await rt.store.record_worker(beat)
        except Exception as exc:  # observation only: the loop reports a store that is down
            rt.emitter.log.debug(f"could not record the worker's heartbeat: {exc!r}")

    async def _loop(self) -> None:
        errors = 0
        while not self._stopping:
            self._wake.clear()
            if not self._stopping:
                await self.fire_schedules()
            try:
                claimed = await self.claim_pass()
                errors = 0
                await self._beat()
                if claimed and self.free() > 0:
                    continue
                wait = await self._idle_wait()
            except Exception as exc:
                errors += 1
                # A store that is down (or a bug) must not end the loop: back off and retry.
                self._rt.emitter.log.error("scheduler pass failed; retrying", exc)
                wait = min(self._rt.poll_interval * errors, 30.0)
            if self._stopping:
                return
            self.idle = True
            try:
                await self._sleep(wait)
            finally:
                self.idle = False

    async def _sleep(self, wait: float) -> None:
        """Wait ``wait`` seconds, or less: until a local wake-up, or until the store says
        another process committed (a cheap read, every :data:`_WATCH` seconds, for stores
        that can tell: SQLite's ``data_version``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            left = deadline - loop.time()
            if left <= 0:
                return
            watching = self._seen is not None
            try:
                await asyncio.wait_for(self._wake.wait(), min(left, _WATCH) if watching else left)
                return
            except TimeoutError:
                pass
            if watching:
                try:
                    seen = await self._rt.store.external_changes()
                except Exception:
                    return  # the pass that follows reports what is wrong with the store
                if seen != self._seen:
                    self._seen = seen
                    return

    async def _idle_wait(self) -> float:
        """How long to sleep before the next pass."""
        poll = self._rt.poll_interval
        self._starved = self.free() <= 0
        if self._starved:
            return poll  # a finishing drive wakes the loop
        names = self._rt.registry.names
        if not names:
            return poll
        due = await self._rt.store.next_due(names)
        tick = self._tick_at
        if tick is not None and (due is None or tick < due):
            due = tick
        if due is None:
            return poll
        left = (due - self._rt.settings.clock.now()).total_seconds()
        if left <= 0 and self._held_back:
            # Due but held back by a concurrency limit: a slot freed here wakes the loop (a
            # drive that ends), one freed elsewhere is seen at the next poll; looking again
            # at once would only spin.
            return poll
        return max(_MIN_WAIT, min(poll, left))

    async def claim_pass(self, limit: int | None = None) -> list[asyncio.Task[FluxResult | None]]:
        """Claim up to the free slots (or ``limit``) of due runs and start driving them."""
        rt = self._rt
        async with self._claiming:
            free = self.free() if limit is None else limit
            names = rt.registry.names
            if free <= 0 or not names or (self._stopping and limit is None):
                return []
            limits = rt.registry.limits
            # Passed only when there are some, so a user's store without limits still works.
            more = {"limits": limits} if limits else {}
            rows = await rt.store.claim_due(
                rt.settings.owner, names, free, rt.settings.lease_seconds, **more
            )
            self._held_back = bool(limits) and len(rows) < free
            tasks = []
            for row in rows:
                task = asyncio.get_running_loop().create_task(
                    self._drive(row), name=f"fluxrun-run-{row.id}"
                )
                self.inflight[row.id] = task
                task.add_done_callback(functools.partial(self._done, row.id))
                tasks.append(task)
        return tasks

    def _done(self, run_id: str, task: asyncio.Task[Any]) -> None:
        if self.inflight.get(run_id) is task:
            del self.inflight[run_id]
        self.wake()

    async def _drive(self, row: Any) -> FluxResult | None:
        rt = self._rt
        try:
            return await rt.continue_claimed(
                row.id, rt.registry[row.name], row.fence, timer_due=True
            )
        except Exception as exc:
            if rt.settings.closing():
                rt.emitter.log.info(f"run {row.name}/{row.id} released at close ({exc})")
            else:
                # One run's failure (a storage error, a lost lease) must not stop the others;
                # the run stays due for the next pass (or another engine).
                rt.emitter.log.warning(f"driving run {row.name}/{row.id} stopped: {exc!r}")
            return None

    async def recover(self, concurrency: int) -> list[FluxResult]:
        """Claim until nothing is due; the outcomes of the runs driven meanwhile (by these
        passes, and by the loop's passes that were in flight), one per run, in the order
        they ended."""
        results: dict[str, FluxResult] = {}
        claims: dict[str, int] = {}
        while True:
            tasks = await self.claim_pass(limit=concurrency)
            waiting = [t for t in self.inflight.values() if t not in tasks]
            if not tasks and not waiting:
                return list(results.values())
            for task in tasks:
                claims[task.get_name()] = claims.get(task.get_name(), 0) + 1
            for outcome in await asyncio.gather(*tasks, *waiting, return_exceptions=True):
                if isinstance(outcome, FluxResult):
                    results.pop(outcome.id, None)
                    results[outcome.id] = outcome
            if any(n > _MAX_CLAIMS_PER_RECOVER for n in claims.values()):
                # A run that is due again every time it is put back (a clock far behind the
                # store's, say): the loop keeps at it; recover() must return.
                self._rt.emitter.log.warning("recover() stopped: a run kept coming back due")
                return list(results.values())
