"""Child steps in definitions (SPEC §7): the builder's ``.child``, the decorator form, what
they refuse, what ``describe()`` shows, and what registering a parent registers; plus a few
runs on the embedded stores (the full behaviour is in ``tests/contract/test_children.py``).
"""

from __future__ import annotations

from typing import Any

import pytest

from fluxrun import (
    ChildWorkflowError,
    DefinitionError,
    FluxEngine,
    FluxError,
    InvalidArgumentError,
    StepDescriptor,
    Workflow,
    WorkflowContext,
    WorkflowStatus,
    create_workflow,
    wait,
)
from fluxrun.errors import ChildWorkflowError as FromErrors

KID = create_workflow("kid").step("double", lambda ctx: ctx.data.update(v=ctx.input["n"] * 2))


def noop(ctx: WorkflowContext) -> None:
    """A step that does nothing."""


@pytest.mark.parametrize(
    ("flow", "message"),
    [
        (42, "flow must be a workflow"),
        (object(), "flow must be a workflow"),
        ("", "child workflow's name"),
        ("bad\x00name", "child workflow's name"),
    ],
)
def test_child_refuses_what_is_not_a_workflow(flow: Any, message: str) -> None:
    with pytest.raises(DefinitionError, match=message) as caught:
        create_workflow("p").child("c", flow)
    assert "'c'" in str(caught.value) and "'p'" in str(caught.value)


def test_child_refuses_a_bad_input_and_bad_options() -> None:
    with pytest.raises(DefinitionError, match="input must be a function of ctx"):
        create_workflow("p").child("c", KID, input={"n": 1})  # type: ignore[arg-type]
    with pytest.raises(DefinitionError, match="retries"):
        create_workflow("p").child("c", KID, retries=-1)
    with pytest.raises(DefinitionError, match="timeout"):
        create_workflow("p").child("c", KID, timeout=-1)
    with pytest.raises(DefinitionError, match="when must be callable"):
        create_workflow("p").child("c", KID, when=True)  # type: ignore[arg-type]
    with pytest.raises(DefinitionError, match="two steps named"):
        create_workflow("p").step("c", noop).child("c", KID).build()


def test_describe_shows_child_steps_and_their_workflow() -> None:
    flow = (
        create_workflow("p")
        .step("a", noop)
        .child("by-object", KID, retries=2, timeout=30, compensate=noop)
        .child("by-name", "billing", when=lambda ctx: True)
        .sleep("nap", 1)
    )
    steps = flow.describe().steps
    assert steps[1] == StepDescriptor(
        name="by-object",
        commit=False,
        retries=2,
        timeout=30.0,
        has_condition=False,
        has_compensation=True,
        kind="child",
        child="kid",
    )
    assert [(s.kind, s.child, s.has_condition) for s in steps] == [
        ("step", None, False),
        ("child", "kid", False),
        ("child", "billing", True),
        ("sleep", None, False),
    ]
    assert flow.build().describe() == flow.describe()


def test_the_decorator_form_builds_the_same_child_step() -> None:
    wf = Workflow("p")

    @wf.child(KID, retries=1)
    def call(ctx: WorkflowContext) -> dict[str, int]:
        return {"n": 1}

    @wf.compensate(call)
    def undo_call(ctx: WorkflowContext) -> None:
        """Compensations attach to a child step by its input function too."""

    built = create_workflow("p").child("call", KID, input=call, retries=1, compensate=undo_call)
    assert wf.describe() == built.describe()
    spec = wf.build().steps[0].child
    assert spec is not None and spec.input is call


def test_waits_cannot_use_the_reserved_signal_names() -> None:
    with pytest.raises(InvalidArgumentError, match="reserved for child runs"):
        wait("flux:child:someone")
    assert wait("flux:childish").signal == "flux:childish"


def test_child_workflow_error_is_a_flux_error_everywhere() -> None:
    assert ChildWorkflowError is FromErrors and issubclass(ChildWorkflowError, FluxError)
    error = ChildWorkflowError("x", child_id="p:c", child_status="failed", workflow_id="p")
    assert (error.child_id, error.child_status, error.workflow_id) == ("p:c", "failed", "p")


def test_registering_a_parent_registers_the_workflows_its_children_name() -> None:
    grand = create_workflow("grand").step("g", noop)
    middle = create_workflow("middle").child("down", grand)
    parent = create_workflow("top").child("down", middle).child("named", "elsewhere")
    engine = FluxEngine()
    engine.register(parent)
    assert engine._registry.names == ["grand", "middle", "top"]  # a name is not registered


async def test_a_child_runs_on_each_embedded_store(engine: FluxEngine) -> None:
    parent = create_workflow("parent").child("call", KID, input=lambda ctx: {"n": ctx.input})
    result = await engine.execute(parent, 4)
    assert result.status is WorkflowStatus.COMPLETED, result.error
    assert result.history[0].output == {"v": 8}
    assert result.history[0].child_id == f"{result.id}:call"


async def test_an_async_input_function_and_a_child_input_the_child_refuses(
    engine: FluxEngine,
) -> None:
    typed = create_workflow("typed").input(lambda i: isinstance(i, int)).step("s", noop)

    async def text(ctx: WorkflowContext) -> str:
        return "not a number"

    parent = create_workflow("sends-text").child("call", typed, input=text, retries=2)
    result = await engine.execute(parent)
    assert result.status is WorkflowStatus.FAILED
    assert "Invalid input for workflow 'typed'" in str(result.error)
    assert result.history[0].retries == 0  # refused input is a mistake: not retried
