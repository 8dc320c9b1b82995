"""Finding and finishing runs whose executor died (``FluxEngine.recover``)."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from ._definition import WorkflowDefinition
from ._driver import rollback_data
from ._records import FluxResult, WorkflowStatus
from ._runner import claim_for, utcnow
from ._state import replay_data
from .errors import ConcurrentModificationError, FluxError
from .storage._base import Applied, RunRow, Transition

if TYPE_CHECKING:
    from ._engine import FluxEngine

__all__ = ["recover_runs"]


async def recover_runs(engine: FluxEngine, concurrency: int) -> list[FluxResult]:
    """Recover unfinished runs of ``engine``'s registered workflows (see ``recover``)."""
    results: list[FluxResult] = []
    gate = asyncio.Semaphore(concurrency)
    seen: set[str] = set()
    while True:
        names = engine._registry.names
        # Runs seen already (left alone because their workflow changed, or finished)
        # may come back first: widen the window so the ones behind them are reached.
        window = 200 + len(seen)
        batch = [
            r
            for r in await engine._store.find_recoverable(names, limit=window)
            if r.id not in seen and r.id not in engine._keeper.holding()
        ]
        if not batch:
            return results
        seen.update(r.id for r in batch)

        async def one(row: RunRow) -> FluxResult | None:
            async with gate:
                try:
                    return await _recover_one(engine, row)
                except ConcurrentModificationError as exc:
                    # Another executor took the run over (this one's lease lapsed) or
                    # changed it: it is theirs now, and the rest of the batch goes on.
                    engine.emitter.log.warning(
                        f"stopped recovering run {row.name}/{row.id}: {exc}"
                    )
                except Exception as exc:
                    # One run's failure (a storage error, say) must not abandon the
                    # others half-way; it stays recoverable for the next call.
                    engine.emitter.log.error(
                        f"could not recover run {row.name}/{row.id}", exc
                    )
                return None

        for outcome in await asyncio.gather(*(one(r) for r in batch)):
            if outcome is not None:
                results.append(outcome)


async def _recover_one(engine: FluxEngine, candidate: RunRow) -> FluxResult | None:
    definition = engine._registry[candidate.name]
    started = time.perf_counter()
    if tuple(candidate.step_names) != definition.step_names:
        engine.emitter.log.error(
            f"cannot recover run {candidate.id!r}: workflow "
            f"{candidate.name!r} changed its steps since the run started"
        )
        return None
    try:
        applied = await engine._store.apply(
            Transition(
                run_id=candidate.id,
                expected_version=candidate.version,
                updated_at=utcnow(),
                claim=claim_for(engine.settings),
            )
        )
    except ConcurrentModificationError:
        return None  # someone else claimed or changed it first
    row = await engine._store.load(candidate.id)
    if row is None or row.fence != applied.fence:
        return None
    engine.emitter.log.warning(
        f"recovering run {row.name}/{row.id} (status {row.status}, attempt {row.claims})"
    )
    if row.claims > engine._max_recoveries:
        return await _give_up(engine, definition, row, applied, started)
    rows = {r.index: r for r in row.steps}
    if row.status == WorkflowStatus.ROLLING_BACK.value:
        failed = next((i for i in sorted(rows) if rows[i].status == "failed"), None)
        if failed is not None:
            data = rollback_data(rows.values(), failed)
            driver = engine._driver_from(definition, row, applied, rows=rows, data=data)
            driver.started = started
            driver.current_step = failed
            message = rows[failed].error or "step failed"
            return await engine._drive(driver, None, rollback_from=(failed, message))
    start = 0
    while start in rows:
        start += 1
    driver = engine._driver_from(
        definition, row, applied, rows=rows, data=replay_data(rows.values(), before=start)
    )
    driver.started = started
    return await engine._drive(driver, start)


async def _give_up(
    engine: FluxEngine,
    definition: WorkflowDefinition,
    row: RunRow,
    applied: Applied,
    started: float,
) -> FluxResult:
    message = (
        f"run gave up after {row.claims - 1} executor crashes in a row "
        f"(max_recoveries={engine._max_recoveries})"
    )
    rows = {r.index: r for r in row.steps}
    driver = engine._driver_from(
        definition, row, applied, rows=rows, data=replay_data(rows.values())
    )
    driver.started = started
    driver.error = FluxError(message, workflow_id=row.id, workflow_name=row.name)
    # save() writes current_step: keep where the run stopped (the driver starts at 0).
    driver.current_step = row.current_step
    await driver.save(
        status=WorkflowStatus.FAILED, error=message, completed_at=utcnow(), release=True
    )
    engine.emitter.log.error(f"{row.name}/{row.id}: {message}")
    await driver.event(
        "workflow:error", status=WorkflowStatus.FAILED.value, error=message, duration_ms=0.0
    )
    return driver.result()
