"""The workflows an engine knows: registered by name, and resolved from whatever a call got.

Every public method that takes a workflow accepts a builder, a ``Workflow``, a definition,
or the name of a registered one; :meth:`Registry.resolve` turns each into the definition.
"""

from __future__ import annotations

from typing import Any

from ._definition import WorkflowBuilder, WorkflowDefinition
from .errors import DefinitionError, InvalidArgumentError, UnknownWorkflowError

__all__ = ["FlowLike", "Registry"]

FlowLike = WorkflowBuilder | WorkflowDefinition | str | Any
"""A builder, a ``Workflow``, a definition, or the name of a registered workflow."""


class Registry:
    """Workflow definitions by name (one per name for now; versions side by side later)."""

    def __init__(self) -> None:
        self._by_name: dict[str, WorkflowDefinition] = {}

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> WorkflowDefinition:
        return self._by_name[name]

    @property
    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._by_name)

    @property
    def limits(self) -> dict[str, int]:
        """The concurrency limits of the workflows that declare one, by name."""
        return {n: d.concurrency.limit for n, d in self._by_name.items() if d.concurrency}

    def register(self, flow: FlowLike) -> WorkflowDefinition:
        """Register a workflow under its name.

        Raises:
            DefinitionError: another definition is registered under the same name.
        """
        definition = self.resolve(flow)
        existing = self._by_name.get(definition.name)
        if existing is not None and existing is not definition:
            if existing.step_names != definition.step_names or (
                existing.version != definition.version
            ):
                raise DefinitionError(
                    f"a different workflow named {definition.name!r} is already registered",
                    workflow_name=definition.name,
                )
        self._by_name[definition.name] = definition
        self._adopt_children(definition)
        return definition

    def adopt(self, flow: FlowLike) -> WorkflowDefinition:
        """Resolve ``flow``, and register it if no workflow has its name yet: a run
        started with a builder must be woken (from a sleep, by a signal) by the scheduler,
        which drives only registered workflows."""
        definition = self.resolve(flow)
        if definition.name not in self._by_name:
            self._by_name[definition.name] = definition
            self._adopt_children(definition)
        return definition

    def _adopt_children(self, definition: WorkflowDefinition) -> None:
        # The runs its child steps start are driven by the scheduler like any run, so the
        # workflows they name as objects are known too (a name must be registered).
        for step in definition.steps:
            if step.child is not None and not isinstance(step.child.flow, str):
                self.adopt(step.child.flow)

    def resolve(self, flow: FlowLike) -> WorkflowDefinition:
        """The definition a call's ``flow`` argument stands for.

        Raises:
            UnknownWorkflowError: a name that is not registered.
            InvalidArgumentError: not a workflow at all.
        """
        if isinstance(flow, WorkflowDefinition):
            return flow
        if isinstance(flow, str):
            found = self._by_name.get(flow)
            if found is None:
                known = ", ".join(self.names) or "none"
                raise UnknownWorkflowError(
                    f"no workflow named {flow!r} is registered (registered: {known})",
                    workflow_name=flow,
                )
            return found
        build = getattr(flow, "build", None)
        if callable(build):
            definition = build()
            if isinstance(definition, WorkflowDefinition):
                return definition
        raise InvalidArgumentError(
            "expected a workflow (builder, Workflow, WorkflowDefinition or registered name), "
            f"got {type(flow).__name__}"
        )

    def input_spec(self, name: str) -> Any:
        """The input spec of the registered workflow ``name`` (None if none or unknown)."""
        definition = self._by_name.get(name)
        return None if definition is None else definition.input_spec
