"""``ctx.data`` pays for what a step touched (``fluxrun._data``): the keys a step reads,
writes or deletes are compared after it, the others are not looked at; whatever a step
changes through ``ctx.data`` (in place, after reading a value, or by any dict method) is
saved. A Hypothesis property drives random operations through real runs and checks the
stored data (replayed from the step rows) against a plain-dict model."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fluxrun import (
    FluxEngine,
    MemoryStorage,
    WorkflowContext,
    WorkflowStatus,
    _data,
    create_workflow,
)
from fluxrun._data import WatchedDict

KEYS = ["a", "b", "c", "d"]


def test_reads_writes_and_deletes_are_noted_one_by_one() -> None:
    d = WatchedDict({"a": 1, "b": [1], "c": 3})
    assert d["b"] == [1] and d.get("zz") is None
    d["x"] = 1
    del d["a"]
    d.setdefault("y", 2)
    d.pop("c")
    assert d.touched == {"b", "zz", "x", "a", "y", "c"} and not d.everything
    d.forget()
    assert "b" in d and len(d) == 3 and sorted(d) == ["b", "x", "y"]
    assert d.touched == set()  # membership, length and the keys expose no value


@pytest.mark.parametrize(
    "take_all",
    [
        lambda d: list(d.values()),
        lambda d: list(d.items()),
        lambda d: d.copy(),
        lambda d: dict(d),
        lambda d: {**d},
        lambda d: {}.update(d),
        lambda d: d | {},
        lambda d: d.update(z=1),
        lambda d: d.clear(),
    ],
)
def test_taking_every_value_is_noted(take_all: Any) -> None:
    d = WatchedDict({"a": [1], "b": [2]})
    take_all(d)
    assert d.everything or d.touched == {"a", "b"}


async def test_a_step_that_touches_one_key_looks_at_one_key(monkeypatch: Any) -> None:
    looked: list[Any] = []
    real = _data._fingerprint

    def counting(value: Any) -> Any:
        looked.append(value)
        return real(value)

    def fill(ctx: WorkflowContext) -> None:
        for i in range(1000):
            ctx.data[f"k{i}"] = {"n": i, "tags": ["x"] * 3}

    def touch_one(ctx: WorkflowContext) -> None:
        ctx.data["k7"]["tags"].append("y")

    flow = (
        create_workflow("big")
        .step("fill", fill)
        .step("one", touch_one)
        .step("none", lambda ctx: None)
    )
    async with FluxEngine(storage=MemoryStorage()) as engine:
        monkeypatch.setattr(_data, "_fingerprint", counting)
        result = await engine.execute(flow)
    assert result.status is WorkflowStatus.COMPLETED
    assert result.data["k7"]["tags"] == ["x", "x", "x", "y"]
    # fill: 1000 keys; one: 1 key; none: 0 keys (a step that does not touch ctx.data).
    assert len(looked) == 1001


def _apply(data: dict[str, Any], op: tuple[str, str, int]) -> None:
    kind, key, n = op
    if kind == "set":
        data[key] = {"n": n, "items": [n]}
    elif kind == "mutate":  # read, then change in place
        if key in data and isinstance(data[key], dict):
            data[key]["items"].append(n)
    elif kind == "get_mutate":
        value = data.get(key)
        if isinstance(value, dict):
            value["n"] = n
    elif kind == "delete":
        data.pop(key, None)
    elif kind == "setdefault":
        data.setdefault(key, {"n": n, "items": []})["items"].append(-n)
    elif kind == "values":  # change every value through a view
        for value in data.values():
            if isinstance(value, dict):
                value["n"] += 1
    elif kind == "update":
        data.update({key: {"n": n, "items": []}})


OPS = st.tuples(
    st.sampled_from(["set", "mutate", "get_mutate", "delete", "setdefault", "values", "update"]),
    st.sampled_from(KEYS),
    st.integers(0, 9),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(st.lists(OPS, max_size=6), min_size=1, max_size=4))
def test_whatever_a_step_changes_is_saved(steps: list[list[tuple[str, str, int]]]) -> None:
    import asyncio

    model: dict[str, Any] = {}
    for ops in steps:
        for op in ops:
            _apply(model, op)

    flow = create_workflow("ops")
    for i, ops in enumerate(steps):

        def run(ctx: WorkflowContext, ops: list[tuple[str, str, int]] = ops) -> None:
            for op in ops:
                _apply(ctx.data, op)

        flow = flow.step(f"s{i}", run)

    async def go() -> tuple[Any, Any]:
        async with FluxEngine(storage=MemoryStorage()) as engine:
            result = await engine.execute(flow)
            stored = await engine.get(result.id)  # replayed from the step rows
            assert stored is not None
            return result.data, stored.data

    live, stored = asyncio.run(go())
    assert live == model
    assert stored == copy.deepcopy(model)
