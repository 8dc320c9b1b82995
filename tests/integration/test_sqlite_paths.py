"""SQLiteStorage and the path it is given: a file in a missing directory is an error that
names the path (it creates no directories); a missing file in an existing directory is
created."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from fluxrun import FluxEngine, SQLiteStorage, StorageError, create_workflow
from fluxrun.storage._base import RunRow


async def test_a_path_in_a_missing_directory_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir"
    path = missing / "runs.db"
    store = SQLiteStorage(path)
    with pytest.raises(StorageError) as info:
        await store.init()
    assert str(path) in str(info.value) and "does not exist" in str(info.value)
    # Any first use says the same, and nothing was created on the way.
    with pytest.raises(StorageError, match="does not exist") as load:
        await store.load("r1")
    assert load.value.workflow_id == "r1" and "'r1'" in str(load.value)
    with pytest.raises(StorageError, match="does not exist"):
        store.renew_leases("me", {"r1": 1}, 30)
    assert not (tmp_path / "no").exists()
    await store.close()


async def test_an_engine_on_a_missing_directory_fails_at_init(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "runs.db"
    flow = create_workflow("noop").step("a", lambda ctx: None).build()
    engine = FluxEngine(storage=SQLiteStorage(path))
    with pytest.raises(StorageError, match="does not exist"):
        await engine.execute(flow, None)
    assert not path.parent.exists()


async def test_a_missing_file_in_an_existing_directory_is_created(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    store = SQLiteStorage(str(path))
    try:
        await store.init()
        t0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
        run = RunRow("r1", "wf", "pending", "{}", ("a",), 0, t0, t0, 1, 1)
        await store.create(run, lease_owner=None, lease_seconds=1)
        assert await store.load("r1") == run
    finally:
        await store.close()
    assert path.is_file()


async def test_a_relative_path_in_the_working_directory_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = SQLiteStorage("runs.db")
    try:
        await store.init()
    finally:
        await store.close()
    assert (tmp_path / "runs.db").is_file()
