"""Child program of ``test_recovery.py``: one engine on a SQLite file, one action.

Usage: ``python recovery_child.py '<json config>'`` with the keys

* ``db``: the SQLite file; ``lease``: lease seconds; ``max_recoveries``: engine setting;
* ``clock``: optional path of a :class:`recovery_flows.FileClock` the store reads its time
  from (shared with the test, which moves it);
* ``action``: ``"execute"`` (start ``flow`` with ``input`` and drive it), ``"signal"``
  (send ``go`` with ``payload`` to run ``run_id`` of ``flow`` and drive it on) or
  ``"recover"`` (``engine.recover()``: finish every unfinished run no live lease protects);
* ``flow``: ``"saga"`` or ``"waiter"`` (see ``recovery_flows.py``);
* ``then``: ``"kill"`` to SIGKILL itself after the action returned.

On a normal end it prints one JSON line: the statuses of the runs it finished.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from recovery_flows import CHILD_ENV, FileClock, saga, store_on, waiter

from fluxrun import FluxEngine, RetryPolicy

FLOWS = {"saga": saga, "waiter": waiter}


async def main(config: dict[str, Any]) -> None:
    os.environ[CHILD_ENV] = "1"
    clock = config.get("clock")
    storage = store_on(config["db"], None if clock is None else FileClock(clock))
    engine = FluxEngine(
        storage=storage,
        lease=float(config["lease"]),
        max_recoveries=int(config.get("max_recoveries", 5)),
        retry_policy=RetryPolicy(initial_delay=0, jitter=False),
    )
    for flow in FLOWS.values():
        engine.register(flow)
    statuses: list[str] = []
    if config["action"] == "recover":
        statuses += [r.status.value for r in await engine.recover()]
    elif config["action"] == "signal":
        result = await engine.signal(
            FLOWS[config["flow"]], config["run_id"], "go", config.get("payload")
        )
        statuses.append(result.status.value)
    else:
        result = await engine.execute(FLOWS[config["flow"]], config["input"])
        statuses.append(result.status.value)
    if config.get("then") == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    await engine.close()
    print(json.dumps({"statuses": statuses}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
