"""PostgresStorage when things go wrong outside it: a server that stops answering (its
processes frozen with SIGSTOP) and a store shared by two event loops. Each must end in a
StorageError that says what happened, never in a hang."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest
from _pgserver import PostgresServer, PostgresServerError

from fluxrun import PostgresStorage, StorageError
from fluxrun.storage._base import RunRow, Transition

T0 = dt.datetime(2024, 5, 17, 8, 30, tzinfo=dt.UTC)
WRONG_LOOP = "bound to the event loop that first used it"


def _run(run_id: str) -> RunRow:
    return RunRow(
        id=run_id,
        name="wf",
        status="running",
        input="{}",
        step_names=("a",),
        current_step=0,
        created_at=T0,
        updated_at=T0,
        version=1,
        fence=1,
    )


# -- one store, two event loops ---------------------------------------------------------------


def _in_thread(target: object) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            target()  # type: ignore[operator]
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


@pytest.mark.timeout(120)
def test_a_store_used_from_a_second_event_loop_is_refused(fresh_pg_dsn: str) -> None:
    # As with two SyncFluxEngines in two threads sharing one store: each thread runs its own
    # loop, and the pool belongs to the loop that opened it.
    store = PostgresStorage(fresh_pg_dsn)
    opened, finished = threading.Event(), threading.Event()
    refused: list[StorageError] = []

    def first() -> None:
        async def main() -> None:
            await store.init()
            await store.create(_run("r1"), lease_owner=None, lease_seconds=30)
            opened.set()
            await asyncio.to_thread(finished.wait, 60)
            # The first loop keeps working, then closes the store.
            assert await store.load("r1") is not None
            await store.close()

        asyncio.run(main())

    def second() -> None:
        assert opened.wait(60)
        try:
            for call in (store.load("r1"), store.delete("r1"), store.init()):
                try:
                    asyncio.run(call)
                except StorageError as exc:
                    refused.append(exc)
        finally:
            finished.set()

    one, one_errors = _in_thread(first)
    two, two_errors = _in_thread(second)
    two.join(60)
    one.join(60)
    assert not one.is_alive() and not two.is_alive(), "a thread hung"
    assert one_errors == [] and two_errors == []
    assert len(refused) == 3, refused
    assert all(WRONG_LOOP in str(e) and "one store per event loop" in str(e) for e in refused)


@pytest.mark.timeout(120)
def test_a_store_is_refused_on_a_later_event_loop_too(fresh_pg_dsn: str) -> None:
    store = PostgresStorage(fresh_pg_dsn)

    async def start() -> None:
        await store.init()
        await store.create(_run("r1"), lease_owner=None, lease_seconds=30)

    asyncio.run(start())
    for call in (store.load, store.list_attempts):
        with pytest.raises(StorageError, match=WRONG_LOOP) as info:
            asyncio.run(call("r1"))
        assert info.value.workflow_id == "r1" and "'r1'" in str(info.value)
    # Closing from another loop lets go of the store instead of hanging; it stays closed.
    asyncio.run(store.close())
    with pytest.raises(StorageError, match="closed"):
        asyncio.run(store.load("r1"))


@pytest.mark.timeout(120)
def test_closing_from_another_event_loop_closes_the_pool_on_its_own(fresh_pg_dsn: str) -> None:
    store = PostgresStorage(fresh_pg_dsn)
    opened, closed = threading.Event(), threading.Event()
    after: list[BaseException] = []

    def owner() -> None:
        async def main() -> None:
            await store.init()
            opened.set()
            await asyncio.to_thread(closed.wait, 60)
            try:
                await store.load("r1")
            except StorageError as exc:
                after.append(exc)

        asyncio.run(main())

    thread, errors = _in_thread(owner)
    assert opened.wait(60)
    asyncio.run(store.close())  # runs the pool's close on the owner's loop
    closed.set()
    thread.join(60)
    assert not thread.is_alive() and errors == []
    assert len(after) == 1 and "closed" in str(after[0])


# -- a frozen server --------------------------------------------------------------------------


@pytest.fixture
def own_server() -> Iterator[PostgresServer]:
    """A throwaway server of this test's own: freezing it disturbs no other test."""
    try:
        server = PostgresServer.start()
    except PostgresServerError as exc:
        if os.environ.get("FLUXRUN_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"cannot start a PostgreSQL server: {exc}")
        pytest.skip(f"cannot start a PostgreSQL server: {exc}")
    try:
        yield server
    finally:
        server.stop()


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/stat") as f:
                    # "pid (comm) state ppid ...": comm may hold spaces, so split after ")".
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                if ppid == pid:
                    found.append(int(entry))
    return found


@contextlib.contextmanager
def frozen(server: PostgresServer) -> Iterator[None]:
    """Every process of the server stopped (SIGSTOP), then continued, whatever happens.

    Each backend is a session leader of its own, so they are stopped one by one (after the
    postmaster, which then starts no new ones).
    """
    if not os.path.isdir("/proc"):
        pytest.skip("needs /proc to find the server's processes")
    postmaster = int((server.datadir / "postmaster.pid").read_text().splitlines()[0])
    stopped = [postmaster]
    os.kill(postmaster, signal.SIGSTOP)
    try:
        for pid in _children(postmaster):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
        yield
    finally:
        for pid in reversed(stopped):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


@pytest.mark.postgres
@pytest.mark.timeout(180)
async def test_a_frozen_server_gives_storage_errors_not_hangs(own_server: PostgresServer) -> None:
    store = PostgresStorage(own_server.dsn, query_timeout=1, min_size=1, max_size=2)
    try:
        await _freeze_and_thaw(own_server, store)
    finally:
        await store.close()


async def _freeze_and_thaw(server: PostgresServer, store: PostgresStorage) -> None:
    await store.init()
    await store.create(_run("r1"), lease_owner="me", lease_seconds=300)
    assert (await asyncio.to_thread(store.renew_leases, "me", {"r1": 1}, 300)).lost == set()
    with frozen(server):
        with pytest.raises(StorageError, match="load") as load:
            await store.load("r1")
        assert load.value.workflow_id == "r1" and "'r1'" in str(load.value)
        assert "query_timeout=1s" in str(load.value)
        with pytest.raises(StorageError, match="step commit") as commit:
            await store.apply(Transition("r1", 1, T0, fence=1, status="completed"))
        assert commit.value.workflow_id == "r1"
        with pytest.raises(StorageError, match="list"):
            await store.list_attempts("r1")
        with pytest.raises(StorageError, match="lease renewal"):
            await asyncio.to_thread(store.renew_leases, "me", {"r1": 1}, 300)
        # Connecting to it is bounded too.
        other = PostgresStorage(server.dsn, query_timeout=1)
        try:
            with pytest.raises(StorageError, match="cannot connect"):
                await other.init()
        finally:
            await other.close()
    # Thawed, the same store works again (its cut connections were replaced).
    deadline = time.monotonic() + 60
    while True:
        try:
            row = await store.load("r1")
            break
        except StorageError:
            assert time.monotonic() < deadline, "the store never recovered"
            await asyncio.sleep(0.5)
    assert row is not None and row.status == "running" and row.version == 1
    assert (await asyncio.to_thread(store.renew_leases, "me", {"r1": 1}, 300)).lost == set()


@pytest.mark.postgres
@pytest.mark.timeout(180)
async def test_a_frozen_server_is_cut_off_even_where_its_socket_cannot_be(
    own_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Where the socket cannot be shut down the store cancels the operation instead, and
    # psycopg abandons the query on its own (it gives the server a few seconds to answer).
    monkeypatch.setattr("fluxrun.storage._pg.shutdown_socket", lambda conn: False)
    store = PostgresStorage(own_server.dsn, query_timeout=1, min_size=1, max_size=1)
    try:
        await store.init()
        await store.create(_run("r1"), lease_owner=None, lease_seconds=30)
        with frozen(own_server):
            with pytest.raises(StorageError, match="query_timeout=1s") as info:
                await store.load("r1")
            assert info.value.workflow_id == "r1"
            # The task was not left cancelled: it goes on awaiting normally.
            await asyncio.sleep(0)
    finally:
        await store.close()


async def test_a_malformed_dsn_is_a_storage_error() -> None:
    store = PostgresStorage("host=x port=5432 = nonsense", query_timeout=1)
    try:
        with pytest.raises(StorageError, match="cannot connect") as info:
            await store.load("r1")
        assert info.value.workflow_id == "r1"
    finally:
        await store.close()
