"""Bad input to the calls of SPEC §5 (start, handle, send_signal, cancel, pause, unpause,
FakeClock): a clear FluxError, and nothing stored."""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import fluxrun as f
from fluxrun.testing import FakeClock

flow = f.create_workflow("w").step("s", lambda ctx: None)

BAD: list[tuple[str, Callable[[f.FluxEngine], Awaitable[Any]], type[f.FluxError]]] = [
    ("negative delay", lambda e: e.start(flow, delay=-1), f.InvalidArgumentError),
    ("text delay", lambda e: e.start(flow, delay="1s"), f.InvalidArgumentError),
    ("huge delay", lambda e: e.start(flow, delay=10**12), f.InvalidArgumentError),
    ("int id", lambda e: e.start(flow, id=5), f.InvalidArgumentError),  # type: ignore[arg-type]
    ("empty id", lambda e: e.execute(flow, id=""), f.InvalidArgumentError),
    ("int key", lambda e: e.start(flow, idempotency_key=3), f.InvalidArgumentError),  # type: ignore[arg-type]
    ("int run id", lambda e: e.send_signal(5, "x"), f.InvalidArgumentError),  # type: ignore[arg-type]
    ("int signal", lambda e: e.send_signal("r", 7), f.InvalidArgumentError),  # type: ignore[arg-type]
    ("int dedupe", lambda e: e.send_signal("r", "x", dedupe_key=4), f.InvalidArgumentError),  # type: ignore[arg-type]
    ("unknown run", lambda e: e.send_signal("nope", "x"), f.WorkflowNotFoundError),
    ("int reason", lambda e: e.cancel("r", reason=5), f.InvalidArgumentError),  # type: ignore[arg-type]
    ("cancel unknown", lambda e: e.cancel("nope"), f.WorkflowNotFoundError),
    ("pause None", lambda e: e.pause(None), f.InvalidArgumentError),  # type: ignore[arg-type]
    ("unpause unknown", lambda e: e.unpause("nope"), f.WorkflowNotFoundError),
    ("result unknown", lambda e: e.handle("nope").result(), f.WorkflowNotFoundError),
    ("negative timeout", lambda e: e.handle("x").result(timeout=-1), f.InvalidArgumentError),
]


@pytest.mark.parametrize(("what", "call", "error"), BAD, ids=[b[0] for b in BAD])
async def test_bad_input_is_refused_and_nothing_is_stored(
    what: str, call: Callable[[f.FluxEngine], Awaitable[Any]], error: type[f.FluxError]
) -> None:
    async with f.FluxEngine() as engine:
        with pytest.raises(error):
            await call(engine)
        assert await engine.list() == []


def test_handle_needs_a_text_id() -> None:
    with pytest.raises(f.InvalidArgumentError):
        f.FluxEngine().handle(4)  # type: ignore[arg-type]


async def test_a_fake_clock_does_not_go_back() -> None:
    clock = FakeClock()
    with pytest.raises(f.InvalidArgumentError):
        await clock.advance(-1)
    with pytest.raises(f.InvalidArgumentError):
        await clock.advance(dt.timedelta(seconds=-1))


def test_a_clock_that_is_not_a_clock_is_refused() -> None:
    with pytest.raises(f.InvalidArgumentError):
        f.FluxEngine(clock=object())  # type: ignore[arg-type]
    with pytest.raises(f.InvalidArgumentError):
        f.FluxEngine(max_concurrent_runs=0)
    with pytest.raises(f.InvalidArgumentError):
        f.FluxEngine(poll_interval=0)
