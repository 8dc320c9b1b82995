"""SPEC §7, workers record themselves: every engine whose scheduler runs is listed by
``engine.workers()`` / ``FluxClient.workers()`` with its host, pid, workflows, concurrency,
runs held, start and last heartbeat; a clean close marks it stopped. On every store."""

from __future__ import annotations

import os
import socket

from sched_support import Engines, until

from fluxrun import FluxClient, WorkerInfo, create_workflow


async def test_engines_record_themselves_and_their_stop(engines: Engines) -> None:
    flow = create_workflow("listed").step("a", lambda ctx: None)
    first = await engines.open(max_concurrent_runs=3)
    first.register(flow)
    second = await engines.open()
    client = FluxClient(await engines.store())
    await client.init()
    try:

        async def both() -> dict[str, WorkerInfo] | None:
            seen = {w.id: w for w in await client.workers()}
            return seen if {first.owner, second.owner} <= set(seen) else None

        seen = await until(both, "both engines recorded")
        mine = seen[first.owner]
        assert (mine.host, mine.pid, mine.stopped_at) == (socket.gethostname(), os.getpid(), None)
        assert mine.concurrency == 3
        await first.close()
        after = {w.id: w for w in await second.workers()}
        assert after[first.owner].stopped_at is not None
        assert after[second.owner].stopped_at is None
    finally:
        await client.close()
