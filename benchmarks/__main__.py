"""``python -m benchmarks``: the engine's speed beside floors measured in the same run.

Sections: 1 memory-store overhead per step over a bare asyncio loop; 2 SQLite store
throughput, sequential and with many runs in flight, beside raw sqlite3 commits; 3 SQLite
with ~100 KB of ``ctx.data``; 4 PostgreSQL store beside raw psycopg inserts (with a DSN);
5 lateness of durable timers beside bare ``asyncio.sleep``; 6 what sleeping runs hold in a
process (RSS, tasks, threads) beside the process before; 7 kill -9 to the first step of a
new engine (SQLite, and PostgreSQL with a DSN) beside the lease; 8 what continuing a run
costs (a signal) as its history grows, beside a raw SQLite commit; 9 storing a durable batch
of 10,000 items in bulk (SQLite, and PostgreSQL with a DSN) beside plain bulk inserts; 10
(hosts) 1, 2 and 4 ``fluxrun worker`` processes in network namespaces on one PostgreSQL, a
worker killed and the database restarted mid-run (a throwaway server of its own).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sqlite3
import sys
import time
from collections.abc import Sequence

import fluxrun

from ._batches import run_batches
from ._common import Report, Sizes
from ._continue import run_continue
from ._datasize import run_datasize
from ._memory import run_memory
from ._multihost import run_hosts
from ._postgres import DSN_ENV, run_postgres, throwaway_server
from ._profile import run_profile
from ._restart import run_restart
from ._sqlite import run_sqlite
from ._timers import run_sleepers, run_timers

SECTIONS = (
    "memory",
    "sqlite",
    "big",
    "postgres",
    "timers",
    "sleepers",
    "restart",
    "continue",
    "batches",
    "hosts",
    "datasize",
)
_USES_PG = ("postgres", "timers", "restart", "batches")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="fluxrun throughput and overhead, each figure beside a floor measured in "
        "the same run.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes: checks that every section runs; the figures mean nothing",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=SECTIONS,
        metavar="SECTION",
        help=f"run only these sections ({', '.join(SECTIONS)})",
    )
    parser.add_argument("--repeats", type=int, help="timed batches per figure (best one counts)")
    parser.add_argument(
        "--in-flight", type=int, help="runs in flight at once for the gather figures (200)"
    )
    parser.add_argument(
        "--pg-dsn",
        default=os.environ.get(DSN_ENV) or None,
        help=f"PostgreSQL DSN for sections 4, 5, 7 and 9 (default: env {DSN_ENV})",
    )
    parser.add_argument(
        "--pg-start",
        action="store_true",
        help="start a throwaway PostgreSQL server (tests/_pgserver.py) for sections 4, 5, 7, 9",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile the engine's hot path on the memory store (cProfile)",
    )
    return parser


def _sizes(args: argparse.Namespace) -> Sizes:
    sizes = Sizes.quick() if args.quick else Sizes.default()
    changes: dict[str, int] = {}
    if args.repeats is not None:
        changes["repeats"] = max(1, args.repeats)
    if args.in_flight is not None:
        changes["in_flight"] = max(1, args.in_flight)
    if not changes:
        return sizes
    fields = {name: getattr(sizes, name) for name in Sizes.__slots__}
    return Sizes(**{**fields, **changes})


def _header(report: Report, sizes: Sizes, quick: bool) -> None:
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    report.line(f"fluxrun {fluxrun.__version__} benchmarks")
    report.line(
        f"Python {platform.python_version()} ({platform.python_implementation()}), "
        f"SQLite {sqlite3.sqlite_version}, {cores} cores ({usable} usable), "
        f"{platform.system()} {platform.machine()}"
    )
    report.line(
        f"Each figure: best of {sizes.repeats} timed batches after a warm-up, beside its floor "
        "measured in this run."
    )
    if quick:
        report.line("--quick: tiny sizes to check the sections run; the figures mean nothing.")


async def _run(args: argparse.Namespace, report: Report) -> int:
    sizes = _sizes(args)
    wanted = set(args.only or SECTIONS)
    began = time.perf_counter()
    _header(report, sizes, args.quick)
    if args.pg_start and args.pg_dsn is None and wanted & set(_USES_PG):
        # One throwaway server for every section that uses PostgreSQL.
        with throwaway_server(report) as dsn:
            ok = await _sections(args, report, sizes, wanted, dsn)
    else:
        ok = await _sections(args, report, sizes, wanted, args.pg_dsn)
    report.section(_summary(report, time.perf_counter() - began))
    return 0 if ok else 1


async def _sections(
    args: argparse.Namespace, report: Report, sizes: Sizes, wanted: set[str], dsn: str | None
) -> bool:
    ok = True
    if "memory" in wanted:
        await run_memory(report, sizes)
    if "sqlite" in wanted or "big" in wanted:
        await run_sqlite(report, sizes, section2="sqlite" in wanted, big="big" in wanted)
    if "postgres" in wanted:
        ok = await run_postgres(report, sizes, dsn, start=False) and ok
    if "timers" in wanted:
        ok = await run_timers(report, sizes, dsn) and ok
    if "sleepers" in wanted:
        await run_sleepers(report, sizes)
    if "restart" in wanted:
        ok = await run_restart(report, sizes, dsn) and ok
    if "continue" in wanted:
        await run_continue(report, sizes)
    if "batches" in wanted:
        ok = await run_batches(report, sizes, dsn) and ok
    if "datasize" in wanted:
        await run_datasize(report, sizes)
    if "hosts" in wanted:
        ok = await run_hosts(report, 20 if sizes.repeats == 1 else 2000) and ok
    if args.profile:
        await run_profile(report, 200 if args.quick else 2000)
    return ok


def _summary(report: Report, seconds: float) -> str:
    counts: dict[str, int] = {}
    for _, result in report.verdicts:
        counts[result] = counts.get(result, 0) + 1
    tally = ", ".join(f"{n} {result}" for result, n in sorted(counts.items())) or "none checked"
    missed = [name for name, result in report.verdicts if result != "PASS"]
    text = f"Targets: {tally}"
    if missed:
        text += f" (not met: {', '.join(missed)})"
    return f"{text}. Total {seconds:.1f}s."


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks; the exit status is 1 only if a section failed to run."""
    args = _parser().parse_args(argv)
    report = Report(lambda text: print(text, flush=True))
    return asyncio.run(_run(args, report))


if __name__ == "__main__":
    sys.exit(main())
