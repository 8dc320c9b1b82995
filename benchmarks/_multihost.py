"""Proof on several hosts: PostgreSQL on this machine, ``fluxrun worker`` processes each in
a network namespace of its own reaching it over a veth pair (loopback processes where
namespaces cannot be made, said in the output).

For 1, 2 and 4 workers: the throughput of ``runs`` runs of 10 steps started by a client.
Then, with 2 workers: ``kill -9`` of one mid-run (its runs must finish on the other within
one lease), and PostgreSQL stopped with ``-m immediate`` and restarted mid-run (the workers
must reconnect and finish). Beside the runs, every case drives a workflow with a
concurrency limit per key (``LIMIT`` runs of each of ``KEYS`` keys at once) and a schedule
that fires every second. Each case counts runs lost (not completed), step results recorded
twice (a step with more than one completed outcome), runs over their concurrency limit (the
most runs of one key whose first step started before another's last step ended, beyond
the limit) and schedule ticks fired twice: all must be 0.

``python -m benchmarks --only hosts`` prints the table; tests/e2e/test_multihost.py runs the
same with fewer runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_TESTS_DIR = Path(__file__).resolve().parents[1] / "tests"
_HANG = 300.0
STEPS = 10
LEASE = 3.0
LIMIT = 2
KEYS = 4

FLOWS = f"""
import asyncio, os
from fluxrun import FluxEngine, PostgresStorage, create_workflow

async def step(ctx):
    if ctx.input.get("pause"):
        await asyncio.sleep(ctx.input["pause"])

flow = create_workflow("proof")
limited = create_workflow("limited").concurrency({LIMIT}, key=lambda i: i["key"])
for i in range({STEPS}):
    flow = flow.step(f"s{{i}}", step)
    limited = limited.step(f"s{{i}}", step)
tick = create_workflow("tick").step("fired", lambda ctx: None)

def make():
    engine = FluxEngine(
        storage=PostgresStorage(os.environ["FLUX_DSN"], max_size=8),
        poll_interval=0.2,
        lease={LEASE},
        max_concurrent_runs=64,
    )
    engine.register(flow)
    engine.register(limited)
    engine.register(tick)
    return engine
"""


@dataclass
class Case:
    """One line of the table."""

    name: str
    workers: int
    runs: int
    seconds: float
    lost: int
    twice: int
    over: int = 0
    ticks: int = 0
    ticks_twice: int = 0
    note: str = ""

    @property
    def rate(self) -> float:
        return self.runs / self.seconds if self.seconds else 0.0


class Worker:
    """A ``fluxrun worker`` process on one host."""

    def __init__(self, host: Any, dsn: str, workdir: Path, name: str) -> None:
        self.log = workdir / f"{name}.log"
        env = {**os.environ, "FLUX_DSN": dsn, "PYTHONPATH": _pythonpath()}
        argv = host.command([sys.executable, "-m", "fluxrun", "worker", "proof_flows:make"])
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                argv, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"a worker ended:\n{self.log.read_text()}")
        return "ready; workflows: limited, proof, tick" in self.log.read_text()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=_HANG)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _pythonpath() -> str:
    root = str(Path(__file__).resolve().parents[1])
    old = os.environ.get("PYTHONPATH")
    return root if not old else f"{root}{os.pathsep}{old}"


async def _until(what: str, check: Any, timeout: float = _HANG) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if await check():
                return
        except Exception as exc:  # the database restarting under the observer: look again
            if "StorageError" not in type(exc).__name__:
                raise
        if time.monotonic() > deadline:
            raise RuntimeError(f"still waiting for {what} after {timeout:g}s")
        await asyncio.sleep(0.05)


@contextmanager
def proof_setup(host_count: int) -> Iterator[tuple[Any, Any, Path]]:
    """A throwaway PostgreSQL server reachable from ``host_count`` hosts; yields
    (server, hosts, workdir)."""
    sys.path.insert(0, str(_TESTS_DIR))
    try:
        from _hosts import SUBNET, hosts
        from _pgserver import PostgresServer
    finally:
        sys.path.remove(str(_TESTS_DIR))
    server = PostgresServer.start()
    try:
        with hosts(host_count) as made, tempfile.TemporaryDirectory() as tmp:
            if made.fallback is None:
                server.serve_subnet(made.db_addresses, SUBNET)
            workdir = Path(tmp)
            (workdir / "proof_flows.py").write_text(FLOWS)
            yield server, made, workdir
    finally:
        server.stop()


def _dsn(server: Any, dbname: str, address: str) -> str:
    return f"postgresql://fluxrun@{address}:{server.port}/{dbname}"


def _new_database(server: Any, dbname: str) -> None:
    import psycopg

    with psycopg.connect(server.dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{dbname}"')


async def _counts(dsn: str, run_ids: list[str]) -> tuple[int, int]:
    """Runs not completed; and step results recorded more than once (completed step rows
    beyond one per step of a run: the store's key refuses them, this checks it did)."""
    import psycopg

    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM flux_runs WHERE id = ANY(%s) AND status = 'completed'",
            (run_ids,),
        )
        row = await cur.fetchone()
        completed = int(row[0]) if row else 0
        cur = await conn.execute(
            "SELECT coalesce(sum(greatest(n - %s, 0)), 0) FROM (SELECT run_id, count(*) AS n "
            "FROM flux_steps WHERE run_id = ANY(%s) AND status = 'completed' GROUP BY run_id) c",
            (STEPS, run_ids),
        )
        row = await cur.fetchone()
        twice = int(row[0]) if row else 0
    return len(run_ids) - completed, twice


# Per key of the limited workflow: each run's span (its first step's start to its last
# step's end, by the workers' clock: one machine here) as +1/-1 events; at one instant an
# end counts before a start. The most spans open at once beyond the limit, summed over keys.
_OVER = (
    "WITH r AS (SELECT s.run_id, min(s.started_at) AS b, max(s.completed_at) AS e, "
    "min(r.concurrency_key) AS k FROM flux_steps s JOIN flux_runs r ON r.id = s.run_id "
    "WHERE r.name = 'limited' GROUP BY s.run_id), "
    "ev AS (SELECT k, b AS t, 1 AS d FROM r UNION ALL SELECT k, e, -1 FROM r), "
    "c AS (SELECT k, sum(d) OVER (PARTITION BY k ORDER BY t, d ROWS UNBOUNDED PRECEDING) "
    "AS open FROM ev) "
    "SELECT coalesce(sum(greatest(m - %s, 0)), 0) FROM (SELECT k, max(open) AS m FROM c "
    "GROUP BY k) x"
)


async def _limits_and_ticks(dsn: str) -> tuple[int, int, int]:
    """Runs over the limit; schedule ticks fired; ticks fired more than once (runs of the
    schedule beyond one per tick: its unique key refuses them, this checks it did)."""
    import psycopg

    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        over = await (await conn.execute(_OVER, (LIMIT,))).fetchone()
        ticks = await (
            await conn.execute(
                "SELECT count(DISTINCT idempotency_key), count(*) - count(DISTINCT "
                "idempotency_key) FROM flux_runs WHERE name = 'tick'"
            )
        ).fetchone()
    assert over is not None and ticks is not None
    return int(over[0]), int(ticks[0]), int(ticks[1])


async def run_case(
    server: Any,
    made: Any,
    workdir: Path,
    *,
    name: str,
    workers: int,
    runs: int,
    disturb: str | None = None,
) -> Case:
    """Start ``workers`` workers and ``runs`` runs; optionally kill a worker or restart the
    database mid-run; wait until every run is finished; count what was lost."""
    from fluxrun import FluxClient, PostgresStorage

    dbname = f"proof_{name.replace(' ', '_')}_{os.getpid()}"
    _new_database(server, dbname)
    local = _dsn(server, dbname, "127.0.0.1")
    fleet = [
        Worker(
            made.hosts[i], _dsn(server, dbname, made.hosts[i].db_address), workdir, f"{dbname}-{i}"
        )
        for i in range(workers)
    ]
    note = ""
    try:
        async with FluxClient(PostgresStorage(local, max_size=4)) as client:  # migrates
            await _until("the workers", _ready(fleet))
            pause = 0.01 if disturb else 0.0
            await client.schedule("every-second", workflow="tick", every=1.0)
            limited = max(KEYS * LIMIT * 4, runs // 5)
            began = time.perf_counter()
            ids = [(await client.start("proof", {"n": n, "pause": pause})).id for n in range(runs)]
            ids += [
                (await client.start("limited", {"key": f"k{n % KEYS}", "pause": 0.005})).id
                for n in range(limited)
            ]

            async def done() -> bool:
                counts = await client.counts("proof")
                capped = await client.counts("limited")
                return counts.get("completed", 0) >= runs and capped.get("completed", 0) >= limited

            async def ticked() -> bool:
                return sum((await client.counts("tick")).values()) >= 2

            if disturb == "kill":
                await _until("some progress", _some_done(client, runs // 5))
                killed = time.monotonic()
                fleet[0].kill()
                await _until("the runs, after the kill", done)
                note = f"worker killed; the rest finished {time.monotonic() - killed:.1f}s later"
            elif disturb == "restart":
                await _until("some progress", _some_done(client, runs // 5))
                server.crash()
                server.restart()
                await _until("the runs, after the restart", done)
                note = "PostgreSQL stopped -m immediate and restarted"
            else:
                await _until("the runs", done)
            seconds = time.perf_counter() - began
            # The schedule must have fired more than once too (a short case waits for it).
            await _until("two ticks of the schedule", ticked)
            await client.unschedule("every-second")
        lost, twice = await _counts(local, ids)
        over, ticks, ticks_twice = await _limits_and_ticks(local)
    finally:
        for w in fleet:
            w.stop()
    return Case(name, workers, runs, seconds, lost, twice, over, ticks, ticks_twice, note)


def _ready(fleet: list[Worker]) -> Any:
    async def check() -> bool:
        return all(w.ready() for w in fleet)

    return check


def _some_done(client: Any, at_least: int) -> Any:
    async def check() -> bool:
        counts = await client.counts("proof")
        return bool(counts.get("completed", 0) >= at_least)

    return check


def table(cases: list[Case], fallback: str | None) -> list[str]:
    """The printed table."""
    lines = [
        "hosts: network namespaces over veth pairs"
        if fallback is None
        else f"hosts: loopback processes ({fallback})",
        f"  {'case':<18} {'workers':>7} {'runs':>6} {'seconds':>8} {'runs/s':>8} "
        f"{'lost':>5} {'twice':>6} {'over limit':>10} {'ticks':>6} {'ticks twice':>11}  note",
    ]
    for c in cases:
        lines.append(
            f"  {c.name:<18} {c.workers:>7} {c.runs:>6} {c.seconds:>8.2f} {c.rate:>8.1f} "
            f"{c.lost:>5} {c.twice:>6} {c.over:>10} {c.ticks:>6} {c.ticks_twice:>11}  {c.note}"
        )
    lines.append(
        f"  (runs/s counts the {STEPS}-step runs only; each case also drives "
        f"max({KEYS * LIMIT * 4}, runs/5) runs limited to {LIMIT} per key over {KEYS} keys, and a "
        "schedule firing every second; a case ends once it fired twice)"
    )
    return lines


async def proof(
    runs: int, worker_counts: tuple[int, ...] = (1, 2, 4)
) -> tuple[list[Case], str | None]:
    """Every case; and why the hosts are loopback processes, if they are."""
    cases: list[Case] = []
    # The client's pool says it drops the connections the restart broke: expected here.
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    with proof_setup(max(worker_counts)) as (server, made, workdir):
        for count in worker_counts:
            cases.append(
                await run_case(
                    server, made, workdir, name=f"{count} worker(s)", workers=count, runs=runs
                )
            )
        cases.append(
            await run_case(
                server, made, workdir, name="kill -9 one of 2", workers=2, runs=runs, disturb="kill"
            )
        )
        cases.append(
            await run_case(
                server,
                made,
                workdir,
                name="postgres restart",
                workers=2,
                runs=runs,
                disturb="restart",
            )
        )
        return cases, made.fallback


async def run_hosts(report: Any, runs: int) -> bool:
    """Print the proof table (section 10); False if it could not run."""
    report.section(f"10. Proof on several hosts: {runs:,} runs of {STEPS} steps per case")
    try:
        cases, fallback = await proof(runs)
    except Exception as exc:  # no PostgreSQL binaries, say: report it, go on
        report.line(f"  skipped: {type(exc).__name__}: {exc}")
        return False
    for line in table(cases, fallback):
        report.line("  " + line)
    bad = [c.name for c in cases if c.lost or c.twice or c.over or c.ticks_twice]
    report.line(
        "  lost 0, recorded twice 0, over a limit 0, ticks fired twice 0 in every case"
        if not bad
        else f"  LOST, DUPLICATED, OVER A LIMIT OR FIRED TWICE in: {', '.join(bad)}"
    )
    return not bad
