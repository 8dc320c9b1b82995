"""The ``fluxrun`` command (standard library ``argparse``; no extra needed).

``fluxrun worker MODULE:ATTR [--concurrency N]`` runs the scheduler of the engine named by
``MODULE:ATTR`` until SIGTERM or SIGINT, then drains it: runs stop at their next step
boundary and are released, so another worker continues them at once.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

from ._engine import FluxEngine
from .errors import FluxError

__all__ = ["main"]

_EPILOG_WORKER = """\
example:
  fluxrun worker myapp.flows:engine --concurrency 16

MODULE is imported (the current directory is on the path) and ATTR must be a FluxEngine,
or a function of no arguments returning one; its registered workflows are the ones this
worker drives. SIGTERM or SIGINT (Ctrl-C) drains it: the steps running finish (at most
--drain seconds), their runs are released for other workers, and it exits 0.
"""


class CliError(FluxError):
    """A command line that cannot be carried out (exit status 2)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fluxrun", description="fluxrun: durable workflows, from the command line."
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    worker = verbs.add_parser(
        "worker",
        help="run an engine's scheduler as a long-lived worker process",
        description="Claim and drive the due runs of an engine's registered workflows until "
        "SIGTERM/SIGINT, then drain and release them.",
        epilog=_EPILOG_WORKER,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    worker.add_argument("target", metavar="MODULE:ATTR", help="where the FluxEngine is")
    worker.add_argument(
        "--concurrency",
        type=int,
        default=None,
        metavar="N",
        help="runs driven at once (default: the engine's max_concurrent_runs)",
    )
    worker.add_argument(
        "--drain",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long a stop waits for running steps before cutting async ones short (30)",
    )
    return parser


def load_engine(target: str) -> FluxEngine:
    """The engine ``MODULE:ATTR`` names (ATTR may be a function that returns one)."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise CliError(f"expected MODULE:ATTR (e.g. myapp.flows:engine), got {target!r}")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module may fail any way while it loads
        raise CliError(f"cannot import module {module_name!r}: {exc!r}") from exc
    found: Any = module
    for part in attr.split("."):
        if not hasattr(found, part):
            raise CliError(f"module {module_name!r} has no attribute {attr!r}")
        found = getattr(found, part)
    if callable(found) and not isinstance(found, FluxEngine):
        try:
            found = found()
        except Exception as exc:
            raise CliError(f"{target}() failed: {exc!r}") from exc
    if not isinstance(found, FluxEngine):
        raise CliError(f"{target} is a {type(found).__name__}, not a FluxEngine")
    return found


async def run_worker(engine: FluxEngine, *, concurrency: int | None, drain: float) -> None:
    """Drive ``engine``'s due runs until SIGTERM/SIGINT, then drain and close it."""
    if concurrency is not None:
        engine._scheduler.set_max(concurrency)
    log = logging.getLogger("fluxrun.worker")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await engine.init()
    names = ", ".join(engine._registry.names) or "none"
    log.info(
        "worker %s on %s (pid %d) driving workflows: %s",
        engine.owner,
        socket.gethostname(),
        os.getpid(),
        names,
    )
    print(f"fluxrun worker {engine.owner} ready; workflows: {names}", flush=True)
    try:
        await stop.wait()
    finally:
        print("fluxrun worker stopping: draining", flush=True)
        await engine.close(timeout=drain)
        print("fluxrun worker stopped", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fluxrun`` command; the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        if args.concurrency is not None and args.concurrency < 1:
            raise CliError(f"--concurrency must be at least 1, got {args.concurrency}")
        if not args.drain >= 0:
            raise CliError(f"--drain must be seconds >= 0, got {args.drain}")
        engine = load_engine(args.target)
        asyncio.run(run_worker(engine, concurrency=args.concurrency, drain=args.drain))
    except CliError as exc:
        print(f"fluxrun: error: {exc.message}", file=sys.stderr)
        return 2
    except FluxError as exc:
        print(f"fluxrun: error: {exc}", file=sys.stderr)
        return 1
    return 0
