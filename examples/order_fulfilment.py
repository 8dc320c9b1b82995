"""Order fulfilment as a saga, run durably on a SQLite file.

    python examples/order_fulfilment.py --db flux-demo.db

Steps: reserve stock -> manager approval (big orders only) -> authorize the card -> ship ->
charge. Money is only captured by the last step, a *commit* step: once completed it never runs
again in that run (not even on resume), so nobody is charged twice. Everything before it can
be undone: if shipping fails, the card hold is voided and the stock released, newest first.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections import Counter
from pathlib import Path

from fluxrun import (
    FluxEngine,
    FluxTraceEvent,
    JsonFileTraceSink,
    NonRetryableError,
    SQLiteStorage,
    WorkflowFilter,
    create_workflow,
    wait,
)
from fluxrun import WorkflowContext as Ctx  # short alias, for the step signatures

APPROVAL_LIMIT = 1000  # orders above this total need a manager's approval


# -- the steps: each one is a plain function of the run's context ----------------------------
async def reserve(ctx: Ctx) -> None:
    await asyncio.sleep(0.02)  # stands in for a call to the warehouse
    ctx.data["reserved"] = ctx.input["items"]  # ctx.data is saved after every step


async def release(ctx: Ctx) -> None:  # compensation of reserve
    ctx.data["reserved"] = []


async def ask_manager(ctx: Ctx) -> object:
    return wait("approval")  # suspend the run until someone sends the "approval" signal


async def authorize(ctx: Ctx) -> None:
    await asyncio.sleep(0.03)
    # The idempotency key is stable per run and step: pass it to the payment provider so a
    # repeated attempt (after a crash, say) does not place a second hold.
    ctx.data["hold"] = f"auth_{ctx.idempotency_key[:8]}"


async def void_hold(ctx: Ctx) -> None:  # compensation of authorize
    ctx.data["hold"] = None


async def ship(ctx: Ctx) -> None:
    await asyncio.sleep(0.04)
    if ctx.input["address"] == "nowhere":
        # NonRetryableError skips the remaining attempts: retrying will not find the address.
        raise NonRetryableError(f"no carrier delivers to {ctx.input['address']!r}")
    ctx.data["tracking"] = f"TRK-{ctx.id[:6].upper()}"


async def charge(ctx: Ctx) -> None:
    await asyncio.sleep(0.02)
    ctx.data["charged"] = ctx.input["total"]


order = (
    create_workflow("order_fulfilment")
    .step("reserve", reserve, compensate=release)
    # `when` is checked just before the step: falsy -> the step is skipped, not run.
    .step("approval", ask_manager, when=lambda ctx: ctx.input["total"] > APPROVAL_LIMIT)
    .step("authorize", authorize, compensate=void_hold)
    .step("ship", ship, retries=2, timeout=5)
    .commit("charge", charge)
)

# Trace event type -> the status shown; the other events (workflow:*, step:start) are not.
LABELS = {
    "step:complete": "completed",
    "step:retry": "retrying",
    "step:error": "failed",
    "step:skipped": "skipped",
    "step:suspend": "suspended",
    "step:compensate": "compensated",
    "signal:received": "signalled",
}


class StepPrinter:
    """A trace sink (any object with ``emit(event)``): one aligned line per step outcome."""

    def emit(self, e: FluxTraceEvent) -> None:
        if e.type == "workflow:rollback_start":
            print(f"    -- rolling back: {e.error}")
        if e.type not in LABELS:
            return
        attempt = ""  # step:retry carries the attempt that failed, the others the retries used
        if e.type == "step:retry":
            attempt = str(e.retries)
        elif e.type in ("step:complete", "step:error", "step:suspend"):
            attempt = str((e.retries or 0) + 1)
        took = "" if e.duration_ms is None else f"{e.duration_ms:.1f} ms"
        note = f"payload {e.input}" if e.type == "signal:received" else ""
        line = f"    {e.step_name:<10} {LABELS[e.type]:<12} {attempt:>7}  {took:>9}  {note}"
        print(line.rstrip())


async def main_async(db: Path) -> None:
    trace = JsonFileTraceSink(db.with_suffix(".trace.ndjson"), reset=False)
    async with FluxEngine(storage=SQLiteStorage(db), trace=[StepPrinter(), trace]) as engine:
        orders = [  # (title, items, total, address)
            ("(a) an order that completes", ["book"], 30, "Paris"),
            ("(b) shipping fails: rolled back", ["lamp"], 80, "nowhere"),
            ("(c) a big order waits for a manager", ["piano"], 4200, "Oslo"),
        ]
        for title, items, total, address in orders:
            print(f"\n{title}\n    {'step':<10} {'status':<12} {'attempt':>7}  {'duration':>9}")
            run = await engine.execute(order, {"items": items, "total": total, "address": address})
            if run.status == "suspended":
                # The run is saved as suspended: this process could exit now, and any process
                # on this database could deliver the signal later (see examples/approval.py).
                stored = await engine.get(run.id)  # what any other process would see now
                assert stored is not None
                print(f"    run {run.id[:8]} is {stored.status} in the db, waits for 'approval'")
                print("    the manager approves: engine.signal(order, id, 'approval', ...)")
                run = await engine.signal(order, run.id, "approval", {"by": "maria"})
            print(f"    => {run.status.value} (run {run.id[:8]})  data: {run.data}")

        # Everything above was saved as it happened; read it back from the database.
        runs = await engine.list(WorkflowFilter(limit=10))
        print(f"\n(d) the latest {len(runs)} runs stored in {db}")
        print(f"    {'id':<8}  {'workflow':<16}  {'status':<11}  {'created (UTC)':<19}  steps")
        for r in runs:
            created = r.created_at.strftime("%Y-%m-%d %H:%M:%S")
            # e.g. "2 compensated, 1 skipped, 1 failed, 1 pending" (pending = never reached)
            steps = ", ".join(f"{n} {s}" for s, n in Counter(h.status for h in r.history).items())
            print(f"    {r.id[:8]}  {r.name:<16}  {r.status.value:<11}  {created}  {steps}")
    trace.close()
    print(f"\nNDJSON trace appended to {trace.path}")


def main() -> None:
    parser = argparse.ArgumentParser(description="Order fulfilment saga on SQLite.")
    parser.add_argument("--db", type=Path, default=Path("flux-demo.db"), help="SQLite file")
    args = parser.parse_args()
    # The engine logs failed steps as warnings; the printer above already shows them.
    logging.getLogger("fluxrun").setLevel(logging.ERROR)
    asyncio.run(main_async(args.db))


if __name__ == "__main__":
    main()
