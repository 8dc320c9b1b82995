"""Section 11: a step's cost follows what it touched, not the size of ``ctx.data``.

On SQLite, sequential runs: a first step fills ``ctx.data``, then ``STEPS`` steps each add
one key (for 10, 100 and 1,000 small keys already there) or replace one key (for 1 KB,
100 KB and 1 MB of structured data: 100 keys of nested dicts and lists). The per-step cost
is (a run - a run of its first step alone) / ``STEPS``, so the one-off fill is not counted,
printed beside the same for a run with empty data.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

from fluxrun import FluxEngine, SQLiteStorage, WorkflowContext, create_workflow
from fluxrun._definition import WorkflowDefinition

from ._common import STEPS, Report, Sizes, best_time, run_sequential, timed_async

__all__ = ["run_datasize"]

TARGET_RATIO = 2.0
"""A step of a run with the largest data may cost at most this many times an empty one."""


def _nested(i: int, size: int) -> dict[str, Any]:
    """A structured value of about ``size`` bytes of JSON: nested dicts and lists."""
    leaves = max(1, size // 60)
    return {
        "id": i,
        "rows": [{"n": j, "name": f"item-{i}-{j}", "tags": ["a", "b"]} for j in range(leaves)],
    }


def _flow(name: str, fill: Callable[[WorkflowContext], None], steps: int) -> WorkflowDefinition:
    builder = create_workflow(name).step("fill", fill)
    for s in range(steps):

        def change(ctx: WorkflowContext, s: int = s) -> None:
            if ctx.input == "structured":
                ctx.data[f"k{s}"] = _nested(-s, 40)  # replaces one key
            else:
                ctx.data[f"new{s}"] = s  # adds one key

        builder = builder.step(f"c{s}", change)
    return builder.build()


def _keys_fill(n: int) -> Callable[[WorkflowContext], None]:
    def fill(ctx: WorkflowContext) -> None:
        for i in range(n):
            ctx.data[f"k{i}"] = i

    return fill


def _structured_fill(total: int) -> Callable[[WorkflowContext], None]:
    def fill(ctx: WorkflowContext) -> None:
        for i in range(100):
            ctx.data[f"k{i}"] = _nested(i, total // 100)

    return fill


async def _per_step(
    engine: FluxEngine, fill: Callable[[WorkflowContext], None], tag: str, runs: int, repeats: int
) -> float:
    """Seconds per changing step (the fill not counted)."""
    whole = _flow(f"size-{tag}", fill, STEPS)
    first = _flow(f"size-{tag}-1", fill, 0)
    kind = "structured" if tag.startswith("s") else "keys"
    for flow in (whole, first):
        await run_sequential(engine, flow, 1, input=kind)
    times: dict[str, list[float]] = {whole.name: [], first.name: []}
    for _ in range(repeats):
        for flow in (whole, first):
            times[flow.name].append(
                await timed_async(lambda flow=flow: run_sequential(engine, flow, runs, input=kind))
            )
    return (best_time(times[whole.name]) - best_time(times[first.name])) / runs / STEPS


async def run_datasize(report: Report, sizes: Sizes) -> None:
    """Print section 11."""
    quick = sizes.repeats == 1
    repeats = 1 if quick else 3
    report.section(
        f"11. ctx.data size (SQLite, sequential): per step of {STEPS} that each add or replace "
        f"one key, after a first step filled the data (best of {repeats})"
    )
    with tempfile.TemporaryDirectory(prefix="fluxrun-bench-") as tmp:
        async with FluxEngine(storage=SQLiteStorage(os.path.join(tmp, "size.db"))) as engine:
            empty = await _per_step(engine, _keys_fill(0), "k0", 2 if quick else 20, repeats)
            report.row("empty data", f"{empty * 1e6:.0f}", "µs/step", "the reference")
            worst = 0.0
            for n in (10, 100, 1000):
                runs = 2 if quick else 20
                cost = await _per_step(engine, _keys_fill(n), f"k{n}", runs, repeats)
                worst = max(worst, cost)
                report.row(
                    f"{n:,} keys, one key added per step",
                    f"{cost * 1e6:.0f}",
                    "µs/step",
                    f"{cost / empty:.2f}x empty",
                )
            for total, label in ((1_000, "1 KB"), (100_000, "100 KB"), (1_000_000, "1 MB")):
                runs = 2 if quick else (5 if total >= 1_000_000 else 20)
                cost = await _per_step(engine, _structured_fill(total), f"s{total}", runs, repeats)
                worst = max(worst, cost)
                report.row(
                    f"{label} structured, one key replaced per step",
                    f"{cost * 1e6:.0f}",
                    "µs/step",
                    f"{cost / empty:.2f}x empty",
                )
    report.target(
        "data size",
        worst <= TARGET_RATIO * empty,
        "largest data, per step",
        f"{worst / empty:.2f}x",
        "empty",
        f"target ≤ {TARGET_RATIO:g}x",
    )
