"""Section 1: the engine's own cost per step, on the in-memory store, beside a bare loop."""

from __future__ import annotations

from fluxrun import FluxEngine, MemoryStorage, WorkflowContext, WorkflowStatus

from ._common import STEPS, Report, Sizes, best_time, noop_workflow, timed_async

__all__ = ["OVERHEAD_TARGET_US", "run_memory"]

OVERHEAD_TARGET_US = 25.0
"""The engine may add at most this much per step over the bare loop."""

_WARMUP = 200


async def run_memory(report: Report, sizes: Sizes) -> None:
    """Time ``execute`` of a 10-step no-op workflow against awaiting its handlers directly."""
    n = sizes.memory_workflows
    report.section(
        f"1. Memory store: a workflow of {STEPS} no-op async steps "
        f"({n:,} workflows per batch, best of {sizes.repeats})"
    )
    flow = noop_workflow()
    handlers = [step.handler for step in flow.steps]
    ctx = WorkflowContext(
        id="bench",
        name=flow.name,
        input=None,
        data={},
        status=WorkflowStatus.RUNNING,
        current_step=0,
        step=flow.steps[0].name,
        attempt=1,
        signals={},
        history=tuple,
    )

    async def bare() -> None:
        for _ in range(n):
            for handler in handlers:
                await handler(ctx)

    bare_s: list[float] = []
    engine_s: list[float] = []
    async with FluxEngine(storage=MemoryStorage()) as warm:
        for _ in range(_WARMUP):
            await warm.execute(flow)
        await bare()
    for _ in range(sizes.repeats):
        # A fresh store per batch, so the runs of earlier batches do not pile up.
        async with FluxEngine(storage=MemoryStorage()) as engine:
            await engine.execute(flow)

            async def batch(engine: FluxEngine = engine) -> None:
                for _ in range(n):
                    result = await engine.execute(flow)
                if result.status is not WorkflowStatus.COMPLETED:
                    raise RuntimeError(f"benchmark run ended {result.status}: {result.error}")

            bare_s.append(await timed_async(bare))
            engine_s.append(await timed_async(batch))

    steps = n * STEPS
    bare_us = best_time(bare_s) / steps * 1e6
    engine_us = best_time(engine_s) / steps * 1e6
    overhead = engine_us - bare_us
    report.row(f"bare asyncio loop, same {STEPS} handlers", f"{bare_us:.2f}", "µs/step")
    report.row("engine: FluxEngine + MemoryStorage", f"{engine_us:.2f}", "µs/step")
    report.target(
        "memory overhead",
        overhead <= OVERHEAD_TARGET_US,
        "engine overhead over the bare loop",
        f"{overhead:.2f}",
        "µs/step",
        f"target ≤ {OVERHEAD_TARGET_US:g} µs/step",
    )
