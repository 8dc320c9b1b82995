"""Child program of ``test_scheduler_crashes.py``: one engine process, driven by its scheduler.

Usage: ``python sched_child.py '<json config>'`` with the keys

* ``backend`` (``"sqlite"`` or ``"postgres"``), ``target`` (the SQLite file or the DSN);
* ``out``: a file this process appends its report lines to (the test polls it);
* engine settings: ``lease`` (default: the engine's default), ``poll``, ``close_timeout``;
* ``action``:

  - ``"serve"``: start the runs in ``starts`` (``[flow name, input]`` pairs), print
    ``STARTED <json list of run ids>``, then let the scheduler drive them until SIGTERM or
    SIGINT (or a kill);
  - ``"race_start"``: wait for the file ``barrier``, then start ``quick`` once per key of
    ``keys`` (all at once, with that idempotency key); print ``STARTS <json>`` (per key: run
    id, created), wait until every run finished (whoever drives it), print ``DONE``;
  - ``"race_signal"``: wait for ``barrier``, then ``send_signal`` ``go`` to every run of
    ``runs`` at once with the dedupe key ``"d-<run id>"`` and a payload naming this process;
    print ``SIGNALS <json>`` (per run: what ``send_signal`` returned) and ``DONE``.

It prints ``READY`` once its engine is up. SIGTERM and SIGINT end it cleanly: the handler
(``loop.add_signal_handler``) sets an event, ``main`` prints ``STOPPING`` (``serve``) and
leaves ``async with FluxEngine(...)``
(after ``close(timeout=close_timeout)`` when that is given), which releases every run this
process holds, and it prints ``CLOSED``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from sched_flows import FLOWS, make_storage, quick

from fluxrun import FluxEngine

_out = ""


def say(line: str) -> None:
    with open(_out, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")


async def _barrier(path: str) -> None:
    while not os.path.exists(path):
        await asyncio.sleep(0.001)


async def main(config: dict[str, Any]) -> None:
    global _out
    _out = config["out"]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    settings: dict[str, Any] = {"poll_interval": float(config.get("poll", 0.05))}
    if "lease" in config:
        settings["lease"] = float(config["lease"])
    engine = FluxEngine(storage=make_storage(config["backend"], config["target"]), **settings)
    for flow in FLOWS.values():
        engine.register(flow)
    async with engine:
        say(f"READY {os.getpid()}")
        action = config["action"]
        if action == "serve":
            ids = [(await engine.start(FLOWS[f], i)).id for f, i in config.get("starts", [])]
            say("STARTED " + json.dumps(ids))
            await stop.wait()
            # From here to close() setting the engine closing nothing yields to the loop:
            # once this line is written, no step this engine drives starts any more.
            say("STOPPING")
        elif action == "race_start":
            await _barrier(config["barrier"])
            handles = await asyncio.gather(
                *(
                    engine.start(quick, {"fx": config["fx"], "key": k}, idempotency_key=k)
                    for k in config["keys"]
                )
            )
            say(
                "STARTS "
                + json.dumps(
                    {k: [h.id, h.created] for k, h in zip(config["keys"], handles, strict=True)}
                )
            )
            await asyncio.gather(*(h.result(timeout=120) for h in handles))
            say("DONE")
        elif action == "race_signal":
            await _barrier(config["barrier"])
            runs = config["runs"]
            sent = await asyncio.gather(
                *(
                    engine.send_signal(r, "go", {"run": r, "pid": os.getpid()}, dedupe_key=f"d-{r}")
                    for r in runs
                )
            )
            say("SIGNALS " + json.dumps(dict(zip(runs, sent, strict=True))))
            say("DONE")
        else:
            raise ValueError(f"unknown action {action!r}")
        if "close_timeout" in config:
            await engine.close(timeout=float(config["close_timeout"]))
    say("CLOSED")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(main(json.loads(sys.argv[1])))
