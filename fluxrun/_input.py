"""How a workflow's input is validated, stored and revived (``.input(spec)``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .errors import DefinitionError, InvalidInputError

__all__ = ["InputSpec"]


class InputSpec:
    """How a workflow's input is validated, stored and revived.

    ``kind`` is ``"pydantic"`` (a model class), ``"dataclass"`` (a dataclass type) or
    ``"predicate"`` (a callable returning truthy for valid input).
    """

    __slots__ = ("kind", "target")

    def __init__(self, spec: object) -> None:
        if isinstance(spec, type) and hasattr(spec, "model_validate"):
            self.kind = "pydantic"
        elif isinstance(spec, type) and dataclasses.is_dataclass(spec):
            self.kind = "dataclass"
        elif callable(spec) and not isinstance(spec, type):
            self.kind = "predicate"
        else:
            raise DefinitionError(
                "input spec must be a pydantic model class, a dataclass type or a predicate "
                f"callable, got {spec!r}"
            )
        self.target: Any = spec

    def validate(self, raw: Any, workflow: str) -> Any:
        """Return the typed input for ``raw``, or raise :class:`InvalidInputError`."""
        target = self.target
        if self.kind == "pydantic":
            try:
                return target.model_validate(raw)
            except Exception as exc:  # pydantic.ValidationError, without importing pydantic
                details = exc.errors() if hasattr(exc, "errors") else str(exc)
                raise InvalidInputError(
                    f"Invalid input for workflow {workflow!r}: {exc}",
                    workflow_name=workflow,
                    details=details,
                ) from exc
        if self.kind == "dataclass":
            if isinstance(raw, target):
                return raw
            if not isinstance(raw, Mapping):
                raise InvalidInputError(
                    f"Invalid input for workflow {workflow!r}: expected {target.__name__} or a "
                    f"mapping of its fields, got {type(raw).__name__}",
                    workflow_name=workflow,
                )
            try:
                return target(**raw)
            except (TypeError, ValueError) as exc:
                raise InvalidInputError(
                    f"Invalid input for workflow {workflow!r}: {exc}",
                    workflow_name=workflow,
                    details=str(exc),
                ) from exc
        try:
            ok = target(raw)
        except Exception as exc:
            raise InvalidInputError(
                f"Invalid input for workflow {workflow!r}: the validator raised {exc!r}",
                workflow_name=workflow,
                details=repr(exc),
            ) from exc
        if not ok:
            raise InvalidInputError(
                f"Invalid input for workflow {workflow!r}: rejected by its validator",
                workflow_name=workflow,
            )
        return raw

    def to_plain(self, typed: Any) -> Any:
        """The JSON-ready form stored for ``typed``."""
        if self.kind == "pydantic":
            return typed.model_dump(mode="json")
        if self.kind == "dataclass":
            return {f.name: getattr(typed, f.name) for f in dataclasses.fields(typed)}
        return typed

    def revive(self, plain: Any) -> Any:
        """Rebuild the typed input from its stored form."""
        if self.kind == "pydantic":
            return self.target.model_validate(plain)
        if self.kind == "dataclass":
            return self.target(**plain)
        return plain
