"""Defining workflows: the builder, the decorator form, and the immutable definitions."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, overload

from ._children import ChildSpec, child_handler, child_spec, flow_name
from ._codec import validate_text
from ._concurrency import ConcurrencyLimit, check_concurrency
from ._context import SleepMarker, duration_seconds, sleep
from ._input import InputSpec
from ._invoke import is_async
from ._records import StepExecution
from ._retry import RetryPolicy, seconds
from .errors import (
    DefinitionError,
    EmptyWorkflowError,
    InvalidArgumentError,
    SerializationError,
)

if TYPE_CHECKING:
    from ._context import WorkflowContext

__all__ = [
    "InputSpec",
    "StepDefinition",
    "StepDescriptor",
    "Workflow",
    "WorkflowBuilder",
    "WorkflowDefinition",
    "WorkflowDescriptor",
    "create_workflow",
]

Handler = Callable[["WorkflowContext"], Any | Awaitable[Any]]
Condition = Callable[["WorkflowContext"], Any]
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class StepDefinition:
    """One step of a workflow. ``timeout`` is in seconds; ``retries`` None means the engine's
    default."""

    name: str
    handler: Handler
    compensate: Handler | None = None
    retries: int | None = None
    timeout: float | None = None
    when: Condition | None = None
    commit: bool = False
    retry: RetryPolicy | None = None
    kind: str = "step"
    """``"step"``, ``"sleep"`` (a builder ``.sleep`` step) or ``"child"`` (``.child``)."""
    child: ChildSpec | None = None
    """What a ``"child"`` step starts."""
    handler_is_async: bool = dataclasses.field(init=False, repr=False, compare=False)
    compensate_is_async: bool = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Decided once here rather than per call (and never cached by handler: a cache
        # keyed by handler would keep every workflow ever built alive).
        object.__setattr__(self, "handler_is_async", is_async(self.handler))
        comp = self.compensate
        object.__setattr__(self, "compensate_is_async", comp is not None and is_async(comp))


@dataclass(frozen=True, slots=True)
class StepDescriptor:
    """A serializable overview of one step."""

    name: str
    commit: bool
    retries: int | None
    timeout: float | None
    has_condition: bool
    has_compensation: bool
    kind: str = "step"
    """``"step"``, ``"sleep"`` or ``"child"``."""
    child: str | None = None
    """The workflow a ``"child"`` step starts."""


@dataclass(frozen=True, slots=True)
class WorkflowDescriptor:
    """A serializable overview of a workflow."""

    name: str
    version: str | None
    steps: tuple[StepDescriptor, ...]


@dataclass(frozen=True, slots=True)
class WorkflowDefinition:
    """An immutable, validated workflow: its name, version, input spec and ordered steps."""

    name: str
    steps: tuple[StepDefinition, ...]
    version: str | None = None
    input_spec: InputSpec | None = None
    concurrency: ConcurrencyLimit | None = None
    # Worked out once: every continuation of a run compares and copies them.
    _step_names: tuple[str, ...] = dataclasses.field(init=False, repr=False, compare=False)
    _pending: tuple[StepExecution, ...] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = tuple(s.name for s in self.steps)
        object.__setattr__(self, "_step_names", names)
        object.__setattr__(self, "_pending", tuple(StepExecution(name=n) for n in names))

    @property
    def step_names(self) -> tuple[str, ...]:
        """The names of the steps, in order."""
        return self._step_names

    @property
    def pending_history(self) -> tuple[StepExecution, ...]:
        """A run's history before any step has an outcome (every entry ``pending``)."""
        return self._pending

    def describe(self) -> WorkflowDescriptor:
        """A serializable overview of this workflow."""
        return _describe(self.name, self.version, self.steps)

    def build(self) -> WorkflowDefinition:
        """Return self, so a definition is accepted wherever a builder is."""
        return self


def _describe(
    name: str, version: str | None, steps: tuple[StepDefinition, ...] | list[StepDefinition]
) -> WorkflowDescriptor:
    return WorkflowDescriptor(
        name=name,
        version=version,
        steps=tuple(
            StepDescriptor(
                name=s.name,
                commit=s.commit,
                retries=s.retries,
                timeout=s.timeout,
                has_condition=s.when is not None,
                has_compensation=s.compensate is not None,
                kind=s.kind,
                child=None if s.child is None else flow_name(s.child.flow),
            )
            for s in steps
        ),
    )


def _name(value: object, what: str) -> str:
    try:
        return validate_text(value, what, max_length=200)
    except SerializationError as exc:
        raise DefinitionError(exc.message) from None


def _make_step(
    workflow: str,
    name: object,
    handler: object,
    *,
    commit: bool,
    retries: object,
    timeout: object,
    when: object,
    compensate: object,
    retry: object,
) -> StepDefinition:
    step = _name(name, f"step name in workflow {workflow!r}")
    where = f"step {step!r} of workflow {workflow!r}"
    if not callable(handler):
        raise DefinitionError(f"{where}: handler must be callable, got {handler!r}")
    if retries is not None and (type(retries) is not int or retries < 0):
        raise DefinitionError(f"{where}: retries must be an int >= 0, got {retries!r}")
    seconds_ = None if timeout is None else seconds(timeout, f"{where}: timeout")
    if when is not None and not callable(when):
        raise DefinitionError(f"{where}: when must be callable, got {when!r}")
    if compensate is not None:
        if commit:
            raise DefinitionError(f"{where}: a commit step cannot have a compensation")
        if not callable(compensate):
            raise DefinitionError(f"{where}: compensate must be callable, got {compensate!r}")
    if retry is not None and not isinstance(retry, RetryPolicy):
        raise DefinitionError(f"{where}: retry must be a RetryPolicy, got {retry!r}")
    return StepDefinition(
        name=step,
        handler=handler,
        compensate=compensate,
        retries=retries,
        timeout=seconds_,
        when=when,
        commit=commit,
        retry=retry,
    )


def _build(
    name: str,
    version: str | None,
    spec: InputSpec | None,
    steps: list[StepDefinition],
    concurrency: ConcurrencyLimit | None = None,
) -> WorkflowDefinition:
    if not steps:
        raise EmptyWorkflowError(f"Workflow {name!r} has no steps", workflow_name=name)
    seen: set[str] = set()
    for s in steps:
        if s.name in seen:
            raise DefinitionError(
                f"Workflow {name!r} has two steps named {s.name!r}; step names must be unique",
                workflow_name=name,
                step=s.name,
            )
        seen.add(s.name)
    return WorkflowDefinition(
        name=name, steps=tuple(steps), version=version, input_spec=spec, concurrency=concurrency
    )


class WorkflowBuilder:
    """Chainable builder of a :class:`WorkflowDefinition`; start with :func:`create_workflow`."""

    def __init__(self, name: str) -> None:
        self._name = _name(name, "workflow name")
        self._version: str | None = None
        self._spec: InputSpec | None = None
        self._steps: list[StepDefinition] = []
        self._concurrency: ConcurrencyLimit | None = None
        self._built: WorkflowDefinition | None = None

    @property
    def name(self) -> str:
        """The workflow's name."""
        return self._name

    @property
    def step_count(self) -> int:
        """How many steps were added so far."""
        return len(self._steps)

    def input(self, spec: object) -> WorkflowBuilder:
        """Validate input with a pydantic model, a dataclass type or a predicate."""
        self._spec = InputSpec(spec)
        self._built = None
        return self

    def version(self, v: str) -> WorkflowBuilder:
        """Set the definition's version string (stored with every run)."""
        self._version = _name(v, f"version of workflow {self._name!r}")
        self._built = None
        return self

    def concurrency(self, limit: int, key: Callable[[Any], Any] | None = None) -> WorkflowBuilder:
        """At most ``limit`` runs of this workflow running at once across all engines and
        workers (per ``key(input)`` when given, e.g. per customer); runs waiting on a
        signal, a sleep or a backoff do not count. See :mod:`fluxrun._concurrency`."""
        self._concurrency = check_concurrency(limit, key, self._name)
        self._built = None
        return self

    def step(
        self,
        name: str,
        handler: Handler,
        *,
        retries: int | None = None,
        timeout: float | dt.timedelta | None = None,
        when: Condition | None = None,
        compensate: Handler | None = None,
        retry: RetryPolicy | None = None,
    ) -> WorkflowBuilder:
        """Append a step; ``compensate`` undoes it if a later step fails."""
        self._steps.append(
            _make_step(
                self._name,
                name,
                handler,
                commit=False,
                retries=retries,
                timeout=timeout,
                when=when,
                compensate=compensate,
                retry=retry,
            )
        )
        self._built = None
        return self

    def sleep(
        self,
        name: str,
        duration: float | dt.timedelta,
        *,
        when: Condition | None = None,
    ) -> WorkflowBuilder:
        """Append a step that sleeps ``duration`` (seconds or timedelta), durably: the run
        holds nothing while it sleeps and wakes after any restart, never early. It shows
        in the history like any step (``completed`` when it wakes).

        Raises:
            DefinitionError: ``duration`` is not a finite duration >= 0 (at most 100 years).
        """
        try:
            marker = _sleep_marker(duration)
        except InvalidArgumentError as exc:
            raise DefinitionError(
                f"workflow {self._name!r}, sleep step {name!r}: {exc.message}",
                workflow_name=self._name,
                step=name if isinstance(name, str) else None,
            ) from None
        seconds_ = marker.seconds or 0.0

        def sleeps(ctx: Any) -> SleepMarker:
            return sleep(seconds_)

        step = _make_step(
            self._name,
            name,
            sleeps,
            commit=False,
            retries=0,
            timeout=None,
            when=when,
            compensate=None,
            retry=None,
        )
        self._steps.append(dataclasses.replace(step, kind="sleep"))
        self._built = None
        return self

    def child(
        self,
        name: str,
        flow: Any,
        *,
        input: Handler | None = None,
        retries: int | None = None,
        timeout: float | dt.timedelta | None = None,
        when: Condition | None = None,
        compensate: Handler | None = None,
        retry: RetryPolicy | None = None,
    ) -> WorkflowBuilder:
        """Append a step that runs workflow ``flow`` (a builder, ``Workflow``, definition or
        registered name) as a child run with input ``input(ctx)`` (sync or async; None: no
        input), waits for it durably, and takes the child's final ``ctx.data`` as its
        output. A child that does not complete fails the step (``retries`` start a new
        child; then the compensations run). ``timeout``: how long the step waits for its
        child (which is then cancelled); the engine's ``default_timeout`` does not apply.

        Raises:
            DefinitionError: ``flow`` is not a workflow or ``input`` not callable (or a bad
                option, as for :meth:`step`).
        """
        spec = child_spec(self._name, name, flow, input)
        step = _make_step(
            self._name,
            name,
            child_handler(spec),
            commit=False,
            retries=retries,
            timeout=timeout,
            when=when,
            compensate=compensate,
            retry=retry,
        )
        self._steps.append(dataclasses.replace(step, kind="child", child=spec))
        self._built = None
        return self

    def commit(
        self,
        name: str,
        handler: Handler,
        *,
        retries: int | None = None,
        timeout: float | dt.timedelta | None = None,
        when: Condition | None = None,
        retry: RetryPolicy | None = None,
        compensate: None = None,
    ) -> WorkflowBuilder:
        """Append a commit step: once completed it never runs again in the run.

        A commit step cannot be undone, so passing ``compensate`` raises
        :class:`DefinitionError`.
        """
        self._steps.append(
            _make_step(
                self._name,
                name,
                handler,
                commit=True,
                retries=retries,
                timeout=timeout,
                when=when,
                compensate=compensate,
                retry=retry,
            )
        )
        self._built = None
        return self

    def build(self) -> WorkflowDefinition:
        """Validate and return the immutable definition.

        Raises:
            EmptyWorkflowError: no steps were added.
            DefinitionError: two steps share a name.
        """
        if self._built is None:
            self._built = _build(
                self._name, self._version, self._spec, self._steps, self._concurrency
            )
        return self._built

    def describe(self) -> WorkflowDescriptor:
        """A serializable overview (works before any step is added)."""
        return _describe(self._name, self._version, self._steps)


def _sleep_marker(duration: object) -> SleepMarker:
    return SleepMarker(seconds=duration_seconds(duration, "sleep duration", allow_zero=True))


def create_workflow(name: str) -> WorkflowBuilder:
    """Start defining a workflow called ``name``."""
    return WorkflowBuilder(name)


class Workflow:
    """Decorator form of a workflow definition.

    Example::

        wf = Workflow("order")

        @wf.step(retries=2)
        async def reserve(ctx): ...

        @wf.compensate(reserve)
        async def release(ctx): ...

        @wf.commit
        def charge(ctx): ...

    Steps run in the order they are decorated; the function name is the step name unless
    ``name=`` is given. Decorators return the function unchanged.
    """

    def __init__(
        self,
        name: str,
        *,
        version: str | None = None,
        input: object | None = None,
        concurrency: int | None = None,
        concurrency_key: Callable[[Any], Any] | None = None,
    ) -> None:
        self._builder = WorkflowBuilder(name)
        if version is not None:
            self._builder.version(version)
        if input is not None:
            self._builder.input(input)
        if concurrency is not None or concurrency_key is not None:
            self._builder.concurrency(concurrency, concurrency_key)  # type: ignore[arg-type]
        self._compensations: dict[str, Handler] = {}

    @property
    def name(self) -> str:
        """The workflow's name."""
        return self._builder.name

    def _add(self, fn: F, commit: bool, options: dict[str, Any]) -> F:
        name = options.pop("name", None) or getattr(fn, "__name__", None)
        if commit:
            self._builder.commit(name, fn, **options)  # type: ignore[arg-type]
        else:
            self._builder.step(name, fn, **options)  # type: ignore[arg-type]
        return fn

    @overload
    def step(self, fn: F, /) -> F: ...
    @overload
    def step(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        retries: int | None = None,
        timeout: float | dt.timedelta | None = None,
        when: Condition | None = None,
        compensate: Handler | None = None,
        retry: RetryPolicy | None = None,
    ) -> Callable[[F], F]: ...
    def step(self, fn: F | None = None, /, **options: Any) -> F | Callable[[F], F]:
        """Decorate a function as the next step (bare, or called with options)."""
        if fn is not None:
            return self._add(fn, False, options)
        return lambda f: self._add(f, False, dict(options))

    @overload
    def commit(self, fn: F, /) -> F: ...
    @overload
    def commit(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        retries: int | None = None,
        timeout: float | dt.timedelta | None = None,
        when: Condition | None = None,
        retry: RetryPolicy | None = None,
    ) -> Callable[[F], F]: ...
    def commit(self, fn: F | None = None, /, **options: Any) -> F | Callable[[F], F]:
        """Decorate a function as the next commit step (bare, or called with options)."""
        if fn is not None:
            return self._add(fn, True, options)
        return lambda f: self._add(f, True, dict(options))

    def child(
        self,
        flow: Any,
        /,
        *,
        name: str | None = None,
        retries: int | None = None,
        timeout: float | dt.timedelta | None = None,
        when: Condition | None = None,
        compensate: Handler | None = None,
        retry: RetryPolicy | None = None,
    ) -> Callable[[F], F]:
        """Decorate the function giving a child step's input (``fn(ctx)``): the next step
        runs ``flow`` as a child run (see :meth:`WorkflowBuilder.child`)."""

        def add(fn: F) -> F:
            step = name or getattr(fn, "__name__", None)
            self._builder.child(
                step,  # type: ignore[arg-type]
                flow,
                input=fn,
                retries=retries,
                timeout=timeout,
                when=when,
                compensate=compensate,
                retry=retry,
            )
            return fn

        return add

    def compensate(self, step: str | Callable[..., Any]) -> Callable[[F], F]:
        """Decorate the compensation of ``step`` (its name or its decorated function)."""
        target = step if isinstance(step, str) else getattr(step, "__name__", None)
        steps = self._builder._steps
        for i, s in enumerate(steps):
            fn = s.handler if s.child is None else s.child.input
            if s.name == target or (not isinstance(step, str) and fn is step):
                index = i
                break
        else:
            raise DefinitionError(
                f"Workflow {self.name!r} has no step {target!r} to attach a compensation to",
                workflow_name=self.name,
                step=str(target),
            )

        def attach(fn: F) -> F:
            old = steps[index]
            where = f"step {old.name!r} of workflow {self.name!r}"
            if old.commit:
                raise DefinitionError(f"{where}: a commit step cannot have a compensation")
            if not callable(fn):
                raise DefinitionError(f"{where}: compensate must be callable, got {fn!r}")
            steps[index] = dataclasses.replace(old, compensate=fn)
            self._builder._built = None
            return fn

        return attach

    def build(self) -> WorkflowDefinition:
        """Validate and return the immutable definition."""
        return self._builder.build()

    def describe(self) -> WorkflowDescriptor:
        """A serializable overview of this workflow."""
        return self._builder.describe()
