"""Runs started by workflow name alone (a :class:`~fluxrun.FluxClient` has no workflow code):
how the client stores one, and how the first engine that has the workflow takes it on.

The client cannot know the workflow's steps or validate its input, so it stores the run with
no step names and the input as given. The engine that claims it records the definition's
step names (and version) in one transition, after checking the input against the
workflow's input type; an input the workflow refuses fails the run at once, with nothing run.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ._codec import decode, encode
from ._context import MAX_WAIT_SECONDS
from ._definition import WorkflowDefinition
from ._driver import utcnow
from ._records import WorkflowStatus
from .errors import InvalidArgumentError, InvalidInputError
from .storage._base import RunRow, Transition

if TYPE_CHECKING:
    from ._control import NewRun
    from ._runtime import Runtime

__all__ = ["adopt_named_run", "prepare_named_run", "refused_patch"]


def prepare_named_run(
    rt: Runtime,
    name: str,
    input: Any,
    *,
    run_id: str | None,
    idempotency_key: str | None,
    delay: float | None,
    priority: int = 0,
) -> NewRun:
    """A new run of the workflow called ``name``, its input encoded as given; nothing is
    stored.

    Raises:
        InvalidInputError: the input cannot be stored.
        InvalidArgumentError: ``delay`` is longer than 100 years.
    """
    from ._codec import input_hash
    from ._control import NewRun

    if delay is not None and delay > MAX_WAIT_SECONDS:
        raise InvalidArgumentError(f"delay must be at most 100 years, got {delay:g} seconds")
    text = encode(input, what="input", max_size=rt.settings.max_value_size)
    plain = decode(text)
    now = utcnow()
    row = RunRow(
        id=run_id if run_id is not None else str(uuid.uuid4()),
        name=name,
        status=WorkflowStatus.PENDING.value,
        input=text,
        step_names=(),  # not known here: the engine that takes the run records them
        current_step=0,
        created_at=now,
        updated_at=now,
        version=1,
        fence=1,
        run_after=None if not delay else rt.settings.clock.now() + dt.timedelta(seconds=delay),
        idempotency_key=idempotency_key,
        priority=priority,
    )
    hashed = input_hash(text) if run_id is not None or idempotency_key else ""
    return NewRun(row=row, typed=plain, plain=plain, input_hash=hashed)


def refused_patch(
    rt: Runtime, row: RunRow, refused: InvalidInputError, now: dt.datetime
) -> dict[str, Any]:
    """What fails a claimed run whose input its workflow refused before any step ran (the
    input type, or a concurrency key function), logged; the run is let go."""
    message = f"the input was refused before any step ran: {refused.message}"
    rt.emitter.log.warning(f"{row.name}/{row.id}: {message}")
    return dict(
        status=WorkflowStatus.FAILED.value,
        error=message,
        completed_at=now,
        release=True,
        requested=None,
    )


async def adopt_named_run(
    rt: Runtime, row: RunRow, definition: WorkflowDefinition
) -> RunRow | None:
    """Record ``definition``'s steps on a run this engine claimed that was started by name,
    and return it so; None if the workflow refused its input (the run is then ``failed``)."""
    now = utcnow()
    spec = definition.input_spec
    refused: InvalidInputError | None = None
    if spec is not None:
        try:
            spec.validate(decode(row.input), definition.name)
        except InvalidInputError as exc:
            refused = exc
    patch: dict[str, Any] = {}
    if refused is not None:
        patch = refused_patch(rt, row, refused, now)
    applied = await rt.store.apply(
        Transition(
            run_id=row.id,
            expected_version=row.version,
            updated_at=now,
            fence=row.fence,
            step_names=definition.step_names,
            definition_version=definition.version,
            **patch,
        )
    )
    if refused is not None:
        return None
    return replace(
        row,
        version=applied.version,
        step_names=definition.step_names,
        definition_version=definition.version,
    )
