"""fluxrun beside its peers, measured the same way: DBOS Transact (``pip install dbos``) and
Absurd (``pip install absurd-sdk absurdctl``), when they are installed. Not part of the test
suite and not part of ``python -m benchmarks``.

Each engine runs the same workflow: 10 steps that do nothing. Two figures each, in
workflows/s: sequential (one run after another, each awaited) and 200 in flight (started
at once, all awaited). Every engine runs in a process of its own (DBOS is a singleton), on
a fresh database: SQLite files in a temporary directory, and PostgreSQL databases on the
server given by ``--pg-dsn`` or started with ``--pg-start`` (``tests/_pgserver.py``).

    python -m benchmarks.peers --pg-start [--python /path/to/venv/bin/python]

``--python`` runs the peers with another interpreter (a virtualenv that has them), so that
the project's own environment stays free of them; fluxrun always runs with this one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

STEPS = 10
SEQUENTIAL = 50
IN_FLIGHT = 200
_ROOT = Path(__file__).resolve().parents[1]


# -- the children: one engine each, printing one JSON line ---------------------------------


def _fluxrun(url: str) -> dict[str, float]:
    import asyncio

    from fluxrun import FluxEngine, PostgresStorage, SQLiteStorage, create_workflow

    async def noop(ctx: Any) -> None:
        return None

    flow = create_workflow("peer-noop")
    for i in range(STEPS):
        flow = flow.step(f"s{i}", noop)

    async def main() -> dict[str, float]:
        store = SQLiteStorage(url[len("sqlite:///") :]) if url.startswith("sqlite") else None
        async with FluxEngine(storage=store or PostgresStorage(url)) as engine:
            for _ in range(5):
                await engine.execute(flow)
            began = time.perf_counter()
            for _ in range(SEQUENTIAL):
                await engine.execute(flow)
            seq = SEQUENTIAL / (time.perf_counter() - began)
            began = time.perf_counter()
            await asyncio.gather(*(engine.execute(flow) for _ in range(IN_FLIGHT)))
            flight = IN_FLIGHT / (time.perf_counter() - began)
        return {"sequential": seq, "in_flight": flight}

    return asyncio.run(main())


def _dbos(url: str) -> dict[str, float]:
    from dbos import DBOS, DBOSConfig

    @DBOS.step()
    def noop() -> None:
        return None

    @DBOS.workflow()
    def workflow() -> None:
        for _ in range(STEPS):
            noop()

    config: DBOSConfig = {"name": "peer-bench", "system_database_url": url}
    DBOS(config=config)
    DBOS.launch()
    try:
        for _ in range(5):
            workflow()
        began = time.perf_counter()
        for _ in range(SEQUENTIAL):
            workflow()
        seq = SEQUENTIAL / (time.perf_counter() - began)
        began = time.perf_counter()
        handles = [DBOS.start_workflow(workflow) for _ in range(IN_FLIGHT)]
        for handle in handles:
            handle.get_result()
        flight = IN_FLIGHT / (time.perf_counter() - began)
    finally:
        DBOS.destroy()
    return {"sequential": seq, "in_flight": flight}


def _absurd(url: str) -> dict[str, float]:
    import asyncio

    from absurd_sdk import AsyncAbsurd

    async def main() -> dict[str, float]:
        app = AsyncAbsurd(url, queue_name="bench")
        await app.create_queue("bench")

        @app.register_task("noop")
        async def task(params: Any, ctx: Any) -> None:
            for i in range(STEPS):

                async def step() -> None:
                    return None

                await ctx.step(f"s{i}", step)

        worker = asyncio.create_task(app.start_worker(concurrency=IN_FLIGHT, poll_interval=0.01))

        async def run_one() -> None:
            spawned = await app.spawn("noop", {})
            await app.await_task_result(spawned["task_id"], timeout=300)

        try:
            for _ in range(5):
                await run_one()
            began = time.perf_counter()
            for _ in range(SEQUENTIAL):
                await run_one()
            seq = SEQUENTIAL / (time.perf_counter() - began)
            began = time.perf_counter()
            ids = [(await app.spawn("noop", {}))["task_id"] for _ in range(IN_FLIGHT)]
            for task_id in ids:
                await app.await_task_result(task_id, timeout=300)
            flight = IN_FLIGHT / (time.perf_counter() - began)
        finally:
            app.stop_worker()
            worker.cancel()
            await app.close()
        return {"sequential": seq, "in_flight": flight}

    return asyncio.run(main())


_CHILDREN = {"fluxrun": _fluxrun, "dbos": _dbos, "absurd": _absurd}


# -- the parent ------------------------------------------------------------------------------


def _new_pg_database(dsn: str) -> str:
    """A new database on the server of ``dsn`` (a postgresql:// URL); its URL."""
    import psycopg

    name = f"peers_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = dsn.partition("?")
    return base.rsplit("/", 1)[0] + "/" + name


def _absurd_init(python: str, url: str) -> None:
    ctl = Path(python).with_name("absurdctl")
    subprocess.run(
        [str(ctl), "init", "--database", url], check=True, capture_output=True, timeout=120
    )


def _child(python: str, engine: str, url: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(_ROOT)}
    done = subprocess.run(
        [python, "-m", "benchmarks.peers", "--child", engine, url],
        capture_output=True,
        text=True,
        timeout=1800,
        env=env,
        cwd=_ROOT,
    )
    lines = [x for x in done.stdout.splitlines() if x.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail) or f"exit {done.returncode}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _installed(python: str, module: str) -> bool:
    probe = subprocess.run([python, "-c", f"import {module}"], capture_output=True, timeout=120)
    return probe.returncode == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pg-dsn", default=os.environ.get("FLUXRUN_BENCH_PG_DSN"))
    parser.add_argument("--pg-start", action="store_true")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the peers")
    parser.add_argument("--child", nargs=2, metavar=("ENGINE", "URL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        engine, url = args.child
        print(json.dumps(_CHILDREN[engine](url)), flush=True)
        return 0

    server = None
    dsn = args.pg_dsn
    if dsn is None and args.pg_start:
        sys.path.insert(0, str(_ROOT / "tests"))
        from _pgserver import PostgresServer

        server = PostgresServer.start()
        dsn = server.dsn
    rows: list[tuple[str, str, dict[str, Any]]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="fluxrun-peers-") as tmp:
            plan: list[tuple[str, str, str]] = [
                ("fluxrun", "SQLite", f"sqlite:///{tmp}/fluxrun.db"),
                ("dbos", "SQLite", f"sqlite:///{tmp}/dbos.sqlite"),
            ]
            if dsn is not None:
                plan += [("fluxrun", "PostgreSQL", ""), ("dbos", "PostgreSQL", "")]
                plan += [("absurd", "PostgreSQL", "")]
            for engine, backend, url in plan:
                python = sys.executable if engine == "fluxrun" else args.python
                module = {"fluxrun": "fluxrun", "dbos": "dbos", "absurd": "absurd_sdk"}[engine]
                if not _installed(python, module):
                    rows.append((engine, backend, {"error": "not installed"}))
                    continue
                if not url:
                    assert dsn is not None
                    url = _new_pg_database(dsn)
                    if engine == "absurd":
                        _absurd_init(python, url)
                rows.append((engine, backend, _child(python, engine, url)))
    finally:
        if server is not None:
            server.stop()
    print(f"{STEPS}-step no-op workflows; sequential: {SEQUENTIAL} runs; in flight: {IN_FLIGHT}")
    print(f"  {'engine':<9} {'backend':<11} {'sequential wf/s':>16} {'in flight wf/s':>15}")
    for engine, backend, r in rows:
        if "error" in r:
            print(f"  {engine:<9} {backend:<11} {'—':>16} {'—':>15}  {r['error']}")
        else:
            print(f"  {engine:<9} {backend:<11} {r['sequential']:>16.1f} {r['in_flight']:>15.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
