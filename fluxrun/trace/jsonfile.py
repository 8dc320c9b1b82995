"""NDJSON trace file: one line per event, in @gravito/flux's format."""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
import uuid
from decimal import Decimal
from typing import Any

from .._trace import FluxTraceEvent
from ..errors import InvalidArgumentError

__all__ = ["JsonFileTraceSink"]


def _plain(o: Any) -> Any:
    if isinstance(o, dt.datetime | dt.date | dt.time):
        return o.isoformat()
    if isinstance(o, uuid.UUID | Decimal):
        return str(o)
    if hasattr(o, "model_dump"):
        return o.model_dump(mode="json")
    if hasattr(o, "__dataclass_fields__"):
        return {k: getattr(o, k) for k in o.__dataclass_fields__}
    if isinstance(o, tuple | set | frozenset):
        return list(o)
    return repr(o)


class JsonFileTraceSink:
    """Appends each event as one JSON line (``event.to_dict()``) to ``path``.

    Every event is written with a single ``write`` call as it happens, with no buffering,
    so a reader of the file (a viewer, ``tail -f``) sees it at once, and lines from several
    processes appending to one file do not interleave.

    Args:
        path: The file; its directory is created if missing.
        reset: Truncate the file when the sink is created (default True).
    """

    def __init__(self, path: str | os.PathLike[str], *, reset: bool = True) -> None:
        if not isinstance(path, str | os.PathLike):
            raise InvalidArgumentError(
                f"JsonFileTraceSink path must be a str or path, got {type(path).__name__}"
            )
        if not isinstance(reset, bool):
            raise InvalidArgumentError(f"JsonFileTraceSink reset must be a bool, got {reset!r}")
        self.path = os.fspath(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if reset else 0)
        try:
            parent = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(parent, exist_ok=True)
            self._fd: int | None = os.open(self.path, flags, 0o644)
        except (OSError, ValueError) as exc:  # ValueError: a NUL character in the path
            raise InvalidArgumentError(
                f"JsonFileTraceSink cannot open {self.path!r} for writing: {exc}"
            ) from exc
        self._lock = threading.Lock()

    def emit(self, event: FluxTraceEvent) -> None:
        """Write one event as one line."""
        line = json.dumps(event.to_dict(), ensure_ascii=False, default=_plain) + "\n"
        data = line.encode("utf-8", "surrogatepass")
        with self._lock:
            if self._fd is None:
                raise InvalidArgumentError(f"JsonFileTraceSink({self.path!r}) is closed")
            os.write(self._fd, data)

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def __repr__(self) -> str:
        return f"JsonFileTraceSink({self.path!r})"
