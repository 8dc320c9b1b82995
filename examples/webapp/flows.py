"""The workflows of the web app example, and the engine a worker runs::

    FLUX_DB=orders.db fluxrun worker flows:engine

(``FLUX_DSN=postgresql://...`` instead of ``FLUX_DB`` for PostgreSQL.)
"""

from __future__ import annotations

import os

from fluxrun import FluxEngine, SQLiteStorage, WorkflowContext, create_workflow, wait
from fluxrun.storage._base import Store


def reserve(ctx: WorkflowContext) -> None:
    ctx.data["reserved"] = list(ctx.input["items"])


def await_approval(ctx: WorkflowContext) -> object:
    return wait("approved")


def ship(ctx: WorkflowContext) -> None:
    ctx.data["shipped_by"] = ctx.signals["approved"]["by"]


def release(ctx: WorkflowContext) -> None:
    ctx.data.pop("reserved", None)


order = (
    create_workflow("order")
    .input(lambda raw: isinstance(raw, dict) and bool(raw.get("items")))
    .step("reserve", reserve, compensate=release)
    .step("await approval", await_approval)
    .step("ship", ship)
)


def store() -> Store:
    """The store the app and the worker share (from the environment)."""
    dsn = os.environ.get("FLUX_DSN")
    if dsn:
        from fluxrun import PostgresStorage

        return PostgresStorage(dsn)
    return SQLiteStorage(os.environ.get("FLUX_DB", "orders.db"))


def engine() -> FluxEngine:
    """The worker's engine (``fluxrun worker flows:engine``)."""
    made = FluxEngine(storage=store(), poll_interval=0.2)
    made.register(order)
    return made
