"""``--profile``: where the engine's time goes on the in-memory store (cProfile)."""

from __future__ import annotations

import cProfile
import io
import pstats

from fluxrun import FluxEngine, MemoryStorage

from ._common import STEPS, Report, noop_workflow

__all__ = ["run_profile"]


async def run_profile(report: Report, workflows: int, top: int = 25) -> None:
    """Profile ``workflows`` runs of the 10-step no-op workflow; print the top functions."""
    report.section(
        f"Profile: MemoryStorage, {workflows:,} runs of {STEPS} no-op steps, top {top} by own "
        "time (cProfile adds its own overhead: compare shares, not absolute times)"
    )
    flow = noop_workflow()
    async with FluxEngine(storage=MemoryStorage()) as engine:
        for _ in range(50):
            await engine.execute(flow)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(workflows):
            await engine.execute(flow)
        profiler.disable()
    buffer = io.StringIO()
    stats = pstats.Stats(profiler, stream=buffer)
    stats.sort_stats("tottime").print_stats(top)
    lines = buffer.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls")), 0)
    for line in lines[start:]:
        if line.strip():
            report.line("  " + line.rstrip())
