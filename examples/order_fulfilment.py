"""Order fulfilment as a saga, run durably on a SQLite file.

    python examples/order_fulfilment.py [--db flux-demo.db]

It shows the saga shape: the reversible steps first, each with a compensation that undoes it,
then the *commit* step (the point of no return), then the steps that are retried until they
succeed::

    reserve          approval           authorize      capture    ship
    undo: release    big orders only    undo: void     COMMIT     retried, idempotent

(a) an order that completes;
(b) the payment is refused *before* the commit completed: the completed steps are
    compensated, newest first, and the run ends ``rolled_back``;
(c) a big order suspends until a manager sends a signal, then completes;
(d) the carrier is down *after* the payment was captured: compensation never crosses a
    completed commit step, so nothing is undone; ``ship`` uses up its retries, the run ends
    ``failed`` with an error naming the commit step, and once the carrier is back
    ``engine.resume(order, run_id)`` finishes it forward from ``ship`` (the payment is never
    captured twice); ``engine.attempts(run_id)`` still lists every attempt;
(e) the runs as stored in the database, with their full ids.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections import Counter
from pathlib import Path

from fluxrun import (
    FluxEngine,
    FluxTraceEvent,
    JsonFileTraceSink,
    NonRetryableError,
    RetryPolicy,
    SQLiteStorage,
    WorkflowFilter,
    create_workflow,
    wait,
)
from fluxrun import WorkflowContext as Ctx  # short alias, for the step signatures

APPROVAL_LIMIT = 1000  # orders above this total need a manager's approval
CARRIER_DOWN: set[str] = set()  # destinations the carrier cannot take right now
CAPTURES: Counter[str] = Counter()  # how many times capture ran, per run id
OUTSIDE: dict[str, str] = {}  # what the warehouse, bank and carrier did, by idempotency key


def outside_call(key: str, what: str) -> str:
    """Stands in for an outside API that deduplicates requests by idempotency key: a repeated
    request with the same key gets the first answer back instead of acting twice."""
    return OUTSIDE.setdefault(key, f"{what}-{len(OUTSIDE) + 1}")


# -- reversible steps: each has a compensation ------------------------------------------------
async def reserve(ctx: Ctx) -> None:
    await asyncio.sleep(0.02)  # stands in for a call to the warehouse
    ctx.data["reserved"] = ctx.input["items"]  # ctx.data is saved after every step


async def release(ctx: Ctx) -> None:  # compensation of reserve
    ctx.data["reserved"] = []


async def ask_manager(ctx: Ctx) -> object:
    return wait("approval")  # suspend the run until someone sends the "approval" signal


async def authorize(ctx: Ctx) -> None:
    await asyncio.sleep(0.02)
    # ctx.idempotency_key is stable per run and step ("<run id>:authorize"): passed to the
    # payment provider, a repeated attempt (after a crash, say) places no second hold.
    ctx.data["hold"] = outside_call(ctx.idempotency_key, "hold")


async def void_hold(ctx: Ctx) -> None:  # compensation of authorize
    ctx.data["hold"] = None


# -- the commit step: once completed, it never runs again in this run and is never undone -----
async def capture(ctx: Ctx) -> None:
    await asyncio.sleep(0.02)
    if ctx.input["card"] == "empty":
        # NonRetryableError skips the remaining attempts: asking again will not help.
        raise NonRetryableError("payment refused: insufficient funds")
    CAPTURES[ctx.id] += 1
    ctx.data["payment"] = outside_call(ctx.idempotency_key, "pay")


# -- after the commit: retried until it succeeds, so it must be idempotent --------------------
async def ship(ctx: Ctx) -> None:
    await asyncio.sleep(0.02)
    if ctx.input["address"] in CARRIER_DOWN:
        raise ConnectionError(f"carrier unreachable for {ctx.input['address']}")
    # The carrier deduplicates by this key: a repeated attempt books no second parcel.
    ctx.data["tracking"] = outside_call(ctx.idempotency_key, "parcel")


order = (
    create_workflow("order_fulfilment")
    .step("reserve", reserve, compensate=release)
    # `when` is checked just before the step: falsy -> the step is skipped, not run.
    .step("approval", ask_manager, when=lambda ctx: ctx.input["total"] > APPROVAL_LIMIT)
    .step("authorize", authorize, compensate=void_hold)
    .commit("capture", capture, retries=2)
    # Short waits so that the demo is quick; a real shop would retry for hours
    # (e.g. retries=30, RetryPolicy(initial_delay=5, max_delay=600)).
    .step("ship", ship, retries=4, retry=RetryPolicy(initial_delay=0.02, jitter=False))
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
        if e.type not in LABELS:
            return
        attempt = ""  # step:retry carries the attempt that failed, the others the retries used
        if e.type == "step:retry":
            attempt = str(e.retries)
        elif e.type in ("step:complete", "step:error", "step:suspend"):
            attempt = str((e.retries or 0) + 1)
        took = "" if e.duration_ms is None else f"{e.duration_ms:.1f} ms"
        note = f"payload {e.input}" if e.type == "signal:received" else e.error or ""
        line = f"    {e.step_name:<10} {LABELS[e.type]:<12} {attempt:>7}  {took:>9}  {note}"
        print(line.rstrip())


async def main_async(db: Path) -> None:
    # SIGTERM (like Ctrl-C) leaves `async with` cleanly: close() releases every run it was
    # driving, so the next process on this database continues them at once.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    trace = JsonFileTraceSink(db.with_suffix(".trace.ndjson"), reset=False)
    async with FluxEngine(storage=SQLiteStorage(db), trace=[StepPrinter(), trace]) as engine:
        orders = [  # (title, items, total, card, address)
            ("(a) an order that completes", ["book"], 30, "visa", "Paris"),
            ("(b) the payment is refused: rolled back", ["lamp"], 80, "empty", "Lima"),
            ("(c) a big order waits for a manager", ["piano"], 4200, "visa", "Oslo"),
            ("(d) the carrier is down after the payment", ["bike"], 600, "visa", "Nuuk"),
        ]
        CARRIER_DOWN.add("Nuuk")
        for title, items, total, card, address in orders:
            print(f"\n{title}\n    {'step':<10} {'status':<12} {'attempt':>7}  {'duration':>9}")
            run = await engine.execute(
                order, {"items": items, "total": total, "card": card, "address": address}
            )
            if run.status == "suspended":
                # The run is saved as suspended: this process could exit now, and any process
                # on this database could deliver the signal later (see examples/approval.py).
                stored = await engine.get(run.id)  # what any other process would see now
                assert stored is not None
                print(f"    run {run.id} is {stored.status} in the db, waits for 'approval'")
                print("    the manager approves: engine.signal(order, run_id, 'approval', ...)")
                run = await engine.signal(order, run.id, "approval", {"by": "maria"})
            print(f"    => {run.status} (run {run.id})  data: {run.data}")
            if run.status == "failed":
                # A failure after the commit: nothing was undone; the stored error says what
                # to do. Once the cause is fixed, resume() continues after the commit step.
                stored = await engine.get(run.id)
                assert stored is not None
                print(f"    stored error: {stored.error}")
                CARRIER_DOWN.clear()
                print("    the carrier is back: engine.resume(order, run_id)")
                resumed = await engine.resume(order, run.id)
                assert resumed is not None
                run = resumed
                print(f"    => {run.status} (run {run.id})  data: {run.data}")
                print(f"    capture ran {CAPTURES[run.id]} time(s) in this run")
                # resume() keeps the earlier attempts: every attempt of every step is listed.
                kept = Counter(f"{a.step} {a.status}" for a in await engine.attempts(run.id))
                print("    attempts: " + ", ".join(f"{k} x{n}" for k, n in kept.items()))

        # Everything above was saved as it happened; read it back from the database.
        runs = await engine.list(WorkflowFilter(name="order_fulfilment", limit=10))
        print(f"\n(e) the latest {len(runs)} runs stored in {db}")
        print(f"    {'run id':<36}  {'status':<11}  {'created (UTC)':<19}  steps")
        for r in runs:
            created = r.created_at.strftime("%Y-%m-%d %H:%M:%S")
            # e.g. "2 compensated, 1 skipped, 1 failed, 1 pending" (pending = never reached)
            steps = ", ".join(f"{n} {s}" for s, n in Counter(h.status for h in r.history).items())
            print(f"    {r.id:<36}  {r.status:<11}  {created}  {steps}")
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
