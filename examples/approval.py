"""An expense approval that waits, durably, for a signal from somewhere else.

    python examples/approval.py [--db approval.db]

A step returns ``wait("approved")``: the run is saved as *suspended* and the call returns.
Nothing has to stay in memory: here the first engine is closed, and a second engine (think:
another process, a web request handler, a worker started hours later) opens the same SQLite
file, finds the run and delivers the signal; the run then continues with its next step.

It has the saga shape too: ``submit`` can be undone (its compensation withdraws the request),
``pay_out`` is the commit step (money leaves: it never runs twice in a run and is never
undone), and ``notify``, after the commit, is retried until it succeeds.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

from fluxrun import (
    FluxEngine,
    SignalMismatchError,
    SQLiteStorage,
    WorkflowContext,
    create_workflow,
    wait,
)


def submit(ctx: WorkflowContext) -> None:
    # Sync handlers are fine too: the engine runs them in a worker thread.
    ctx.data["request"] = f"{ctx.input['employee']}: {ctx.input['amount']} EUR"


def withdraw(ctx: WorkflowContext) -> None:  # compensation of submit
    ctx.data["request"] = None


def ask_for_approval(ctx: WorkflowContext) -> object:
    ctx.data["asked"] = "finance"  # saved together with the suspension
    return wait("approved")


def pay_out(ctx: WorkflowContext) -> None:
    # The commit step: once completed it never runs again in this run. A crash before its
    # outcome is saved does run it again, so a real transfer passes ctx.idempotency_key too.
    # The signal's payload is available to every later step.
    approval = ctx.signals["approved"]
    ctx.data["paid"] = ctx.input["amount"]
    ctx.data["approved_by"] = approval["by"]


def notify(ctx: WorkflowContext) -> None:
    # After the commit: retried until it succeeds (retries=10). A real mail call would pass
    # ctx.idempotency_key ("<run id>:notify"), so that the mail service drops a repeat.
    ctx.data["notified"] = ctx.input["employee"]


expense = (
    create_workflow("expense_approval")
    .step("submit", submit, compensate=withdraw)
    .step("approval", ask_for_approval)
    .commit("pay_out", pay_out)
    .step("notify", notify, retries=10)
)


async def first_process(db: Path) -> str:
    """Start the run; it suspends at the approval step. Then this engine shuts down."""
    async with FluxEngine(storage=SQLiteStorage(db)) as engine:
        run = await engine.execute(expense, {"employee": "kim", "amount": 420})
        waiting = run.history[1]
        print(f"[process 1] run {run.id} is {run.status.value}")
        print(f"[process 1] step {waiting.name!r} waits for signal {waiting.waiting_for!r}")
        print("[process 1] closing the engine; nothing about the run stays in memory")
        return run.id


async def second_process(db: Path, run_id: str) -> None:
    """A fresh engine on the same file finds the run and delivers the signal."""
    async with FluxEngine(storage=SQLiteStorage(db)) as engine:
        # Registering lets us name the workflow by its string name, as another process that
        # imports the same module would.
        engine.register(expense)
        state = await engine.get(run_id)
        assert state is not None
        print(f"[process 2] loaded run {run_id} from {db.name}: {state.status.value}")
        print(f"[process 2] its data so far: {state.data}")

        # The run only accepts the signal it waits for; anything else is refused, untouched.
        try:
            await engine.signal("expense_approval", run_id, "rejected")
        except SignalMismatchError as exc:
            print(f"[process 2] wrong signal refused: {exc}")

        result = await engine.signal("expense_approval", run_id, "approved", {"by": "ann"})
        print(f"[process 2] signal 'approved' delivered -> run is {result.status.value}")
        for step in result.history:
            print(f"             {step.name:<9} {step.status.value:<10} output={step.output}")
        print(f"[process 2] result data: {result.data}")

        # A signal is consumed exactly once: the run is no longer waiting for anything.
        stored = await engine.get(run_id)
        assert stored is not None
        done_at = f"{stored.completed_at:%H:%M:%S} UTC" if stored.completed_at else "-"
        print(f"[process 2] stored status: {stored.status.value}, completed at {done_at}")


async def main_async(db: Path) -> None:
    run_id = await first_process(db)
    await second_process(db, run_id)


def main() -> None:
    parser = argparse.ArgumentParser(description="An approval that waits for a signal.")
    parser.add_argument("--db", type=Path, help="SQLite file (default: a new temporary file)")
    args = parser.parse_args()
    db = args.db or Path(tempfile.mkdtemp(prefix="fluxrun-")) / "approval.db"
    asyncio.run(main_async(db))


if __name__ == "__main__":
    main()
