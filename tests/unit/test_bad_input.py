"""SPEC §2 rule 18, and: every public entry point validates what it receives.

Each bad value gives a clear :class:`FluxError` subclass whose message names the problem and
where it is, and leaves nothing half-written. Values of the allowed types round-trip through
every store with their types.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import math
import uuid
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pydantic
import pytest

from fluxrun import (
    DefinitionError,
    EmptyWorkflowError,
    FluxEngine,
    FluxError,
    InvalidArgumentError,
    InvalidInputError,
    JsonFileTraceSink,
    MemoryStorage,
    RetryPolicy,
    SerializationError,
    SQLiteStorage,
    StorageError,
    UnknownWorkflowError,
    Workflow,
    WorkflowContext,
    WorkflowFilter,
    WorkflowNotFoundError,
    WorkflowStatus,
    create_workflow,
    wait,
)

FAST = RetryPolicy(initial_delay=0, jitter=False)


def _noop(ctx: WorkflowContext) -> None:
    return None


def nested(depth: int, leaf: Any = 1) -> Any:
    """``[[...[leaf]...]]`` with ``depth`` lists, built without recursion."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


class Opaque:
    """An object with no JSON form."""


# Each entry: an id, the bad value, and a fragment the error message must contain.
BAD_VALUES: list[tuple[str, Any, str]] = [
    ("nan", math.nan, "nan is not allowed"),
    ("inf", math.inf, "inf is not allowed"),
    ("-inf", -math.inf, "inf is not allowed"),
    ("decimal-nan", Decimal("NaN"), "only finite"),
    ("decimal-inf", Decimal("Infinity"), "only finite"),
    ("nul", "a\u0000b", "NUL"),
    ("lone-surrogate", "a\ud800b", "lone surrogates"),
    ("low-surrogate", "\udfff", "lone surrogates"),
    ("int-key", {1: "x"}, "keys must be str"),
    ("tuple-key", {("a",): 1}, "keys must be str"),
    ("none-key", {None: 1}, "keys must be str"),
    ("nul-key", {"a\u0000": 1}, "NUL"),
    ("surrogate-key", {"\ud800": 1}, "lone surrogates"),
    ("set", {1, 2}, "set is not JSON-representable"),
    ("frozenset", frozenset({1}), "frozenset is not JSON-representable"),
    ("bytes", b"abc", "bytes is not JSON-representable"),
    ("bytearray", bytearray(b"abc"), "bytearray is not JSON-representable"),
    ("object", Opaque(), "Opaque is not JSON-representable"),
    ("function", _noop, "function is not JSON-representable"),
    ("complex", 1j, "complex is not JSON-representable"),
    ("deep-10000", nested(10_000), "nesting deeper than 200"),
    ("5MB", "x" * 5_000_000, "characters of JSON; the limit is"),
]
BAD_IDS = [b[0] for b in BAD_VALUES]


def is_size(fragment: str) -> bool:
    return "the limit is" in fragment


@pytest.fixture(params=["memory", "sqlite"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_store(backend: str, tmp_path: Path) -> Callable[[], Any]:
    """A new store object on the same data at every call."""
    if backend == "memory":
        shared = MemoryStorage()
        return lambda: shared
    return lambda: SQLiteStorage(tmp_path / "flux.db", synchronous="NORMAL")


@pytest.fixture
async def engine(make_store: Callable[[], Any]) -> AsyncIterator[FluxEngine]:
    async with FluxEngine(storage=make_store(), retry_policy=FAST) as e:
        yield e


@pytest.fixture
async def mem_engine() -> AsyncIterator[FluxEngine]:
    async with FluxEngine(retry_policy=FAST) as e:
        yield e


def simple_flow(name: str = "simple") -> Any:
    return create_workflow(name).step("only", _noop)


# -- definitions -------------------------------------------------------------------------------

DEFINITION_CASES: list[tuple[str, Callable[[], Any], str]] = [
    ("name-int", lambda: create_workflow(123), "workflow name must be a str, got int"),
    ("name-none", lambda: create_workflow(None), "workflow name must be a str"),
    ("name-bytes", lambda: create_workflow(b"wf"), "workflow name must be a str, got bytes"),
    ("name-empty", lambda: create_workflow(""), "workflow name must not be empty"),
    ("name-nul", lambda: create_workflow("w\u0000"), "workflow name: strings may not contain"),
    ("name-surrogate", lambda: create_workflow("w\ud800"), "workflow name: strings may not"),
    ("name-10k", lambda: create_workflow("w" * 10_000), "workflow name is 10000 characters"),
    ("step-name-int", lambda: create_workflow("w").step(1, _noop), "step name in workflow 'w'"),
    ("step-name-nul", lambda: create_workflow("w").step("a\u0000", _noop), "step name"),
    ("step-name-surr", lambda: create_workflow("w").step("\ud800", _noop), "step name"),
    ("handler", lambda: create_workflow("w").step("a", "h"), "step 'a' of workflow 'w': handler"),
    ("handler-none", lambda: create_workflow("w").step("a", None), "handler must be callable"),
    ("retries-neg", lambda: create_workflow("w").step("a", _noop, retries=-1), "retries"),
    ("retries-float", lambda: create_workflow("w").step("a", _noop, retries=1.0), "retries"),
    ("retries-bool", lambda: create_workflow("w").step("a", _noop, retries=True), "retries"),
    ("retries-str", lambda: create_workflow("w").step("a", _noop, retries="2"), "retries"),
    ("timeout-neg", lambda: create_workflow("w").step("a", _noop, timeout=-1), "timeout"),
    ("timeout-zero", lambda: create_workflow("w").step("a", _noop, timeout=0), "timeout"),
    ("timeout-nan", lambda: create_workflow("w").step("a", _noop, timeout=math.nan), "timeout"),
    ("timeout-inf", lambda: create_workflow("w").step("a", _noop, timeout=math.inf), "timeout"),
    ("timeout-str", lambda: create_workflow("w").step("a", _noop, timeout="5"), "timeout"),
    (
        "timeout-negdelta",
        lambda: create_workflow("w").step("a", _noop, timeout=dt.timedelta(seconds=-1)),
        "timeout",
    ),
    ("when", lambda: create_workflow("w").step("a", _noop, when=True), "when must be callable"),
    ("compensate", lambda: create_workflow("w").step("a", _noop, compensate=1), "compensate"),
    (
        "retry",
        lambda: create_workflow("w").step("a", _noop, retry=3),
        "retry must be a RetryPolicy",
    ),
    ("commit-retries", lambda: create_workflow("w").commit("a", _noop, retries=-2), "retries"),
    ("commit-handler", lambda: create_workflow("w").commit("a", 42), "handler must be callable"),
    ("input", lambda: create_workflow("w").input(42), "input spec must be"),
    ("input-instance", lambda: create_workflow("w").input(Opaque()), "input spec must be"),
    ("version-int", lambda: create_workflow("w").version(2), "version of workflow 'w'"),
    ("version-empty", lambda: create_workflow("w").version(""), "version of workflow 'w'"),
    ("empty", lambda: create_workflow("w").build(), "has no steps"),
    (
        "duplicate",
        lambda: create_workflow("w").step("a", _noop).commit("a", _noop).build(),
        "two steps named 'a'",
    ),
    ("wf-name", lambda: Workflow(7), "workflow name must be a str"),
    ("wf-version", lambda: Workflow("w", version=1.5), "version of workflow 'w'"),
    ("wf-input", lambda: Workflow("w", input="spec"), "input spec must be"),
    ("wf-step-nonfunc", lambda: Workflow("w").step(42), "step name in workflow 'w'"),
    ("wf-step-opt", lambda: Workflow("w").step(retries=-1)(_noop), "retries must be an int"),
    ("wf-step-name", lambda: Workflow("w").step(name=5)(_noop), "step name in workflow 'w'"),
    ("wf-commit-opt", lambda: Workflow("w").commit(timeout="x")(_noop), "timeout"),
    ("wf-compensate-unknown", lambda: Workflow("w").compensate("ghost"), "no step 'ghost'"),
    ("wf-empty", lambda: Workflow("w").build(), "has no steps"),
]


@pytest.mark.parametrize(
    ("make", "fragment"), [c[1:] for c in DEFINITION_CASES], ids=[c[0] for c in DEFINITION_CASES]
)
def test_bad_definitions_raise_definition_error(make: Callable[[], Any], fragment: str) -> None:
    with pytest.raises(DefinitionError) as info:
        make()
    assert fragment in str(info.value)


def test_empty_workflow_is_its_own_error() -> None:
    with pytest.raises(EmptyWorkflowError):
        create_workflow("w").build()


def test_decorator_compensation_on_a_commit_step_is_refused() -> None:
    wf = Workflow("w")

    @wf.commit
    def charge(ctx: WorkflowContext) -> None:
        return None

    with pytest.raises(DefinitionError, match="commit step cannot have a compensation"):

        @wf.compensate(charge)
        def refund(ctx: WorkflowContext) -> None:
            return None


def test_decorator_compensation_must_be_callable() -> None:
    wf = Workflow("w")
    wf.step(_noop)
    with pytest.raises(DefinitionError, match="compensate must be callable"):
        wf.compensate("_noop")(42)  # type: ignore[arg-type]


# -- FluxEngine(...) ---------------------------------------------------------------------------


class NoWarn:
    def debug(self, m: str) -> None: ...
    def info(self, m: str) -> None: ...
    def error(self, m: str) -> None: ...


ENGINE_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("storage-object", {"storage": object()}, "storage must be"),
    ("storage-str", {"storage": "flux.db"}, "storage must be"),
    ("logger-object", {"logger": object()}, "logger must have"),
    ("logger-no-warn", {"logger": NoWarn()}, "warning (or warn)"),
    ("trace-object", {"trace": object()}, "has no emit(event)"),
    ("trace-list", {"trace": [object()]}, "has no emit(event)"),
    ("retries-neg", {"default_retries": -1}, "default_retries must be an int >= 0"),
    ("retries-bool", {"default_retries": True}, "default_retries"),
    ("retries-float", {"default_retries": 1.0}, "default_retries"),
    ("retries-nan", {"default_retries": math.nan}, "default_retries"),
    ("timeout-nan", {"default_timeout": math.nan}, "default_timeout"),
    ("timeout-inf", {"default_timeout": math.inf}, "default_timeout"),
    ("timeout-neg", {"default_timeout": -5}, "default_timeout"),
    ("timeout-str", {"default_timeout": "10"}, "default_timeout"),
    ("on-unknown", {"on": {"stepStartt": _noop}}, "unknown hook 'stepStartt'"),
    ("on-int-key", {"on": {1: _noop}}, "unknown hook 1"),
    ("on-not-callable", {"on": {"step_start": 1}}, "hook 'step_start' must be callable"),
    ("on-int", {"on": 5}, "on must be a dict of hooks"),
    ("on-str", {"on": "step_start"}, "on must be a dict of hooks"),
    ("on-list", {"on": [_noop]}, "on must be a dict of hooks"),
    ("retry-policy", {"retry_policy": {"initial_delay": 0}}, "retry_policy must be a RetryPolicy"),
    ("lease-zero", {"lease": 0}, "lease"),
    ("lease-nan", {"lease": math.nan}, "lease"),
    ("lease-inf", {"lease": math.inf}, "lease"),
    ("lease-str", {"lease": "30"}, "lease"),
    ("max-recoveries", {"max_recoveries": 0}, "max_recoveries"),
    ("max-value-size", {"max_value_size": 1}, "max_value_size"),
    ("max-value-size-float", {"max_value_size": 1e6}, "max_value_size"),
]


@pytest.mark.parametrize(
    ("options", "fragment"), [c[1:] for c in ENGINE_CASES], ids=[c[0] for c in ENGINE_CASES]
)
def test_bad_engine_options_raise(options: dict[str, Any], fragment: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        FluxEngine(**options)
    assert fragment in str(info.value)


def test_engine_options_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        FluxEngine(MemoryStorage())  # type: ignore[misc]


async def test_closed_engine_refuses_to_start_again() -> None:
    engine = FluxEngine()
    await engine.init()
    await engine.close()
    with pytest.raises(FluxError, match="closed"):
        await engine.init()
    with pytest.raises(FluxError, match="closed"):
        await engine.execute(simple_flow())


# -- engine methods ----------------------------------------------------------------------------

BAD_IDS_ARGS: list[tuple[str, Any, str]] = [
    ("int", 123, "run id must be a str, got int"),
    ("none", None, "run id must be a str, got NoneType"),
    ("bytes", b"id", "run id must be a str, got bytes"),
    ("uuid", uuid.uuid4(), "run id must be a str, got UUID"),
    ("empty", "", "run id must not be empty"),
    ("nul", "ab\u0000", "run id: strings may not contain the NUL"),
    ("surrogate", "\ud800", "run id: strings may not contain lone surrogates"),
    ("10k", "x" * 10_000, "run id is 10000 characters long"),
]


@pytest.mark.parametrize(
    ("run_id", "fragment"), [c[1:] for c in BAD_IDS_ARGS], ids=[c[0] for c in BAD_IDS_ARGS]
)
@pytest.mark.parametrize("method", ["get", "delete", "signal", "resume", "retry_step"])
async def test_bad_run_ids_raise(
    mem_engine: FluxEngine, method: str, run_id: Any, fragment: str
) -> None:
    flow = simple_flow()
    calls = {
        "get": lambda: mem_engine.get(run_id),
        "delete": lambda: mem_engine.delete(run_id),
        "signal": lambda: mem_engine.signal(flow, run_id, "go"),
        "resume": lambda: mem_engine.resume(flow, run_id),
        "retry_step": lambda: mem_engine.retry_step(flow, run_id, "only"),
    }
    with pytest.raises(InvalidArgumentError) as info:
        await calls[method]()
    assert fragment in str(info.value)
    assert await mem_engine.list() == []


async def test_unknown_run_ids(engine: FluxEngine) -> None:
    flow = simple_flow()
    assert await engine.get("nope") is None
    assert await engine.delete("nope") is False
    assert await engine.resume(flow, "nope") is None
    assert await engine.retry_step(flow, "nope", "only") is None
    with pytest.raises(WorkflowNotFoundError) as info:
        await engine.signal(flow, "nope", "go")
    assert "nope" in str(info.value) and info.value.workflow_id == "nope"
    assert await engine.list() == []


BAD_FLOWS: list[tuple[str, Any, type[FluxError], str]] = [
    ("int", 42, InvalidArgumentError, "expected a workflow"),
    ("none", None, InvalidArgumentError, "got NoneType"),
    ("dict", {"name": "x"}, InvalidArgumentError, "got dict"),
    ("unregistered", "ghost", UnknownWorkflowError, "no workflow named 'ghost'"),
    ("empty-builder", create_workflow("empty"), EmptyWorkflowError, "has no steps"),
]


@pytest.mark.parametrize(
    ("flow", "error", "fragment"), [c[1:] for c in BAD_FLOWS], ids=[c[0] for c in BAD_FLOWS]
)
@pytest.mark.parametrize("method", ["execute", "signal", "resume", "retry_step", "register"])
async def test_bad_workflows_raise(
    mem_engine: FluxEngine, method: str, flow: Any, error: type[FluxError], fragment: str
) -> None:
    calls = {
        "execute": lambda: mem_engine.execute(flow, {}),
        "signal": lambda: mem_engine.signal(flow, "some-id", "go"),
        "resume": lambda: mem_engine.resume(flow, "some-id"),
        "retry_step": lambda: mem_engine.retry_step(flow, "some-id", "a"),
    }
    with pytest.raises(error) as info:
        if method == "register":
            mem_engine.register(flow)
        else:
            await calls[method]()
    assert fragment in str(info.value)
    assert await mem_engine.list() == []


async def test_register_refuses_a_different_workflow_under_the_same_name(
    mem_engine: FluxEngine,
) -> None:
    mem_engine.register(simple_flow("same"))
    mem_engine.register(simple_flow("same"))  # the same shape again is fine
    with pytest.raises(DefinitionError, match="'same' is already registered"):
        mem_engine.register(create_workflow("same").step("other", _noop))
    with pytest.raises(DefinitionError):
        mem_engine.register(create_workflow("same").version("2").step("only", _noop))


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        (1, "signal name must be a str, got int"),
        (None, "signal name must be a str"),
        ("", "signal name must not be empty"),
        ("go\u0000", "signal name: strings may not contain the NUL"),
        ("\ud800", "signal name: strings may not contain lone surrogates"),
    ],
)
async def test_bad_signal_names_raise(mem_engine: FluxEngine, name: Any, fragment: str) -> None:
    flow = create_workflow("waits").step("w", lambda ctx: wait("go"))
    run = await mem_engine.execute(flow)
    before = await mem_engine.get(run.id)
    with pytest.raises(InvalidArgumentError) as info:
        await mem_engine.signal(flow, run.id, name)
    assert fragment in str(info.value)
    assert await mem_engine.get(run.id) == before


@pytest.mark.parametrize(
    "bad", [{"name": "x"}, "x", None.__class__, 5], ids=["dict", "str", "type", "int"]
)
async def test_list_requires_a_workflow_filter(mem_engine: FluxEngine, bad: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="filter must be a WorkflowFilter"):
        await mem_engine.list(bad)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "4", None])
async def test_recover_concurrency_is_checked(mem_engine: FluxEngine, bad: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="concurrency must be an int >= 1"):
        await mem_engine.recover(concurrency=bad)


# -- WorkflowFilter, RetryPolicy, wait() -------------------------------------------------------

FILTER_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("name-int", {"name": 1}, "WorkflowFilter.name must be a str, got int"),
    ("name-bytes", {"name": b"x"}, "WorkflowFilter.name must be a str, got bytes"),
    ("name-nul", {"name": "a\u0000"}, "WorkflowFilter.name: strings may not contain the NUL"),
    ("name-surrogate", {"name": "\ud800"}, "WorkflowFilter.name: strings may not contain lone"),
    ("limit-neg", {"limit": -1}, "WorkflowFilter.limit must be an int >= 0 and < 2**63, got -1"),
    ("limit-float", {"limit": 2.0}, "WorkflowFilter.limit"),
    ("limit-bool", {"limit": True}, "WorkflowFilter.limit"),
    ("limit-nan", {"limit": math.nan}, "WorkflowFilter.limit"),
    ("limit-inf", {"limit": math.inf}, "WorkflowFilter.limit"),
    ("limit-str", {"limit": "10"}, "WorkflowFilter.limit"),
    ("offset-neg", {"offset": -5}, "WorkflowFilter.offset must be an int >= 0 and < 2**63, got -5"),
    ("offset-none", {"offset": None}, "WorkflowFilter.offset"),
    ("offset-2**63", {"offset": 2**63}, "WorkflowFilter.offset must be an int >= 0 and < 2**63"),
    ("limit-10**30", {"limit": 10**30}, "WorkflowFilter.limit must be an int >= 0 and < 2**63"),
    ("offset-float", {"offset": 0.0}, "WorkflowFilter.offset"),
    ("status-unknown", {"status": "done"}, "unknown status 'done'"),
    ("status-upper", {"status": "COMPLETED"}, "unknown status 'COMPLETED'"),
    ("status-int", {"status": [1]}, "unknown status 1"),
    ("status-none-item", {"status": [None]}, "unknown status None"),
    ("status-set", {"status": {"failed"}}, "WorkflowFilter.status must be a status or a list"),
    ("status-obj", {"status": object()}, "WorkflowFilter.status must be a status or a list"),
]


@pytest.mark.parametrize(
    ("kwargs", "fragment"), [c[1:] for c in FILTER_CASES], ids=[c[0] for c in FILTER_CASES]
)
def test_bad_workflow_filters_raise(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        WorkflowFilter(**kwargs)
    assert fragment in str(info.value)


RETRY_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("initial-neg", {"initial_delay": -1}, "RetryPolicy.initial_delay"),
    ("initial-nan", {"initial_delay": math.nan}, "RetryPolicy.initial_delay"),
    ("initial-inf", {"initial_delay": math.inf}, "RetryPolicy.initial_delay"),
    ("initial-str", {"initial_delay": "1"}, "RetryPolicy.initial_delay"),
    ("initial-bool", {"initial_delay": True}, "RetryPolicy.initial_delay"),
    ("max-neg", {"max_delay": -0.5}, "RetryPolicy.max_delay"),
    ("max-nan", {"max_delay": math.nan}, "RetryPolicy.max_delay"),
    ("factor-small", {"factor": 0.5}, "RetryPolicy.factor must be >= 1"),
    ("factor-nan", {"factor": math.nan}, "RetryPolicy.factor"),
    ("factor-inf", {"factor": math.inf}, "RetryPolicy.factor"),
    ("factor-str", {"factor": "2"}, "RetryPolicy.factor must be a number"),
    ("factor-bool", {"factor": True}, "RetryPolicy.factor must be a number"),
    ("jitter-str", {"jitter": "yes"}, "RetryPolicy.jitter must be a bool"),
    ("jitter-int", {"jitter": 1}, "RetryPolicy.jitter must be a bool"),
    ("retry-on-int", {"retry_on": (int,)}, "RetryPolicy.retry_on must be a tuple of exception"),
    ("retry-on-str", {"retry_on": "ValueError"}, "RetryPolicy.retry_on"),
    ("retry-on-list", {"retry_on": [ValueError]}, "RetryPolicy.retry_on"),
    ("retry-on-instance", {"retry_on": (ValueError(),)}, "RetryPolicy.retry_on"),
    ("never-retry", {"never_retry": (object,)}, "RetryPolicy.never_retry"),
]


@pytest.mark.parametrize(
    ("kwargs", "fragment"), [c[1:] for c in RETRY_CASES], ids=[c[0] for c in RETRY_CASES]
)
def test_bad_retry_policies_raise(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(DefinitionError) as info:
        RetryPolicy(**kwargs)
    assert fragment in str(info.value)


def test_retry_policy_accepts_a_single_exception_type_and_timedelta() -> None:
    policy = RetryPolicy(initial_delay=dt.timedelta(milliseconds=5), retry_on=KeyError)
    assert policy.retry_on == (KeyError,)
    assert policy.initial_delay == 0.005


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        (1, "signal name must be a str, got int"),
        (None, "signal name must be a str, got NoneType"),
        (b"go", "signal name must be a str, got bytes"),
        ("", "signal name must not be empty"),
        ("go\u0000", "NUL"),
        ("go\ud800", "lone surrogates"),
        ("g" * 10_000, "at most"),
    ],
)
def test_bad_wait_names_raise(name: Any, fragment: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        wait(name)
    assert fragment in str(info.value)


# -- JsonFileTraceSink, SQLiteStorage -----------------------------------------------------------


def test_bad_json_sink_arguments_raise(tmp_path: Path) -> None:
    cases: list[tuple[Callable[[], Any], str]] = [
        (lambda: JsonFileTraceSink(123), "path must be a str or path, got int"),  # type: ignore[arg-type]
        (lambda: JsonFileTraceSink(None), "path must be a str or path"),  # type: ignore[arg-type]
        (lambda: JsonFileTraceSink(str(tmp_path / "a\u0000b")), "cannot open"),
        (lambda: JsonFileTraceSink(tmp_path), "cannot open"),
        (lambda: JsonFileTraceSink(tmp_path / "t.ndjson", reset="no"), "reset must be a bool"),  # type: ignore[arg-type]
    ]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases.append((lambda: JsonFileTraceSink(blocker / "t.ndjson"), "cannot open"))
    for make, fragment in cases:
        with pytest.raises(InvalidArgumentError) as info:
            make()
        assert fragment in str(info.value)


def test_bad_sqlite_storage_arguments_raise(tmp_path: Path) -> None:
    db = tmp_path / "f.db"
    cases: list[tuple[Callable[[], Any], str]] = [
        (lambda: SQLiteStorage(123), "path must be a str or path, got int"),  # type: ignore[arg-type]
        (lambda: SQLiteStorage(None), "path must be a str or path"),  # type: ignore[arg-type]
        (lambda: SQLiteStorage(str(tmp_path / "a\u0000.db")), "NUL"),
        (lambda: SQLiteStorage(db, synchronous="OFF"), "synchronous must be 'FULL' or 'NORMAL'"),  # type: ignore[arg-type]
        (lambda: SQLiteStorage(db, busy_timeout=-1), "busy_timeout"),
        (lambda: SQLiteStorage(db, busy_timeout=math.nan), "busy_timeout"),
        (lambda: SQLiteStorage(db, busy_timeout="5"), "busy_timeout"),  # type: ignore[arg-type]
        (lambda: SQLiteStorage(db, clock=5), "clock must be callable"),  # type: ignore[arg-type]
    ]
    for make, fragment in cases:
        with pytest.raises(InvalidArgumentError) as info:
            make()
        assert fragment in str(info.value)
    assert not db.exists()


async def test_sqlite_storage_that_cannot_open_raises_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for path in (tmp_path, blocker / "f.db"):
        engine = FluxEngine(storage=SQLiteStorage(path))
        with pytest.raises(StorageError) as info:
            await engine.init()
        assert str(path) in str(info.value)
        await engine.close()


# -- rule 18: bad values at execute ------------------------------------------------------------


@pytest.mark.parametrize(("value", "fragment"), [b[1:] for b in BAD_VALUES], ids=BAD_IDS)
async def test_bad_input_is_rejected_at_execute_and_nothing_is_stored(
    engine: FluxEngine, value: Any, fragment: str
) -> None:
    calls: list[str] = []
    flow = create_workflow("in").step("s", lambda ctx: calls.append("ran"))
    for wrapped, where in ((value, "input"), ({"order": {"items": [0, value]}}, "input['order']")):
        with pytest.raises(InvalidInputError) as info:
            await engine.execute(flow, wrapped)
        assert isinstance(info.value, SerializationError)
        message = str(info.value)
        assert fragment in message
        if is_size(fragment):  # the size is the whole value's: it names the value
            assert message.startswith("input is "), message[:200]
        else:  # it names the path to the bad part
            assert message.startswith(where), message[:200]
            if where != "input":
                assert message.startswith("input['order']['items'][1]"), message[:200]
    assert calls == []
    assert await engine.list() == []


async def test_bad_input_error_is_the_same_on_every_backend(tmp_path: Path) -> None:
    messages: dict[str, list[str]] = {}
    for backend, store in (
        ("memory", MemoryStorage()),
        ("sqlite", SQLiteStorage(tmp_path / "same.db")),
    ):
        async with FluxEngine(storage=store) as engine:
            for _, value, _ in BAD_VALUES:
                with pytest.raises(SerializationError) as info:
                    await engine.execute(simple_flow(), {"v": value})
                messages.setdefault(backend, []).append(
                    f"{type(info.value).__name__}: {info.value}"
                )
            assert await engine.list() == []
    assert messages["memory"] == messages["sqlite"]


async def test_input_validation_error_stores_nothing(engine: FluxEngine) -> None:
    flow = create_workflow("checked").input(lambda raw: isinstance(raw, dict)).step("s", _noop)
    with pytest.raises(InvalidInputError, match="rejected by its validator"):
        await engine.execute(flow, [1])
    assert await engine.list() == []


# -- rule 18: bad values inside a run ----------------------------------------------------------


def _good_first(ctx: WorkflowContext) -> None:
    ctx.data["keep"] = {"ok": [1, 2]}


@pytest.mark.parametrize(("value", "fragment"), [b[1:] for b in BAD_VALUES], ids=BAD_IDS)
async def test_bad_data_set_inside_a_step_fails_that_step(
    engine: FluxEngine, value: Any, fragment: str
) -> None:
    def bad(ctx: WorkflowContext) -> None:
        ctx.data["keep"]["ok"].append(3)  # a change to an existing key: must not be kept
        ctx.data["fine"] = "would be fine alone"
        ctx.data["bad"] = {"inner": value}

    after: list[str] = []
    flow = (
        create_workflow("in-run")
        .step("first", _good_first)
        .step("bad", bad, retries=1)
        .step("after", lambda ctx: after.append("ran"))
    )
    result = await engine.execute(flow)
    assert result.status is WorkflowStatus.FAILED
    assert isinstance(result.error, SerializationError)
    message = str(result.error)
    assert fragment in message
    assert message.startswith("ctx.data['bad']"), message[:200]
    assert after == []
    state = await engine.get(result.id)
    assert state is not None
    assert state.data == result.data == {"keep": {"ok": [1, 2]}}
    assert state.history[1].status.value == "failed"
    assert state.history[1].error == message
    assert state.error == message
    assert state.history[0].status.value == "completed"


@pytest.mark.parametrize(
    ("key", "fragment"),
    [
        (1, "ctx.data keys must be str, got int"),
        (None, "ctx.data keys must be str, got NoneType"),
        (("a", "b"), "ctx.data keys must be str, got tuple"),
        ("k\u0000", "NUL"),
        ("k\ud800", "lone surrogates"),
    ],
)
async def test_bad_data_keys_fail_the_step(engine: FluxEngine, key: Any, fragment: str) -> None:
    def bad(ctx: WorkflowContext) -> None:
        ctx.data["fine"] = 1
        ctx.data[key] = "v"

    flow = create_workflow("keys").step("first", _good_first).step("bad", bad)
    result = await engine.execute(flow)
    assert result.status is WorkflowStatus.FAILED
    assert isinstance(result.error, SerializationError)
    assert fragment in str(result.error)
    state = await engine.get(result.id)
    assert state is not None and state.data == {"keep": {"ok": [1, 2]}}


async def test_replacing_ctx_data_with_a_non_dict_fails_the_step(engine: FluxEngine) -> None:
    def bad(ctx: WorkflowContext) -> None:
        ctx.data = [1, 2]  # type: ignore[assignment]

    result = await engine.execute(create_workflow("swap").step("first", _good_first).step("b", bad))
    assert result.status is WorkflowStatus.FAILED
    assert isinstance(result.error, SerializationError)
    assert "ctx.data must stay a dict" in str(result.error)
    state = await engine.get(result.id)
    assert state is not None and state.data == {"keep": {"ok": [1, 2]}}


@pytest.mark.parametrize(("value", "fragment"), [b[1:] for b in BAD_VALUES], ids=BAD_IDS)
async def test_bad_step_return_value_fails_the_step(
    engine: FluxEngine, value: Any, fragment: str
) -> None:
    def bad(ctx: WorkflowContext) -> Any:
        ctx.data["fine"] = 1
        return value

    result = await engine.execute(create_workflow("out").step("first", _good_first).step("b", bad))
    assert result.status is WorkflowStatus.FAILED
    assert isinstance(result.error, SerializationError)
    assert fragment in str(result.error)
    assert str(result.error).startswith("the return value of step 'b'")
    state = await engine.get(result.id)
    assert state is not None
    assert state.data == {"keep": {"ok": [1, 2]}}
    assert state.history[1].output is None


@pytest.mark.parametrize(("value", "fragment"), [b[1:] for b in BAD_VALUES], ids=BAD_IDS)
async def test_bad_signal_payload_is_rejected_and_the_run_still_waits(
    engine: FluxEngine, value: Any, fragment: str
) -> None:
    flow = create_workflow("sig").step("w", lambda ctx: wait("go")).step("after", _noop)
    run = await engine.execute(flow)
    before = await engine.get(run.id)
    with pytest.raises(InvalidInputError) as info:
        await engine.signal(flow, run.id, "go", {"payload": value})
    assert isinstance(info.value, SerializationError)
    assert fragment in str(info.value)
    where = "payload of signal 'go'" + ("" if is_size(fragment) else "['payload']")
    assert str(info.value).startswith(f"run {run.id!r}: {where}")
    assert info.value.workflow_id == run.id
    assert await engine.get(run.id) == before
    done = await engine.signal(flow, run.id, "go", {"payload": "good"})
    assert done.status is WorkflowStatus.COMPLETED


async def test_a_smaller_max_value_size_is_enforced(make_store: Callable[[], Any]) -> None:
    async with FluxEngine(storage=make_store(), max_value_size=100) as engine:
        with pytest.raises(SerializationError, match="the limit is 100"):
            await engine.execute(simple_flow(), "x" * 200)

        def big(ctx: WorkflowContext) -> None:
            ctx.data["big"] = "y" * 200

        result = await engine.execute(create_workflow("big").step("big", big))
        assert isinstance(result.error, SerializationError)
        assert "ctx.data['big'] is 202 characters of JSON; the limit is 100" in str(result.error)
        assert [s.status for s in await engine.list()] == [WorkflowStatus.FAILED]


# -- rule 18: allowed types round-trip --------------------------------------------------------


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: float
    label: str = "p"


@dataclasses.dataclass
class Order:
    id: uuid.UUID
    placed: dt.datetime
    total: Decimal
    points: list[Point]
    color: Color


class Item(pydantic.BaseModel):
    sku: str
    qty: int
    price: Decimal
    when: dt.date


def allowed_values() -> dict[str, Any]:
    tz = dt.timezone(dt.timedelta(hours=5, minutes=30))
    return {
        "aware": dt.datetime(2024, 2, 29, 23, 59, 59, 123456, tzinfo=dt.UTC),
        "aware_offset": dt.datetime(2024, 1, 1, 8, 0, tzinfo=tz),
        "naive": dt.datetime(1999, 12, 31, 23, 59, 58),
        "date": dt.date(2000, 1, 1),
        "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "decimal": Decimal("12.3400"),
        "decimal_big": Decimal("-1E+30"),
        "tuple": (1, "two", (3.5, None), [4]),
        "empty_tuple": (),
        "enum": Color.BLUE,
        "int_enum": Level.HIGH,
        "dataclass": Point(1, 2.5),
        "nested_dataclass": Order(
            id=uuid.UUID(int=7),
            placed=dt.datetime(2024, 6, 1, tzinfo=dt.UTC),
            total=Decimal("99.95"),
            points=[Point(0, 0.0, "origin")],
            color=Color.RED,
        ),
        "pydantic": Item(sku="A-1", qty=3, price=Decimal("1.10"), when=dt.date(2024, 1, 2)),
        "big_int": 2**100,
        "neg_big_int": -(2**100),
        "floats": [0.1, -0.0, 1e16, 1.5e-300, 1e300],
        "bools": [True, False, None],
        "unicode": "héllo wörld ☃ 🚀 中文 \u2028 \U0001f600",
        "unicode_key": {"ключ 🔑": "значение", "": "empty key"},
        "tag_lookalike": {"$flux": "datetime", "v": "not a date"},
        "deep": nested(150, {"leaf": (1, 2)}),
        "mixed": [{"a": (Decimal("1"), dt.date(2020, 2, 2))}, {"b": [Color.RED, Level.LOW]}],
    }


def assert_same(expected: Any, actual: Any, path: str = "value") -> None:
    """Equal, with the same types all the way down."""
    # Iterative, so that the deep value does not hit the recursion limit of pytest's repr.
    stack = [(expected, actual, path)]
    while stack:
        e, a, p = stack.pop()
        assert type(a) is type(e), f"{p}: {type(a).__name__} != {type(e).__name__}"
        if isinstance(e, dict):
            assert list(a) == list(e), p
            stack += [(e[k], a[k], f"{p}[{k!r}]") for k in e]
        elif isinstance(e, list | tuple):
            assert len(a) == len(e), p
            stack += [(x, y, f"{p}[{i}]") for i, (x, y) in enumerate(zip(e, a, strict=True))]
        elif isinstance(e, float):
            assert math.copysign(1, a) == math.copysign(1, e) and a == e, p
        elif isinstance(e, dt.datetime):
            assert a == e and a.utcoffset() == e.utcoffset(), p
        elif isinstance(e, Decimal):
            assert str(a) == str(e), p
        else:
            assert a == e, p


async def test_allowed_types_round_trip_with_their_types(
    make_store: Callable[[], Any],
) -> None:
    values = allowed_values()

    def record(ctx: WorkflowContext) -> Any:
        assert_same(values, ctx.input, "ctx.input")
        for key, value in values.items():
            ctx.data[key] = value
        return values

    def after_signal(ctx: WorkflowContext) -> None:
        assert_same(values, ctx.signals["go"], "ctx.signals['go']")
        assert_same(values, dict(ctx.data), "ctx.data")

    flow = (
        create_workflow("types")
        .step("record", record)
        .step("wait", lambda ctx: wait("go"))
        .step("after", after_signal)
    )
    async with FluxEngine(storage=make_store(), retry_policy=FAST) as engine:
        run = await engine.execute(flow, values)
        assert run.status is WorkflowStatus.SUSPENDED
        done = await engine.signal(flow, run.id, "go", values)
        assert done.status is WorkflowStatus.COMPLETED, done.error
        assert_same(values, done.data, "result.data")
    # A fresh engine and store object: everything comes back from storage.
    async with FluxEngine(storage=make_store()) as engine:
        state = await engine.get(run.id)
        assert state is not None
        assert_same(values, state.input, "state.input")
        assert_same(values, state.data, "state.data")
        assert_same(values, state.history[0].output, "history[0].output")
        assert_same(values, state.history[1].output, "history[1].output")
        [listed] = await engine.list()
        assert_same(values, listed.data, "listed.data")


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (nested(200), None),  # the top level counts as depth 1
        (nested(201), "nesting deeper than 200"),
        ({"k": nested(200)}, "nesting deeper than 200"),
    ],
    ids=["200", "201", "dict+200"],
)
async def test_depth_limit_boundary(engine: FluxEngine, value: Any, fragment: str | None) -> None:
    if fragment is None:
        result = await engine.execute(simple_flow(), value)
        state = await engine.get(result.id)
        assert state is not None
        assert_same(value, state.input)
    else:
        with pytest.raises(SerializationError, match=fragment):
            await engine.execute(simple_flow(), value)
        assert await engine.list() == []
