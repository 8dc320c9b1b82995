"""Hostile names, ids and filter values: stored and matched exactly, never executed.

Every value is bound, never spliced into SQL, so a workflow named like an injection is just a
name, a ``%`` or ``_`` matches only itself (no ``LIKE`` semantics), matching is exact (case,
trailing spaces and Unicode normalisation all count), and the schema is the same afterwards.
"""

from __future__ import annotations

import asyncio

import pytest
from contract_support import LONG_LEASE, Backend, at, make_run, make_step, norm

from fluxrun.storage._base import Claim, ListQuery, Store, Transition

#: Longest workflow name and run id the engine accepts (``validate_text`` limits).
MAX_NAME = 200
MAX_ID = 1000

INJECTION = "'; DROP TABLE flux_runs;--"

HOSTILE = [
    INJECTION,
    "'; DROP TABLE flux_steps;--",
    "x'); DELETE FROM flux_runs; --",
    '"; DELETE FROM flux_runs WHERE "1"="1',
    "' OR '1'='1",
    "' OR 1=1 --",
    "%",
    "_",
    "\\",
    "%%",
    "%_%",
    "a%",
    "a_c",
    "abc",
    "ABC",
    "abc ",
    " abc",
    "a\\%",
    "a\\_c",
    "a\\\\c",
    "[a-z]*",
    "*",
    "?",
    "$1",
    ":name",
    "%s",
    "{0}",
    "'",
    "''",
    '"',
    "`",
    ";",
    "--",
    "/*",
    "O'Brien",
    "名前",
    "😀",
    "שלום",
    "\u202eevil",
    "é",  # precomposed
    "e\u0301",  # the same letter, decomposed
    "ß",
    "ss",
    "tab\there",
    "new\nline",
    "\uff21\uff22\uff23",  # fullwidth ABC
    "n" * MAX_NAME,
    INJECTION * (MAX_NAME // len(INJECTION)),
]

HOSTILE_IDS = [
    INJECTION,
    "%",
    "_",
    "\\",
    "' OR '1'='1",
    "😀/..\\'\"",
    "i" * MAX_ID,
    (INJECTION * 100)[:MAX_ID],
    ("%_" * MAX_ID)[:MAX_ID],
]

TEN_KB = ["x" * 10_240, "%" * 10_240, (INJECTION * 500)[:10_240], "_" * 10_240]


async def renew(store: Store, owner: str, fences: dict[str, int]) -> set[str]:
    """Renew from a thread of its own, as the engine's lease keeper does."""
    return (await asyncio.to_thread(store.renew_leases, owner, fences, LONG_LEASE)).lost


async def seed(store: Store) -> dict[str, list[str]]:
    """One run per hostile name (two for the first), created oldest first; name -> ids."""
    by_name: dict[str, list[str]] = {}
    for i, name in enumerate([HOSTILE[0], *HOSTILE]):
        run_id = f"run-{i:03d}"
        await store.create(
            make_run(run_id, name=name, created=i), lease_owner=None, lease_seconds=1
        )
        by_name.setdefault(name, []).insert(0, run_id)  # newest first
    return by_name


async def test_names_are_matched_exactly(store: Store, backend: Backend) -> None:
    schema = backend.schema()
    by_name = await seed(store)
    assert len(by_name) == len(HOSTILE)
    for name in HOSTILE:
        got = await store.list_runs(ListQuery(name=name))
        assert [r.id for r in got] == by_name[name], name
        assert all(r.name == name for r in got)
    # Values that match no stored name: wildcards must not widen the match.
    for name in ["a", "abcd", "ab", "%abc%", "a%c", "x", "Abc", "SS", "名", *TEN_KB]:
        assert await store.list_runs(ListQuery(name=name)) == [], name[:40]
    assert len(await store.list_runs(ListQuery())) == len(HOSTILE) + 1
    assert backend.schema() == schema


async def test_find_recoverable_matches_names_exactly(store: Store, backend: Backend) -> None:
    schema = backend.schema()
    by_name = await seed(store)
    for name in HOSTILE:
        found = await store.find_recoverable([name], 100)
        assert sorted(r.id for r in found) == sorted(by_name[name]), name
    found = await store.find_recoverable(["%", "_", INJECTION, *TEN_KB], 100)
    expected = by_name["%"] + by_name["_"] + by_name[INJECTION]
    assert sorted(r.id for r in found) == sorted(expected)
    assert len(await store.find_recoverable(HOSTILE, 1000)) == len(HOSTILE) + 1
    assert backend.schema() == schema


async def test_hostile_ids_are_stored_loaded_and_deleted_exactly(
    store: Store, backend: Backend
) -> None:
    schema = backend.schema()
    for i, run_id in enumerate(HOSTILE_IDS):
        await store.create(
            make_run(run_id, name=f"n{i}", created=i), lease_owner="w", lease_seconds=LONG_LEASE
        )
        await store.apply(
            Transition(
                run_id=run_id,
                expected_version=1,
                updated_at=at(50),
                fence=1,
                insert_step=make_step(0),
            )
        )
    for i, run_id in enumerate(HOSTILE_IDS):
        row = await store.load(run_id)
        assert row is not None and (row.id, row.name, len(row.steps)) == (run_id, f"n{i}", 1)
    # Lookalikes of stored ids find nothing.
    for probe in ["%%", "i" * (MAX_ID - 1), "I" * MAX_ID, INJECTION.upper(), *TEN_KB]:
        assert await store.load(probe) is None
        assert await store.delete(probe) is False
    lost = await renew(store, "w", dict.fromkeys(HOSTILE_IDS, 1))
    assert lost == set()
    assert await renew(store, "w", {"%": 2, "_": 1}) == {"%"}
    # A live lease protects a run from deletion: let go of them first.
    for run_id in HOSTILE_IDS:
        await store.apply(
            Transition(run_id=run_id, expected_version=2, updated_at=at(60), fence=1, release=True)
        )
    # Deleting one removes exactly that one.
    for gone, run_id in enumerate(HOSTILE_IDS, start=1):
        assert await store.delete(run_id) is True
        remaining = {r.id for r in await store.list_runs(ListQuery())}
        assert remaining == set(HOSTILE_IDS[gone:])
    assert backend.schema() == schema


async def test_hostile_text_in_every_text_column(store: Store, backend: Backend) -> None:
    schema = backend.schema()
    for i, text in enumerate(HOSTILE):
        run_id = f"r{i}"
        run = make_run(
            run_id,
            name=text,
            step_names=(text, "ok", text[::-1] or "x"),
            definition_version=text,
            error=text,
            wait_name=text,
        )
        await store.create(run, lease_owner=None, lease_seconds=1)
        step = make_step(0, name=text, status="suspended", waiting_for=text, error=text)
        await store.apply(
            Transition(
                run_id=run_id,
                expected_version=1,
                updated_at=at(60),
                claim=Claim(owner=text, lease_seconds=LONG_LEASE),
                insert_step=step,
                error=text + "!",
                wait_name=text + "?",
            )
        )
        row = await store.load(run_id)
        assert row is not None
        assert (row.name, row.step_names, row.definition_version) == (
            text,
            run.step_names,
            text,
        )
        assert (row.error, row.wait_name, row.owner) == (text + "!", text + "?", text)
        assert norm(row.steps) == norm((step,))
        assert await renew(store, text, {run_id: 2}) == set()
        assert await renew(store, text + " ", {run_id: 2}) == {run_id}
    assert backend.schema() == schema


@pytest.mark.parametrize("name", ["%", "_", INJECTION, "\\"])
async def test_wildcard_names_do_not_reach_other_runs(store: Store, name: str) -> None:
    # Only the run whose name is exactly ``name`` may be listed, recovered or counted.
    for i, other in enumerate(["abc", "a_c", "a%c", "\\\\", "", name + name, name]):
        if other:
            await store.create(
                make_run(f"r{i}", name=other, created=i), lease_owner=None, lease_seconds=1
            )
    assert [r.name for r in await store.list_runs(ListQuery(name=name))] == [name]
    assert [r.name for r in await store.find_recoverable([name], 10)] == [name]
