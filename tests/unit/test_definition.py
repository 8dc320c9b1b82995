"""SPEC §2 rules 1-2: what ``build()`` rejects, what ``describe()`` reports, and the builder
and the ``Workflow`` decorator form producing the same definition."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import pytest

from fluxrun import (
    DefinitionError,
    EmptyWorkflowError,
    FluxEngine,
    FluxError,
    RetryPolicy,
    StepDescriptor,
    Workflow,
    WorkflowContext,
    WorkflowDefinition,
    WorkflowDescriptor,
    WorkflowStatus,
    create_workflow,
)


def noop(ctx: WorkflowContext) -> None:
    """A step that does nothing."""


def undo(ctx: WorkflowContext) -> None:
    """A compensation that does nothing."""


def is_big(ctx: WorkflowContext) -> bool:
    return bool(ctx.input)


# -- rule 1: what build() rejects ------------------------------------------------------------


def test_build_rejects_a_workflow_without_steps() -> None:
    with pytest.raises(EmptyWorkflowError) as info:
        create_workflow("empty").build()
    assert isinstance(info.value, DefinitionError)
    assert isinstance(info.value, FluxError)
    assert info.value.workflow_name == "empty"


def test_decorator_form_rejects_a_workflow_without_steps() -> None:
    with pytest.raises(EmptyWorkflowError):
        Workflow("empty").build()


async def test_execute_of_an_empty_workflow_raises_and_stores_nothing(engine: FluxEngine) -> None:
    with pytest.raises(EmptyWorkflowError):
        await engine.execute(create_workflow("empty"), {})
    assert await engine.list() == []


def test_build_rejects_duplicate_step_names() -> None:
    builder = create_workflow("dup").step("a", noop).step("b", noop).step("a", noop)
    with pytest.raises(DefinitionError) as info:
        builder.build()
    assert info.value.step == "a"


def test_build_rejects_a_step_and_a_commit_step_sharing_a_name() -> None:
    with pytest.raises(DefinitionError):
        create_workflow("dup").step("a", noop).commit("a", noop).build()


def test_decorator_form_rejects_duplicate_step_names() -> None:
    wf = Workflow("dup")
    wf.step(name="same")(noop)
    wf.step(name="same")(undo)
    with pytest.raises(DefinitionError):
        wf.build()


def test_a_commit_step_cannot_get_a_compensation_by_decorator() -> None:
    with pytest.raises(DefinitionError):
        wf = Workflow("w")
        charge = wf.commit(noop)
        wf.compensate(charge)(undo)
        wf.build()


def test_a_commit_step_cannot_get_a_compensation_in_the_builder() -> None:
    # .commit() has no compensate parameter (SPEC 1.1): passing one is refused outright.
    builder = create_workflow("w")
    with pytest.raises((TypeError, DefinitionError)):
        builder.commit("charge", noop, compensate=undo)  # type: ignore[call-arg]
        builder.build()
    assert builder.step_count == 0


@pytest.mark.parametrize(
    "options",
    [
        {"retries": -1},
        {"timeout": -0.5},
        {"timeout": dt.timedelta(seconds=-1)},
        {"retries": 1.5},
        {"timeout": float("nan")},
    ],
    ids=["retries-1", "timeout-0.5", "timeout-timedelta", "retries-float", "timeout-nan"],
)
@pytest.mark.parametrize("commit", [False, True], ids=["step", "commit"])
def test_build_rejects_bad_retries_and_timeouts(options: dict[str, Any], commit: bool) -> None:
    with pytest.raises(DefinitionError):
        builder = create_workflow("bad")
        add = builder.commit if commit else builder.step
        add("s", noop, **options)
        builder.build()


@pytest.mark.parametrize("options", [{"retries": -1}, {"timeout": -1.0}])
def test_decorator_form_rejects_bad_retries_and_timeouts(options: dict[str, Any]) -> None:
    with pytest.raises(DefinitionError):
        wf = Workflow("bad")
        wf.step(**options)(noop)
        wf.build()


def test_zero_retries_are_allowed() -> None:
    definition = create_workflow("ok").step("s", noop, retries=0).build()
    assert definition.steps[0].retries == 0


def test_build_returns_an_immutable_definition_in_step_order() -> None:
    definition = create_workflow("w").step("a", noop).commit("b", noop).step("c", noop).build()
    assert isinstance(definition, WorkflowDefinition)
    assert definition.step_names == ("a", "b", "c")
    assert [s.commit for s in definition.steps] == [False, True, False]
    with pytest.raises(AttributeError):
        definition.name = "other"  # type: ignore[misc]


# -- rule 2: describe() ---------------------------------------------------------------------


def _order_builder() -> Any:
    return (
        create_workflow("order")
        .version("2.1")
        .step("reserve", noop, retries=2, timeout=1.5, compensate=undo)
        .step("maybe", noop, when=is_big, timeout=dt.timedelta(milliseconds=250))
        .commit("charge", noop, retries=0)
    )


EXPECTED = WorkflowDescriptor(
    name="order",
    version="2.1",
    steps=(
        StepDescriptor(
            name="reserve",
            commit=False,
            retries=2,
            timeout=1.5,
            has_condition=False,
            has_compensation=True,
        ),
        StepDescriptor(
            name="maybe",
            commit=False,
            retries=None,
            timeout=0.25,
            has_condition=True,
            has_compensation=False,
        ),
        StepDescriptor(
            name="charge",
            commit=True,
            retries=0,
            timeout=None,
            has_condition=False,
            has_compensation=False,
        ),
    ),
)


def test_describe_reports_name_version_and_every_step_option() -> None:
    builder = _order_builder()
    assert builder.describe() == EXPECTED
    assert builder.build().describe() == EXPECTED


def test_describe_fields_are_plain_attributes() -> None:
    d = _order_builder().describe()
    assert (d.name, d.version, len(d.steps)) == ("order", "2.1", 3)
    first = d.steps[0]
    assert (first.name, first.commit, first.retries, first.timeout) == ("reserve", False, 2, 1.5)
    assert (first.has_condition, first.has_compensation) == (False, True)
    # A timedelta timeout is reported in seconds.
    assert d.steps[1].timeout == pytest.approx(0.25)
    assert isinstance(d.steps[1].timeout, float)


def test_describe_without_version_reports_none() -> None:
    d = create_workflow("plain").step("a", noop).describe()
    assert d.version is None
    assert d.steps == (
        StepDescriptor(
            name="a",
            commit=False,
            retries=None,
            timeout=None,
            has_condition=False,
            has_compensation=False,
        ),
    )


def test_describe_works_on_the_decorator_form() -> None:
    wf = Workflow("order", version="2.1")
    wf.step(retries=2, timeout=1.5, name="reserve")(noop)
    wf.compensate("reserve")(undo)
    wf.step(name="maybe", when=is_big, timeout=dt.timedelta(milliseconds=250))(noop)
    wf.commit(name="charge", retries=0)(noop)
    assert wf.describe() == EXPECTED


# -- the two forms build the same definition ---------------------------------------------------


def _reserve(ctx: WorkflowContext) -> None:
    ctx.data.setdefault("log", []).append("reserve")


def _release(ctx: WorkflowContext) -> None:
    ctx.data.setdefault("log", []).append("release")


def _check(ctx: WorkflowContext) -> None:
    ctx.data.setdefault("log", []).append("check")


async def _charge(ctx: WorkflowContext) -> None:
    ctx.data.setdefault("log", []).append("charge")


POLICY = RetryPolicy(initial_delay=0, jitter=False)


def _decorated() -> Workflow:
    wf = Workflow("same", version="3")

    @wf.step(retries=1, retry=POLICY, name="reserve")
    def reserve(ctx: WorkflowContext) -> None:
        _reserve(ctx)

    @wf.compensate(reserve)
    def release(ctx: WorkflowContext) -> None:
        _release(ctx)

    @wf.step(when=is_big, timeout=2.0, name="check")
    def check(ctx: WorkflowContext) -> None:
        _check(ctx)

    @wf.commit(name="charge")
    async def charge(ctx: WorkflowContext) -> None:
        await _charge(ctx)

    return wf


def test_decorator_and_builder_build_equal_definitions() -> None:
    wf = Workflow("same", version="3")
    wf.step(retries=1, retry=POLICY, name="reserve")(_reserve)
    wf.compensate(_reserve)(_release)
    wf.step(name="check", when=is_big, timeout=2.0)(_check)
    wf.commit(name="charge")(_charge)
    builder = (
        create_workflow("same")
        .version("3")
        .step("reserve", _reserve, retries=1, retry=POLICY, compensate=_release)
        .step("check", _check, when=is_big, timeout=2.0)
        .commit("charge", _charge)
    )
    assert wf.build() == builder.build()
    assert wf.describe() == builder.describe()


def test_decorator_uses_the_function_name_unless_name_is_given() -> None:
    wf = Workflow("names")

    @wf.step
    def first(ctx: WorkflowContext) -> None: ...

    @wf.step()
    def second(ctx: WorkflowContext) -> None: ...

    @wf.step(name="third-step")
    def third(ctx: WorkflowContext) -> None: ...

    @wf.commit
    def fourth(ctx: WorkflowContext) -> None: ...

    @wf.compensate("second")
    def undo_second(ctx: WorkflowContext) -> None: ...

    definition = wf.build()
    assert definition.step_names == ("first", "second", "third-step", "fourth")
    # The decorators hand the function back unchanged.
    assert definition.steps[0].handler is first
    assert definition.steps[1].compensate is undo_second
    assert definition.steps[3].commit is True


def test_compensate_for_an_unknown_step_is_a_definition_error() -> None:
    wf = Workflow("w")
    wf.step(noop)
    with pytest.raises(DefinitionError):
        wf.compensate("missing")(undo)


async def _run_both(engine: FluxEngine, flow: Any, big: bool) -> list[str]:
    result = await engine.execute(flow, big)
    assert result.status == WorkflowStatus.COMPLETED, result.error
    return list(result.data["log"])


@pytest.mark.parametrize("big", [True, False])
async def test_engine_runs_both_forms_the_same_way(engine: FluxEngine, big: bool) -> None:
    builder: Callable[[], Any] = lambda: (  # noqa: E731
        create_workflow("same")
        .version("3")
        .step("reserve", _reserve, retries=1, retry=POLICY, compensate=_release)
        .step("check", _check, when=is_big, timeout=2.0)
        .commit("charge", _charge)
    )
    expected = ["reserve", "check", "charge"] if big else ["reserve", "charge"]
    assert await _run_both(engine, _decorated(), big) == expected
    assert await _run_both(engine, builder(), big) == expected
    assert await _run_both(engine, builder().build(), big) == expected
    engine.register(_decorated())
    assert await _run_both(engine, "same", big) == expected
