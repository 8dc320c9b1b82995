"""A workflow's concurrency limit: ``.concurrency(limit, key=...)`` (SPEC §7).

At most ``limit`` runs of the workflow (per key, when ``key`` is given: a function of the
run's input, e.g. the customer) hold a slot at once, across every engine and worker of the
database; runs waiting unowned (on a signal, a sleep, a stored backoff, a pause) hold none.
The store enforces it in its claim (:mod:`fluxrun.storage._concurrency` has the rules);
this module validates the declaration and works out a run's key.

Every run of a limited workflow is therefore started unowned and taken by a claim, never
driven at once by the call that made it due: ``execute``, ``signal``, ``resume`` and the
other direct actions of such a workflow hand the run to the scheduler and wait for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._codec import decode
from .errors import DefinitionError, InvalidInputError
from .storage._concurrency import MAX_KEY_LENGTH
from .storage._limits import INT32_MAX
from .storage._types import RunRow, Transition

if TYPE_CHECKING:
    from ._definition import WorkflowDefinition
    from ._runtime import Runtime

__all__ = ["ConcurrencyLimit", "assign_key", "check_concurrency", "concurrency_key"]


@dataclass(frozen=True, slots=True)
class ConcurrencyLimit:
    """``limit`` runs at once, per value of ``key(input)`` (all runs share one group
    without ``key``)."""

    limit: int
    key: Callable[[Any], Any] | None = None


def check_concurrency(limit: object, key: object, workflow: str) -> ConcurrencyLimit:
    """The declaration, validated.

    Raises:
        DefinitionError: ``limit`` is not a positive integer or ``key`` not callable.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= INT32_MAX:
        raise DefinitionError(
            f"the concurrency limit of workflow {workflow!r} must be a positive integer, "
            f"got {limit!r}",
            workflow_name=workflow,
        )
    if key is not None and not callable(key):
        raise DefinitionError(
            f"the concurrency key of workflow {workflow!r} must be a function of the input, "
            f"got {key!r}",
            workflow_name=workflow,
        )
    return ConcurrencyLimit(limit, key)


def concurrency_key(limit: ConcurrencyLimit, typed_input: Any, workflow: str) -> str:
    """The group a new run counts in: ``""`` without a key function, else its result as
    text (a string, or an integer written in decimal).

    Raises:
        InvalidInputError: the key function raised, or returned something else, or text
            longer than :data:`MAX_KEY_LENGTH` characters or holding a NUL character.
    """
    if limit.key is None:
        return ""
    try:
        value = limit.key(typed_input)
    except Exception as exc:
        raise InvalidInputError(
            f"the concurrency key function of workflow {workflow!r} raised {exc!r}",
            workflow_name=workflow,
        ) from exc
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise InvalidInputError(
            f"the concurrency key of workflow {workflow!r} must be a string or an integer, "
            f"got {value!r}",
            workflow_name=workflow,
        )
    if len(value) > MAX_KEY_LENGTH or "\x00" in value:
        raise InvalidInputError(
            f"the concurrency key of workflow {workflow!r} must be at most {MAX_KEY_LENGTH} "
            f"characters with no NUL character, got {value[:40]!r}...",
            workflow_name=workflow,
        )
    return value


async def assign_key(rt: Runtime, row: RunRow, definition: WorkflowDefinition) -> None:
    """Record the group of a claimed run of a limited workflow that was stored without one
    (started by name or by a schedule, or before the workflow had a limit), and put it back
    for a claim that counts it (this claim did not); a key function that refuses the input
    fails the run, with nothing run."""
    # Not at the top: these modules import the definitions, which import this one.
    from ._driver import utcnow
    from ._named import refused_patch

    assert definition.concurrency is not None
    spec = definition.input_spec
    now = utcnow()
    patch: dict[str, Any] = {}
    try:
        plain = decode(row.input)
        key = concurrency_key(
            definition.concurrency, plain if spec is None else spec.revive(plain), row.name
        )
        patch["concurrency_key"] = key
    except InvalidInputError as exc:
        patch = refused_patch(rt, row, exc, now)
    await rt.store.apply(
        Transition(
            run_id=row.id,
            expected_version=row.version,
            updated_at=now,
            fence=row.fence,
            **{"release": True, **patch},
        )
    )
