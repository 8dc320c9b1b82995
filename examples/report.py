"""A report with a flaky step (retried), a slow step (timed out) and every attempt kept.

    python examples/report.py [--db report.db]

``fetch`` fails twice, then succeeds: it has ``retries=3`` and a fast RetryPolicy, so the
engine waits a little and tries again (a ``step:retry`` event each time). ``render`` is
limited to 0.2 s per attempt: an async handler still running then is cancelled, and the
attempt fails with StepTimeoutError. Its second attempt takes a shorter path (a summary
instead of the full report), so the first run completes; the second run asks for the full
report only, every attempt times out, and the run fails with the StepTimeoutError.
``engine.attempts(run_id)`` then lists every attempt with its exception type.

Saga shape: ``fetch`` and ``render`` change nothing outside, so they need no compensation;
``publish`` (mailing the report) is the commit step, last: it runs once per run, even if the
run is resumed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
from pathlib import Path

from fluxrun import (
    FluxEngine,
    FluxTraceEvent,
    RetryPolicy,
    SQLiteStorage,
    WorkflowContext,
    create_workflow,
)


async def fetch(ctx: WorkflowContext) -> None:
    await asyncio.sleep(0.01)
    # ctx.attempt is 1-based; a real flaky source would fail at random.
    if ctx.attempt < 3:
        raise ConnectionError("sales API unavailable")
    ctx.data["rows"] = 1250


async def render(ctx: WorkflowContext) -> None:
    full = ctx.attempt == 1 or not ctx.input["allow_summary"]
    # The full report never fits in the timeout; the summary needs no wait at all, so it is
    # done well inside the timeout however busy the machine is.
    await asyncio.sleep(3600 if full else 0)
    ctx.data["report"] = f"{'full' if full else 'summary'} report of {ctx.data['rows']} rows"


async def publish(ctx: WorkflowContext) -> None:
    # A real mailer would get ctx.idempotency_key, so that a repeat after a crash is dropped.
    ctx.data["sent_to"] = "sales@example.com"


report = (
    create_workflow("daily_report")
    # Waits of 0.05 s, then 0.1 s: 0.05 * 2 ** (retry - 1), no jitter so the output is stable.
    .step("fetch", fetch, retries=3, retry=RetryPolicy(initial_delay=0.05, jitter=False))
    # timeout is per attempt, in seconds; a timed-out attempt is retried like any failure.
    .step("render", render, timeout=0.2, retries=1, retry=RetryPolicy(initial_delay=0.0))
    .commit("publish", publish)
)


class AttemptPrinter:
    """A trace sink that prints what happened to each attempt."""

    def emit(self, e: FluxTraceEvent) -> None:
        if e.type == "step:retry":
            # `retries` is the 1-based retry about to happen, i.e. the attempt that failed.
            note = f"step:retry {e.retries}/{e.max_retries}"
            print(f"    {e.step_name:<7} attempt {e.retries} failed: {e.error}  [{note}]")
        elif e.type == "step:complete":
            attempt = (e.retries or 0) + 1
            took = f"{e.duration_ms:.0f} ms"
            print(f"    {e.step_name:<7} attempt {attempt} completed (step took {took} in all)")
        elif e.type == "step:error":
            attempt = (e.retries or 0) + 1
            print(f"    {e.step_name:<7} attempt {attempt} failed: {e.error} -> step failed")


async def main_async(db: Path) -> None:
    async with FluxEngine(storage=SQLiteStorage(db), trace=AttemptPrinter()) as engine:
        for title, allow_summary in (("summary allowed", True), ("full report only", False)):
            print(f"\nrun with {title}:")
            run = await engine.execute(report, {"allow_summary": allow_summary})
            print(f"  => {run.status} (run {run.id})")
            if run.error is None:
                print(f"     {run.data['report']}")
            else:
                # execute() returns a failed run instead of raising; the step's own
                # exception is in result.error.
                print(f"     error: {type(run.error).__name__}: {run.error}")
                # Every attempt is kept, with the qualified type of its exception (and its
                # traceback, in a.traceback; get() shows it for the step's last attempt).
                print("     attempts:")
                for a in await engine.attempts(run.id):
                    what = f"{a.error_type}: {a.error}" if a.error_type else ""
                    print(f"       {a.step:<7} #{a.attempt}  {a.status:<9}  {what}".rstrip())
            for step in run.history:
                print(f"     {step.name:<7} {step.status:<10} retries used: {step.retries}")


def main() -> None:
    parser = argparse.ArgumentParser(description="Retries and timeouts.")
    parser.add_argument("--db", type=Path, help="SQLite file (default: a new temporary file)")
    args = parser.parse_args()
    db = args.db or Path(tempfile.mkdtemp(prefix="fluxrun-")) / "report.db"
    # The engine logs each failed attempt; the printer above already shows them.
    logging.getLogger("fluxrun").setLevel(logging.ERROR)
    asyncio.run(main_async(db))


if __name__ == "__main__":
    main()
