"""Edge values read back the same on every backend, and the codec's rejections happen before
any store is touched.

Values go through :func:`fluxrun._codec.encode` exactly as the engine sends them, into every
JSON column a store has (a run's ``input``, a step's ``output``, ``changes`` and
``compensation_changes``), and must decode to the same value: same types, same float bits,
the sign of zero, and the order of object keys.
"""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
from typing import Any

import pytest
from contract_support import LONG_LEASE, at, decoded, make_run, make_step, same_value, typed

from fluxrun._codec import DEFAULT_MAX_SIZE, MAX_DEPTH, encode
from fluxrun._state import changes_text
from fluxrun.errors import SerializationError
from fluxrun.storage._base import ListQuery, RunRow, Store, Transition
from fluxrun.storage.postgres import PostgresStorage


def nested(depth: int, leaf: Any = "bottom") -> Any:
    """Lists and objects alternating, ``depth`` levels deep (the leaf's level included)."""
    value: Any = leaf
    for level in range(depth - 1):
        value = [value] if level % 2 else {"k": value}
    return value


EDGE_VALUES: dict[str, Any] = {
    "big_int": 2**200,
    "negative_big_int": -(2**200),
    "int64_edges": [2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64],
    "float_1e16": 1e16,
    "float_1e-7": 1e-7,
    "float_min_subnormal": 5e-324,
    "negative_zero": -0.0,
    "floats": [0.0, -0.0, 0.1, 2.0, -1.5, 1e16, 1e-7, 5e-324, 1.7976931348623157e308, 1e22],
    "float_precision": [0.1 + 0.2, 123456789.12345679, 2.0**-1074, 9007199254740993.0],
    "int_vs_float": {"i": 1, "f": 1.0, "b": True, "n": None},
    "emoji": "😀 👩‍👩‍👧‍👦 🇫🇷 🏳️‍🌈",
    "rtl": "שלום עולם مرحبا بالعالم \u202eevil\u202c",
    "combining": "e\u0301 n\u0303 a\u0308\u0304 Z\u0351\u0352\u0353",
    "other_unicode": "\ufeffbom \u200bzero-width \uffff \U0010ffff \U0001d518\U0001d52b",
    "escapes": 'quote " backslash \\ slash / \n \r \t \x01 \x1f \x7f \u2028 \u2029',
    "deep_150": nested(150),
    "empty_string": "",
    "empty_object": {},
    "empty_list": [],
    "empty_key": {"": ""},
    "empties": {"s": "", "o": {}, "l": [], "n": None, "ls": [[], {}, ""]},
    "tag_key": {"$flux": "float", "v": "1e16"},
    "typed": {
        "when": dt.datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=dt.UTC),
        "day": dt.date(1999, 12, 31),
        "money": decimal.Decimal("-1.10"),
        "id": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "pair": (1, "two", 3.0),
    },
    "long_text": "x" * 100_000,
}


async def store_everywhere(store: Store, run_id: str, value: Any) -> None:
    """Store ``value`` (encoded) in every JSON column of a new run."""
    text = encode(value)
    await store.create(make_run(run_id, input=text), lease_owner=None, lease_seconds=1)
    change = changes_text({"k": text}, ["gone"])
    step = make_step(0, output=text, changes=change, compensation_changes=change)
    await store.apply(
        Transition(run_id=run_id, expected_version=1, updated_at=at(1), insert_step=step)
    )


def values_in(row: RunRow) -> list[Any]:
    """Every stored copy of the value, decoded."""
    (step,) = row.steps
    return [
        decoded(row.input),
        decoded(step.output),
        decoded(step.changes)["set"]["k"],
        decoded(step.compensation_changes)["set"]["k"],
    ]


async def test_edge_values_read_back_equal(store: Store) -> None:
    for i, value in enumerate(EDGE_VALUES.values()):
        await store_everywhere(store, f"r{i}", value)
    listed = {r.id: r for r in await store.list_runs(ListQuery())}
    for i, (label, value) in enumerate(EDGE_VALUES.items()):
        loaded = await store.load(f"r{i}")
        assert loaded is not None
        for row in (loaded, listed[f"r{i}"]):
            for got in values_in(row):
                # Key order is checked on its own below.
                assert typed(got, sort_keys=True) == typed(value, sort_keys=True), label


async def test_object_key_order_is_kept(store: Store) -> None:
    # ctx.data and outputs are Python dicts: their key order is visible to steps and callers.
    # PostgreSQL stores JSON as jsonb, which orders object keys its own way: there the values
    # must still be equal (documented in docs/guide.md), only the order may differ.
    value = {"zeta": 1, "a": {"z": 1, "y": 2, "": 3, "longer key": 4}, "mm": [{"b": 1, "a": 2}]}
    await store_everywhere(store, "r1", value)
    loaded = await store.load("r1")
    assert loaded is not None
    for got in values_in(loaded):
        if isinstance(store, PostgresStorage):
            assert typed(got, sort_keys=True) == typed(value, sort_keys=True), got
        else:
            assert same_value(got, value), got
    (step,) = loaded.steps
    if not isinstance(store, PostgresStorage):
        assert list(decoded(step.changes)) == ["set", "del"]


async def test_every_edge_value_in_one_run(store: Store) -> None:
    await store_everywhere(store, "all", EDGE_VALUES)
    loaded = await store.load("all")
    assert loaded is not None
    for got in values_in(loaded):
        assert typed(got, sort_keys=True) == typed(EDGE_VALUES, sort_keys=True)


def _deeper_than_allowed() -> Any:
    return nested(MAX_DEPTH + 50)


BAD_VALUES: dict[str, Any] = {
    "nan": float("nan"),
    "inf": float("inf"),
    "minus_inf": float("-inf"),
    "nested_nan": {"a": [1, {"b": float("nan")}]},
    "decimal_nan": decimal.Decimal("NaN"),
    "decimal_inf": decimal.Decimal("-Infinity"),
    "nul": "a\x00b",
    "nul_in_key": {"k\x00": 1},
    "lone_high_surrogate": "\ud800",
    "lone_low_surrogate": "x\udfffy",
    "surrogate_in_key": {"\ud83d": 1},
    "int_key": {1: "x"},
    "tuple_key": {(1, 2): "x"},
    "too_deep": _deeper_than_allowed(),
    "too_big": "x" * (DEFAULT_MAX_SIZE + 1),
    "a_set": {1, 2},
    "bytes": b"raw",
    "an_object": object(),
}


async def test_rejected_values_never_reach_the_store(store: Store) -> None:
    await store.create(make_run("r1"), lease_owner=None, lease_seconds=LONG_LEASE)
    before = await store.load("r1")
    for label, value in BAD_VALUES.items():
        # As the engine does it: encode first, write only what encoded.
        with pytest.raises(SerializationError) as as_input:
            await store.create(
                make_run("r2", input=encode(value, what="input")), lease_owner=None, lease_seconds=1
            )
        with pytest.raises(SerializationError) as as_output:
            step = make_step(0, output=encode(value, what="output"))
            await store.apply(
                Transition(run_id="r1", expected_version=1, updated_at=at(1), insert_step=step)
            )
        # The message names where the value was, the same way whatever the backend.
        assert as_input.value.message.startswith("input"), label
        assert as_output.value.message.startswith("output"), label
    assert await store.load("r2") is None
    assert await store.load("r1") == before
    assert [r.id for r in await store.list_runs(ListQuery())] == ["r1"]
