"""Section 11: a step's cost follows what it touched, not the size of ``ctx.data``.

On SQLite, sequential runs: a first step fills ``ctx.data``, then ``STEPS`` steps each add
one key (for 10, 100 and 1,000 small keys already there) or replace one key (for 1 KB,
100 KB and 1 MB of structured data: 100 keys of nested dicts and lists). The per-step cost
is timed inside the run, from the start of the first changing step to the start of a last
step after them (so each changing step's commit is counted and the one-off fill is not),
divided by ``STEPS``; printed beside the same for a run with empty data.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

from fluxrun import FluxEngine, SQLiteStorage, WorkflowContext, create_workflow
from fluxrun._definition import WorkflowDefinition

from ._common import STEPS, Report, Sizes, run_sequential

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


_MARKS: list[float] = []


def _mark(ctx: WorkflowContext) -> None:
    _MARKS.append(time.perf_counter())


def _flow(name: str, fill: Callable[[WorkflowContext], None]) -> WorkflowDefinition:
    builder = create_workflow(name).step("fill", fill).step("start", _mark)
    for s in range(STEPS):

        def change(ctx: WorkflowContext, s: int = s) -> None:
            if ctx.input == "structured":
                ctx.data[f"k{s}"] = _nested(-s, 40)  # replaces one key
            else:
                ctx.data[f"new{s}"] = s  # adds one key

        builder = builder.step(f"c{s}", change)
    return builder.step("end", _mark).build()


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
    engine: FluxEngine, fill: Callable[[WorkflowContext], None], tag: str, runs: int
) -> float:
    """Seconds per changing step (the fill not counted): the best of ``runs`` runs."""
    flow = _flow(f"size-{tag}", fill)
    kind = "structured" if tag.startswith("s") else "keys"
    await run_sequential(engine, flow, 1, input=kind)  # warm-up
    spans: list[float] = []
    for _ in range(runs):
        _MARKS.clear()
        await run_sequential(engine, flow, 1, input=kind)
        spans.append((_MARKS[1] - _MARKS[0]) / (STEPS + 1))  # the changing steps and "start"
    return min(spans)


async def run_datasize(report: Report, sizes: Sizes) -> None:
    """Print section 11."""
    quick = sizes.repeats == 1
    report.section(
        f"11. ctx.data size (SQLite, sequential): per step of {STEPS} that each add or replace "
        "one key, after a first step filled the data (best run of 20; 5 for 1 MB)"
    )
    with tempfile.TemporaryDirectory(prefix="fluxrun-bench-") as tmp:
        async with FluxEngine(storage=SQLiteStorage(os.path.join(tmp, "size.db"))) as engine:
            # Measured first and again last (the best counts): the file and the caches warm up.
            rows: list[tuple[str, float]] = []
            empty = await _per_step(engine, _keys_fill(0), "k0", 2 if quick else 20)
            worst = 0.0
            for n in (10, 100, 1000):
                runs = 2 if quick else 20
                cost = await _per_step(engine, _keys_fill(n), f"k{n}", runs)
                worst = max(worst, cost)
                rows.append((f"{n:,} keys, one key added per step", cost))
            for total, label in ((1_000, "1 KB"), (100_000, "100 KB"), (1_000_000, "1 MB")):
                runs = 2 if quick else (5 if total >= 1_000_000 else 20)
                cost = await _per_step(engine, _structured_fill(total), f"s{total}", runs)
                worst = max(worst, cost)
                rows.append((f"{label} structured, one key replaced per step", cost))
            empty = min(empty, await _per_step(engine, _keys_fill(0), "k0", 2 if quick else 20))
    report.row("empty data", f"{empty * 1e6:.0f}", "µs/step", "the reference")
    for what, cost in rows:
        report.row(what, f"{cost * 1e6:.0f}", "µs/step", f"{cost / empty:.2f}x empty")
    report.target(
        "data size",
        worst <= TARGET_RATIO * empty,
        "largest data, per step",
        f"{worst / empty:.2f}x",
        "empty",
        f"target ≤ {TARGET_RATIO:g}x",
    )
