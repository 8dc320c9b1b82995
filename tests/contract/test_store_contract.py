"""The store protocol on every backend: the importable contract
(``fluxrun.testing.store_contract``), run here the way a user runs it on a store of theirs."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from contract_support import Backend, open_store

from fluxrun.storage._base import Store
from fluxrun.testing.store_contract import *  # noqa: F403  (collects the contract's tests)


@pytest.fixture
async def others(backend: Backend) -> AsyncIterator[list[Store]]:
    """Three more stores on the same database (the same store for memory)."""
    if backend.kind == "memory":
        yield [backend.store] * 3
        return
    opened = [await open_store(backend.kind, backend.location) for _ in range(3)]
    try:
        yield opened
    finally:
        for s in opened:
            await s.close()
