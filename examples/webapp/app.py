"""A web app that starts and steers orders through a ``FluxClient`` while a separate
``fluxrun worker`` drives them (it needs ``pip install 'fluxrun[dashboard]'`` for Starlette
and Uvicorn)::

    FLUX_DB=orders.db fluxrun worker flows:engine &
    FLUX_DB=orders.db uvicorn app:app --port 8000

    curl -X POST localhost:8000/orders -d '{"items": ["bike"]}'      # {"id": "..."}
    curl -X POST localhost:8000/orders/<id>/approve -d '{"by": "ann"}'
    curl localhost:8000/orders/<id>                                  # status, data

The app imports no workflow code: it starts runs by name.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from flows import store
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from fluxrun import FluxClient, FluxError

client = FluxClient(store(), poll_interval=0.2)


async def _json(request: Request) -> object:
    try:
        return json.loads(await request.body() or b"null")
    except ValueError:
        return None


async def create_order(request: Request) -> JSONResponse:
    body = await _json(request)
    key = request.headers.get("Idempotency-Key")
    try:
        handle = await client.start("order", body, idempotency_key=key)
    except FluxError as exc:
        return JSONResponse({"error": exc.message}, status_code=400)
    return JSONResponse({"id": handle.id, "created": handle.created}, status_code=202)


async def approve(request: Request) -> JSONResponse:
    run_id = request.path_params["run_id"]
    body = await _json(request)
    by = body.get("by") if isinstance(body, dict) else None
    try:
        await client.send_signal(run_id, "approved", {"by": by}, dedupe_key="approve")
    except FluxError as exc:
        return JSONResponse({"error": exc.message}, status_code=409)
    return JSONResponse({"id": run_id, "approved": True}, status_code=202)


async def show(request: Request) -> JSONResponse:
    state = await client.get(request.path_params["run_id"])
    if state is None:
        return JSONResponse({"error": "no such order"}, status_code=404)
    return JSONResponse(
        {"id": state.id, "status": state.status.value, "data": state.data, "error": state.error}
    )


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with client:
        yield


app = Starlette(
    routes=[
        Route("/orders", create_order, methods=["POST"]),
        Route("/orders/{run_id}/approve", approve, methods=["POST"]),
        Route("/orders/{run_id}", show, methods=["GET"]),
    ],
    lifespan=lifespan,
)
