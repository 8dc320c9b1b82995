"""What drives runs in one process: the services a driver needs, the runs driven now,
continuing a claimed run, and waiting for a run's result.

:class:`Runtime` is handed to the engine, the scheduler and the actions alike, so none of
them reaches into another's private state. A claimed run goes through
:meth:`Runtime.continue_claimed`: it loads the run, asks :func:`~fluxrun._machine.decide`
what it needs and hands it to a :class:`~fluxrun._runner.RunDriver`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ._children import is_child_signal
from ._codec import decode
from ._concurrency import assign_key
from ._decisions import drive_decision
from ._definition import WorkflowDefinition
from ._driver import utcnow
from ._lease import LeaseKeeper
from ._machine import (
    Cancel,
    ChildFailed,
    Decision,
    Forward,
    Park,
    Rest,
    Rollback,
    TimedOut,
    decide,
    rollback_data,
)
from ._named import adopt_named_run
from ._records import TERMINAL_STATUSES, FluxResult, WorkflowStatus
from ._registry import Registry
from ._runner import RunDriver, Settings
from ._state import history, read_snapshot, replay_data
from ._trace import Emitter
from .errors import (
    ConcurrentModificationError,
    EngineClosedError,
    FluxError,
    WorkflowNotFoundError,
    with_run,
)
from .storage._base import FINISHED_STATUSES, Applied, Claim, RunRow, Store, Transition

__all__ = ["Runtime", "is_final", "wants_result"]

PARK_SECONDS = 60.0
"""How long a run this engine cannot continue (its workflow changed) is left before it is
looked at (and logged) again."""

_SUSPENDED = WorkflowStatus.SUSPENDED.value
_TIMED = ("sleep", "backoff", "signal", "child")  # may be due soon: a timer, an outcome


def wants_result(status: str, wait_kind: str | None, wait_name: str | None = None) -> bool:
    """Whether a caller waiting for a run's result gets it in this state: finished, paused,
    or waiting for something from outside (a signal); not while it sleeps, backs off or
    waits for a child run."""
    if status in FINISHED_STATUSES or status == WorkflowStatus.PAUSED.value:
        return True
    return status == _SUSPENDED and wait_kind in (None, "signal") and not is_child_signal(wait_name)


def waited_signal(row: RunRow) -> str | None:
    """The signal a stored run is suspended on (None if it waits for no signal)."""
    if row.status != _SUSPENDED or row.wait_kind not in (None, "signal"):
        return None
    return row.wait_name or next(
        (r.waiting_for for r in row.steps if r.index == row.current_step), None
    )


def is_final(result: FluxResult) -> bool:
    """:func:`wants_result` for the outcome of a drive (a sleeping run's current step is
    suspended on no signal; a run backing off has no suspended step)."""
    if result.status is not WorkflowStatus.SUSPENDED:
        return wants_result(result.status.value, None)
    return any(h.status == _SUSPENDED and h.waiting_for is not None for h in result.history)


class Runtime:
    """The services, the runs in flight and the result waiters of one engine."""

    def __init__(
        self,
        *,
        store: Store,
        emitter: Emitter,
        settings: Settings,
        keeper: LeaseKeeper,
        registry: Registry,
        max_recoveries: int,
        poll_interval: float,
    ) -> None:
        self.store = store
        self.emitter = emitter
        self.settings = settings
        self.keeper = keeper
        self.registry = registry
        self.max_recoveries = max_recoveries
        self.poll_interval = poll_interval
        # Runs driven now by this process -> their driver (close() and cancel() use it).
        self.active: dict[str, RunDriver] = {}
        self._ended: dict[str, asyncio.Event] = {}
        self._watchers: dict[str, set[asyncio.Future[FluxResult]]] = {}
        # Called when something may have become due here (a start, a signal, an unpause).
        self.on_idle: Callable[[], None] = lambda: None
        # Called when a drive ends, with whether the run now waits on a timer.
        self.on_drive_end: Callable[[bool], None] = lambda timer: None

    # -- drivers ---------------------------------------------------------------------------

    def new_driver(self, definition: WorkflowDefinition, **kw: Any) -> RunDriver:
        """A driver for a run this engine has just created."""
        driver = RunDriver(
            definition=definition,
            store=self.store,
            emitter=self.emitter,
            settings=self.settings,
            keeper=self.keeper,
            **kw,
        )
        driver.host = self
        return driver

    def driver_from(
        self, definition: WorkflowDefinition, row: RunRow, applied: Applied, **kw: Any
    ) -> RunDriver:
        """A driver for a stored run this engine has just claimed."""
        spec = definition.input_spec
        plain = decode(row.input)
        driver = RunDriver.from_row(
            row,
            applied,
            definition=definition,
            input=plain if spec is None else spec.revive(plain),
            input_plain=plain,
            store=self.store,
            emitter=self.emitter,
            settings=self.settings,
            keeper=self.keeper,
            **kw,
        )
        driver.host = self
        return driver

    async def drive(
        self,
        driver: RunDriver,
        go: Callable[[RunDriver], Awaitable[FluxResult]],
        *,
        want_result: bool = True,
    ) -> FluxResult:
        """Drive a claimed run; on any way out but a saved end, release it at once.

        ``want_result``: the caller hands the result on (else only result() waiters see it,
        if any): a run continued from its snapshot then reads its earlier history for it."""
        self.keeper.hold(driver.id, driver.fence)
        ended = asyncio.Event()
        self._ended[driver.id] = ended
        self.active[driver.id] = driver
        driver.task = asyncio.current_task()
        try:
            result = await go(driver)
        except BaseException as exc:
            await self._release(driver, exc)
            with_run(exc, driver.id, driver.definition.name)
            raise
        finally:
            self.keeper.drop(driver.id)
            self.active.pop(driver.id, None)
            self._ended.pop(driver.id, None)
            ended.set()
            self.on_drive_end(driver.wait_kind in _TIMED)
        if driver.steps_from and (want_result or driver.id in self._watchers):
            await driver.load_prefix()
            result = dataclasses.replace(result, history=tuple(driver.history))
        if driver.status not in TERMINAL_STATUSES:
            # Its wake-up (a timer, a signal, an unpause) comes through the scheduler, which
            # drives registered workflows only: a run started from a builder is adopted.
            self.registry.adopt(driver.definition)
        if wants_result(driver.status.value, driver.wait_kind) and (
            driver.status in TERMINAL_STATUSES or driver.request is None
        ):
            # (A cancel or pause noted while it suspended moves it on: waiters wait for that.)
            self._settle(driver.id, result)
        return result

    async def _release(self, driver: RunDriver, exc: BaseException) -> None:
        """Give up a run cut off by cancellation, close() or an unexpected error, so that it
        is not left owned until its lease expires (a crash would be the only other way)."""
        if isinstance(exc, ConcurrentModificationError) or driver.status in TERMINAL_STATUSES:
            return  # not ours any more, or already released with its end
        if driver.status is WorkflowStatus.SUSPENDED:
            return
        release = Transition(
            run_id=driver.id,
            expected_version=driver.version,
            updated_at=utcnow(),
            fence=driver.fence,
            release=True,
        )
        try:
            # Shielded: a cancelled caller still gets its run released.
            await asyncio.shield(self.store.apply(release))
        except BaseException as failure:
            self.emitter.log.warning(
                f"{driver.label}: could not release the run after "
                f"{type(exc).__name__}; it is recovered when its lease expires ({failure!r})"
            )

    async def stop_driving(self, timeout: float) -> None:
        """At close: wait (at most ``timeout`` seconds) for the runs driven here to reach a
        step boundary, then cut the async attempts still running short, so that their runs
        are released (see :meth:`RunDriver.cut_at_close`)."""
        await self.wait_idle(timeout)
        for driver in list(self.active.values()):
            driver.cut_at_close()

    async def wait_idle(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) until no run is driven here."""
        if not self._ended:
            return
        waiters = [asyncio.ensure_future(ev.wait()) for ev in self._ended.values()]
        _, pending = await asyncio.wait(waiters, timeout=timeout)
        for w in pending:
            w.cancel()

    def interrupt(self, run_id: str, kind: str, reason: str | None) -> bool:
        """Tell the local driver of ``run_id`` (if any) of a cancel or pause."""
        driver = self.active.get(run_id)
        if driver is None:
            return False
        driver.interrupt(kind, reason)
        return True

    # -- continuing a claimed run ------------------------------------------------------------

    async def drive_now(
        self,
        run_id: str,
        definition: WorkflowDefinition | None = None,
        row: RunRow | None = None,
    ) -> FluxResult:
        """Claim a run and drive it here at once (a signal or unpause just made it due),
        by ``definition`` (default: the registered one); if another executor has it, wait
        for its result instead. ``row``: the run as the caller just loaded it (its claim is
        made against that version, so it is not read again)."""
        if row is None:
            row = await self.store.load_tail(run_id)
        if row is None:
            raise WorkflowNotFoundError(f"Workflow not found: {run_id}", workflow_id=run_id)
        if definition is None and row.name in self.registry:
            definition = self.registry[row.name]
        if definition is not None and definition.concurrency is not None:
            self.on_idle()  # under a concurrency limit: a claim takes it, within the limit
        elif run_id not in self.active and definition is not None:
            try:
                applied = await self.store.apply(
                    Transition(
                        run_id=run_id,
                        expected_version=row.version,
                        updated_at=utcnow(),
                        claim=Claim(self.settings.owner, self.settings.lease_seconds),
                    )
                )
            except ConcurrentModificationError:
                pass  # someone else drives it (or changed it): wait for what it comes to
            else:
                now = self.settings.clock.now()
                timer_due = row.run_after is not None and row.run_after <= now
                # The claim changed only the lease columns of the row read above.
                claimed = dataclasses.replace(
                    row,
                    version=applied.version,
                    fence=applied.fence,
                    owner=self.settings.owner,
                    claims=row.claims + 1,
                )
                outcome = await self.continue_claimed(
                    run_id,
                    definition,
                    applied.fence,
                    timer_due=timer_due,
                    claimed=claimed,
                    want_result=True,
                )
                if outcome is not None and is_final(outcome):
                    return outcome
        return await self.wait_result(run_id, None)

    async def unpause(self, row: RunRow) -> bool:
        """Make a paused run due again (it continues where it stopped); False if the run
        was not paused (or stopped being paused meanwhile: a cancel claimed it, say)."""
        current: RunRow | None = row
        for _ in range(3):
            if current is None or current.status != WorkflowStatus.PAUSED.value:
                return False
            try:
                await self.store.apply(
                    Transition(
                        run_id=current.id,
                        expected_version=current.version,
                        updated_at=utcnow(),
                        status=_SUSPENDED if current.wait_kind else WorkflowStatus.PENDING.value,
                        requested="pause",  # a cancel asked meanwhile stays
                    )
                )
            except ConcurrentModificationError:
                current = await self.store.load(row.id)  # changed or claimed: look again
                continue
            self.on_idle()
            return True
        return False

    async def continue_claimed(
        self,
        run_id: str,
        definition: WorkflowDefinition,
        fence: int,
        *,
        timer_due: bool,
        claimed: RunRow | None = None,
        want_result: bool = False,
    ) -> FluxResult | None:
        """Do what a run this engine has just claimed (under ``fence``) needs (see
        :func:`decide`); ``claimed`` is the run as :meth:`Store.load_tail` gives it, if the
        caller has it. Returns the outcome of driving it, or None when it was only put back.

        The run is read from its snapshot on: a continuation costs what it needs, not what
        the run did before (a rollback reads the rest)."""
        started = time.perf_counter()
        row = claimed if claimed is not None else await self.store.load_tail(run_id)
        if row is None or row.fence != fence or row.owner != self.settings.owner:
            return None  # deleted, or claimed by someone else meanwhile
        if not row.step_names:
            adopted = await adopt_named_run(self, row, definition)
            if adopted is None:
                return None  # its input was refused: the run failed without running a step
            row = adopted
        if (
            definition.concurrency is not None
            and row.concurrency_key is None
            and row.requested is None
        ):
            await assign_key(self, row, definition)
            return None  # back in the store, to be claimed within the limit
        applied = Applied(version=row.version, fence=row.fence)
        name = waited_signal(row)
        signal = None if name is None else await self.store.first_signal(row.id, name)

        def decide_for(r: RunRow) -> Decision:
            return decide(
                r,
                definition,
                max_recoveries=self.max_recoveries,
                signal=signal,
                timer_due=timer_due,
            )

        decision = decide_for(row)
        if row.steps_from and isinstance(decision, Rollback | Cancel):
            # Compensation looks at every completed step: read them all. (The claim holds,
            # so the run is as it was a moment ago.)
            full = await self.store.load(run_id)
            if full is None or full.fence != fence:
                return None
            row = full
            decision = decide_for(row)
        if row.status not in (_SUSPENDED, WorkflowStatus.PENDING.value) or row.claims > 1:
            self.emitter.log.warning(
                f"recovering run {row.name}/{row.id} (status {row.status}, attempt {row.claims})"
            )
        return await self.carry_out(definition, row, applied, decision, started, want_result)

    async def carry_out(
        self,
        definition: WorkflowDefinition,
        row: RunRow,
        applied: Applied,
        decision: Decision,
        started: float,
        want_result: bool = False,
    ) -> FluxResult | None:
        """Drive a claimed run as ``decision`` says."""
        rows = {r.index: r for r in row.steps}
        if isinstance(decision, Rest | Park):
            await self._put_back(row, applied, decision)
            return None
        base: dict[str, Any] = {}
        signals: dict[str, Any] = {}
        if row.snapshot is not None:
            base, signals = read_snapshot(row.snapshot.text)
        # The rows the snapshot already holds (the tail starts at its step) are not replayed.
        after = [r for r in rows.values() if r.index >= row.steps_from]
        data_at = -1  # the saved data is not known to be that of the rows before a step
        if isinstance(decision, Rollback | Cancel):
            failed = decision.failed if isinstance(decision, Rollback) else len(definition.steps)
            data = rollback_data(rows.values(), failed)
        elif isinstance(decision, Forward | TimedOut | ChildFailed):
            # A timed-out wait's (or failed child's) attempt failed: its changes are dropped.
            data_at = decision.start if isinstance(decision, Forward) else decision.index
            data = replay_data(after, before=data_at, onto=base)
        else:
            data = replay_data(after, onto=base)
        driver = self.driver_from(definition, row, applied, rows=rows, data=data, signals=signals)
        driver.started = started
        driver.current_step = row.current_step
        driver.data_at = data_at
        if row.requested is not None:
            driver.request, driver.request_reason = row.requested, row.request_reason
        return await self.drive(
            driver, lambda d: drive_decision(d, decision, row), want_result=want_result
        )

    async def _put_back(self, row: RunRow, applied: Applied, decision: Rest | Park) -> None:
        now = utcnow()
        patch: dict[str, Any] = {}
        if isinstance(decision, Park):
            # Left alone for a while, not forever: it is looked at (and logged) again.
            self.emitter.log.error(decision.message)
            patch["run_after"] = now + dt.timedelta(seconds=PARK_SECONDS)
        await self.store.apply(
            Transition(
                run_id=row.id,
                expected_version=applied.version,
                updated_at=now,
                fence=applied.fence,
                release=True,
                **patch,
            )
        )

    # -- results -----------------------------------------------------------------------------

    async def _stopped(self, row: RunRow) -> bool:
        """Whether a stored run is where a result() waiter gets it (:func:`wants_result`),
        and stays there until something comes from outside: no cancel or pause asked of it,
        and no signal in its inbox for the wait it is suspended on."""
        if not wants_result(row.status, row.wait_kind, row.wait_name):
            return False
        if row.status in FINISHED_STATUSES:
            return True
        if row.requested is not None:
            return False
        name = waited_signal(row)
        if name is None:
            return True
        if await self.store.first_signal(row.id, name) is not None:
            return False
        # Read apart from the row: a signal consumed in between means the run moved on.
        again = await self.store.load_tail(row.id)
        return again is not None and again.version == row.version

    def _settle(self, run_id: str, result: FluxResult) -> None:
        for fut in self._watchers.pop(run_id, ()):
            if not fut.done():
                fut.set_result(result)

    async def wait_result(self, run_id: str, timeout: float | None) -> FluxResult:
        """The run's result once it is finished or waits for something from outside,
        whichever process drives it (local drives report at once; others are polled)."""
        started = time.perf_counter()
        deadline = None if timeout is None else time.monotonic() + timeout
        loop = asyncio.get_running_loop()
        while True:
            fut: asyncio.Future[FluxResult] = loop.create_future()
            self._watchers.setdefault(run_id, set()).add(fut)
            try:
                if run_id not in self.active and self.settings.closing():
                    # Nothing here will drive it, report on it, or read the store again.
                    raise EngineClosedError(
                        f"run {run_id!r}: the engine was closed before the run finished or "
                        "stopped to wait; another engine continues it",
                        workflow_id=run_id,
                    )
                if run_id not in self.active:
                    row = await self.store.load(run_id)
                    if row is None:
                        raise WorkflowNotFoundError(
                            f"Workflow not found: {run_id}", workflow_id=run_id
                        )
                    if await self._stopped(row):
                        return stored_result(row, started)
                wait = self.poll_interval
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        raise TimeoutError(
                            f"run {run_id!r} did not finish or stop to wait within {timeout:g}s"
                        )
                try:
                    return await asyncio.wait_for(asyncio.shield(fut), wait)
                except TimeoutError:
                    continue
            finally:
                watchers = self._watchers.get(run_id)
                if watchers is not None:
                    watchers.discard(fut)
                    if not watchers:
                        self._watchers.pop(run_id, None)


def stored_result(row: RunRow, started: float) -> FluxResult:
    """A run's result as stored (for a run another process drove)."""
    error = None
    if row.error is not None and row.status in FINISHED_STATUSES:
        error = FluxError(row.error, workflow_id=row.id, workflow_name=row.name)
    return FluxResult(
        id=row.id,
        status=WorkflowStatus(row.status),
        data=replay_data(row.steps),
        history=history(row.step_names, row.steps, row.run_after),
        duration_ms=(time.perf_counter() - started) * 1000.0,
        error=error,
    )
