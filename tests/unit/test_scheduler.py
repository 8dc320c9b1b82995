"""The scheduling loop's own bookkeeping (``fluxrun._scheduler``): recover() and the loop."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from conftest import EngineFactory

from fluxrun import create_workflow
from fluxrun.storage._base import Store

HANG = 30.0


async def test_recover_waits_for_the_runs_of_a_claim_the_loop_has_in_flight(
    engine_factory: EngineFactory, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The loop had claimed the run in the store but not yet started driving it when
    # recover() looked: recover() found nothing due and nothing in flight, and returned
    # without the run's outcome (a flaky "never became recoverable" in the round-trip test).
    claimed = asyncio.Event()
    go_on = asyncio.Event()
    claim_due = store.claim_due
    calls = 0

    async def slow_first_claim(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        rows = await claim_due(*args)
        if calls == 1 and rows:
            claimed.set()
            await go_on.wait()
        return rows

    monkeypatch.setattr(store, "claim_due", slow_first_claim)
    engine = await engine_factory(poll_interval=0.02)
    flow = create_workflow("claimed").step("only", lambda ctx: None)
    engine.register(flow)
    await engine.start(flow)
    await asyncio.wait_for(claimed.wait(), HANG)
    recovering = asyncio.ensure_future(engine.recover())
    await asyncio.sleep(0.05)  # recover() looks meanwhile (a slow machine only weakens this)
    go_on.set()
    results = await asyncio.wait_for(recovering, HANG)
    assert [r.status.value for r in results] == ["completed"]
