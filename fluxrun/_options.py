"""Checking what the engine is given: hooks (names and signatures), sinks, names and ids;
and making errors raised while handling a run name it."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping
from typing import Any

from ._codec import validate_text
from ._trace import HOOK_NAMES
from .errors import FluxError, InvalidArgumentError, SerializationError, with_run

__all__ = ["hooks_from", "naming", "sinks_from", "text_arg"]

_CAMEL_HOOKS = {
    "stepStart": "step_start",
    "stepComplete": "step_complete",
    "stepError": "step_error",
    "workflowComplete": "workflow_complete",
    "workflowError": "workflow_error",
}
_HOOK_ARGS = {
    "step_start": ("step_name", "ctx"),
    "step_complete": ("step_name", "ctx", "execution"),
    "step_error": ("step_name", "ctx", "error"),
    "workflow_complete": ("ctx",),
    "workflow_error": ("ctx", "error"),
}


def _check_hook(key: str, name: str, fn: Any) -> None:
    """Refuse a hook that cannot be called the way the engine calls it."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin without introspectable signature: trust it
    args = _HOOK_ARGS[name]
    try:
        signature.bind(*args)
    except TypeError:
        raise InvalidArgumentError(
            f"hook {key!r} is called as {name}({', '.join(args)}), but its signature "
            f"{signature} cannot take {len(args)} positional argument(s)"
        ) from None


@contextlib.contextmanager
def naming(run_id: str, workflow_name: str | None) -> Iterator[None]:
    """Make every FluxError raised inside name the run (see ``errors.with_run``)."""
    try:
        yield
    except FluxError as exc:
        with_run(exc, run_id, workflow_name)
        raise


def hooks_from(on: object) -> dict[str, Any]:
    if on is None:
        return {}
    if isinstance(on, Mapping):
        items = dict(on)
    else:
        names = (*HOOK_NAMES, *_CAMEL_HOOKS)
        if not any(hasattr(on, n) for n in names):
            # A str, a number or a list here is a mistake, not "an object with no hooks".
            raise InvalidArgumentError(
                f"on must be a dict of hooks or an object with hook attributes "
                f"({', '.join(HOOK_NAMES)}), got {type(on).__name__}"
            )
        items = {n: getattr(on, n) for n in names if getattr(on, n, None) is not None}
    hooks: dict[str, Any] = {}
    for key, fn in items.items():
        name = _CAMEL_HOOKS.get(key, key)
        if name not in HOOK_NAMES:
            raise InvalidArgumentError(
                f"unknown hook {key!r}; the hooks are {', '.join(HOOK_NAMES)}"
            )
        if fn is None:
            continue
        if not callable(fn):
            raise InvalidArgumentError(f"hook {key!r} must be callable, got {fn!r}")
        _check_hook(key, name, fn)
        hooks[name] = fn
    return hooks


def sinks_from(trace: object) -> list[Any]:
    if trace is None:
        return []
    sinks = list(trace) if isinstance(trace, list | tuple) else [trace]
    for sink in sinks:
        if not callable(getattr(sink, "emit", None)):
            raise InvalidArgumentError(f"trace sink {sink!r} has no emit(event) method")
    return sinks


def text_arg(value: object, what: str) -> str:
    try:
        return validate_text(value, what, max_length=1000)
    except SerializationError as exc:
        raise InvalidArgumentError(exc.message) from None
