"""The one JSON codec: strict encoding, typed revival, and cheap change detection.

Everything fluxrun stores (inputs, ``ctx.data``, outputs, signal payloads) goes through
:func:`encode`, so every backend receives the same text and rejects the same values:

* plain JSON values with ``str`` keys are kept as they are;
* ``datetime``, ``date``, ``time``, ``timedelta``, ``UUID``, ``Decimal``, tuples, enums,
  dataclasses and pydantic models are written as tagged objects ``{"$flux": tag, ...}`` and
  come back with their types;
* floats whose shortest form uses an exponent (``1e+16``) are tagged too, because
  PostgreSQL's ``jsonb`` would hand them back as integers, and so is ``-0.0``, which
  ``jsonb`` would hand back as ``0.0``;
* ``NaN``/``inf``, ``\\u0000``, lone surrogates, non-string keys, nesting deeper than
  :data:`MAX_DEPTH`, values larger than the size limit and every other type are rejected
  with a :class:`~fluxrun.errors.SerializationError` that names the path of the bad value.

A user dict that has the tag key itself is written as ``{"$flux": "dict", "v": [[k, v], ...]}``
(:func:`object_text` composes the same form from encoded values), so that no user key is ever
read back as a tag.

:func:`fingerprint` tells cheaply whether a value changed since it was last encoded. It is
the value's pickle: C-fast (several times faster than the C JSON encoder, and it needs no
lenient fallback for non-JSON types) and exact about everything the strict encoding depends
on, which JSON is not: a tuple is not a list, an ``IntEnum`` not an ``int``, the key ``1``
not ``"1"``, ``-0.0`` not ``0.0``, and a dataclass field hidden from ``repr`` still counts.
Two values with the same pickle rebuild to the same objects, so they have the same strict
encoding; the converse need not hold (sharing of one object at two places shows in a pickle),
which only costs a needless write. A class that pickles less state than the codec stores
(its own ``__reduce__``/``__getstate__``) could hide a change: none of the supported types do.
A value that cannot be pickled (a class defined in a function, say) has no fingerprint and is
encoded at every step.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import hashlib
import importlib
import json
import math
import pickle
import uuid
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from .errors import SerializationError

__all__ = [
    "DEFAULT_MAX_SIZE",
    "MAX_DEPTH",
    "TAG",
    "decode",
    "encode",
    "fingerprint",
    "input_hash",
    "object_text",
    "revive",
    "validate_text",
]

MAX_DEPTH = 200
"""Deepest nesting of lists and objects accepted (the top level is depth 1)."""

DEFAULT_MAX_SIZE = 1 << 20
"""Default limit, in characters of JSON, of one stored value (an input, a payload, an output,
or one top-level key of ``ctx.data``)."""

TAG = "$flux"
"""The key of a tagged object: ``{"$flux": "uuid", "v": "..."}``."""
_TAG = TAG
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


class _Reject(Exception):
    """Internal: a value cannot be encoded; ``path`` is filled in while unwinding."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path: list[str] = []


def _check_text(s: str) -> None:
    if "\x00" in s:
        raise _Reject("strings may not contain the NUL character (\\u0000)")
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise _Reject("strings may not contain lone surrogates") from None


def validate_text(value: object, what: str, *, max_length: int = 255) -> str:
    """Check a name or id: a non-empty ``str`` without NUL or lone surrogates.

    Raises:
        SerializationError: when the text cannot be stored.
    """
    if not isinstance(value, str):
        raise SerializationError(f"{what} must be a str, got {type(value).__name__}")
    if not value:
        raise SerializationError(f"{what} must not be empty")
    if len(value) > max_length:
        raise SerializationError(f"{what} is {len(value)} characters long; at most {max_length}")
    try:
        _check_text(value)
    except _Reject as r:
        raise SerializationError(f"{what}: {r.reason}") from None
    return value


def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _is_pydantic(value: object) -> bool:
    cls = type(value)
    return hasattr(cls, "model_validate") and hasattr(cls, "__pydantic_fields__")


def _plain(v: Any, depth: int) -> Any:
    """Return a JSON-ready copy of ``v`` or raise :class:`_Reject`."""
    t = type(v)
    if t is str:
        _check_text(v)
        return v
    if t is int or t is bool or v is None:
        return v
    if t is float:
        if not math.isfinite(v):
            raise _Reject(f"{v!r} is not allowed (NaN and infinities have no JSON form)")
        r = repr(v)
        return {_TAG: "float", "v": r} if "e" in r or r == "-0.0" else v
    if depth >= MAX_DEPTH:
        raise _Reject(f"nesting deeper than {MAX_DEPTH} levels")
    if t is dict or (isinstance(v, dict) and not dataclasses.is_dataclass(v)):
        return _plain_dict(v, depth)
    if t is list or (isinstance(v, list) and t is not tuple):
        return [_plain_item(x, i, depth) for i, x in enumerate(v)]
    if t is tuple:
        return {_TAG: "tuple", "v": [_plain_item(x, i, depth) for i, x in enumerate(v)]}
    return _plain_object(v, depth)


def _plain_item(x: Any, i: int, depth: int) -> Any:
    try:
        return _plain(x, depth + 1)
    except _Reject as r:
        r.path.insert(0, f"[{i}]")
        raise


def _plain_dict(v: dict[Any, Any], depth: int) -> Any:
    out: dict[str, Any] = {}
    escaped = False
    for k, x in v.items():
        if not isinstance(k, str):
            raise _Reject(f"object keys must be str, got {type(k).__name__} {k!r:.40}")
        try:
            _check_text(k)
            out[str(k)] = _plain(x, depth + 1)
        except _Reject as r:
            r.path.insert(0, f"[{k!r:.60}]")
            raise
        if k == _TAG:
            escaped = True
    if escaped:
        # A user object that happens to use the tag key: store it as pairs so that decoding
        # never mistakes it for a tagged value.
        return {_TAG: "dict", "v": [[k, x] for k, x in out.items()]}
    return out


def _clock(tag: str, v: dt.datetime | dt.time) -> dict[str, Any]:
    offset = v.utcoffset()
    if offset is not None and offset.microseconds:
        # fromisoformat drops the sub-second part of an offset: keep such an offset apart.
        micros = offset // dt.timedelta(microseconds=1)
        return {_TAG: tag, "v": v.replace(tzinfo=None).isoformat(), "o": micros}
    return {_TAG: tag, "v": v.isoformat()}


def _with_offset(value: Any, d: dict[str, Any]) -> Any:
    micros = d.get("o")
    if micros is None:
        return value
    return value.replace(tzinfo=dt.timezone(dt.timedelta(microseconds=micros)))


def _plain_object(v: Any, depth: int) -> Any:
    if isinstance(v, dt.datetime):
        return _clock("datetime", v)
    if isinstance(v, dt.date):
        return {_TAG: "date", "v": v.isoformat()}
    if isinstance(v, dt.time):
        return _clock("time", v)
    if isinstance(v, dt.timedelta):
        return {_TAG: "timedelta", "v": [v.days, v.seconds, v.microseconds]}
    if isinstance(v, uuid.UUID):
        return {_TAG: "uuid", "v": str(v)}
    if isinstance(v, Decimal):
        if not v.is_finite():
            raise _Reject(f"Decimal {v} is not allowed (only finite numbers are)")
        return {_TAG: "decimal", "v": str(v)}
    if isinstance(v, enum.Enum):
        return {_TAG: "enum", "cls": _class_path(type(v)), "v": _plain(v.value, depth + 1)}
    if isinstance(v, str):
        return _plain(str(v), depth)
    if isinstance(v, bool):
        return bool(v)
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return _plain(float(v), depth)
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        fields = {f.name: getattr(v, f.name) for f in dataclasses.fields(v)}
        return {_TAG: "dataclass", "cls": _class_path(type(v)), "v": _plain_dict(fields, depth)}
    if _is_pydantic(v):
        dumped = v.model_dump(mode="json")
        return {_TAG: "pydantic", "cls": _class_path(type(v)), "v": _plain(dumped, depth + 1)}
    raise _Reject(f"{type(v).__qualname__} is not JSON-representable")


def encode(value: Any, *, what: str = "value", max_size: int = DEFAULT_MAX_SIZE) -> str:
    """Encode ``value`` as compact JSON text, or raise a clear error.

    Args:
        value: The value to encode.
        what: Names the value in error messages (``"input"``, ``"ctx.data['cart']"``).
        max_size: Largest accepted result, in characters.

    Raises:
        SerializationError: the value cannot be stored; the message names where and why.
    """
    try:
        plain = _plain(value, 0)
    except _Reject as r:
        where = what + "".join(r.path)
        raise SerializationError(f"{where}: {r.reason}", details={"path": where}) from None
    except RecursionError:
        raise SerializationError(f"{what}: nested too deeply") from None
    try:
        text = _dumps(plain)
    except ValueError as exc:  # e.g. an integer with more digits than Python will print
        raise SerializationError(f"{what}: {exc}") from None
    if len(text) > max_size:
        raise SerializationError(
            f"{what} is {len(text)} characters of JSON; the limit is {max_size}",
            details={"size": len(text), "limit": max_size},
        )
    return text


def _resolve_class(path: str) -> type | None:
    module, _, qualname = path.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError):
        return None
    return obj if isinstance(obj, type) else None


def _revive_instance(d: dict[str, Any]) -> Any:
    tag = d[_TAG]
    cls = _resolve_class(d.get("cls", ""))
    value = d["v"]
    if tag == "enum":
        if cls is not None and issubclass(cls, enum.Enum):
            return cls(value)
        return value
    if tag == "dataclass" and cls is not None and dataclasses.is_dataclass(cls):
        init = {f.name for f in dataclasses.fields(cls) if f.init}
        obj = cls(**{k: x for k, x in value.items() if k in init})
        for k, x in value.items():
            if k not in init:
                object.__setattr__(obj, k, x)
        return obj
    if tag == "pydantic" and cls is not None and hasattr(cls, "model_validate"):
        return cls.model_validate(value)
    # The class moved or was removed since the value was stored: keep its fields.
    return value


def _revive(d: dict[str, Any]) -> Any:
    if _TAG not in d:
        return d
    tag = d[_TAG]
    v = d.get("v")
    if tag == "float":
        return float(v)  # type: ignore[arg-type]
    if tag == "datetime":
        return _with_offset(dt.datetime.fromisoformat(v), d)  # type: ignore[arg-type]
    if tag == "date":
        return dt.date.fromisoformat(v)  # type: ignore[arg-type]
    if tag == "time":
        return _with_offset(dt.time.fromisoformat(v), d)  # type: ignore[arg-type]
    if tag == "timedelta":
        days, seconds, micros = v  # type: ignore[misc]
        return dt.timedelta(days=days, seconds=seconds, microseconds=micros)
    if tag == "uuid":
        return uuid.UUID(v)
    if tag == "decimal":
        return Decimal(v)  # type: ignore[arg-type]
    if tag == "tuple":
        return tuple(v)  # type: ignore[arg-type]
    if tag == "dict":
        return dict(v)  # type: ignore[arg-type]
    if tag in ("enum", "dataclass", "pydantic"):
        return _revive_instance(d)
    raise ValueError(f"unknown tag {tag!r} in stored JSON")


def decode(text: str) -> Any:
    """Decode text written by :func:`encode`, reviving tagged values with their types."""
    return json.loads(text, object_hook=_revive)


def revive(plain: Any) -> Any:
    """What :func:`decode` makes of ``plain``, the result of a plain ``json.loads``."""
    if type(plain) is dict:
        return _revive({k: revive(x) for k, x in plain.items()})
    if type(plain) is list:
        return [revive(x) for x in plain]
    return plain


def object_text(items: Mapping[str, str]) -> str:
    """JSON text of a dict whose values are already encoded, written as :func:`encode` writes
    a dict: :func:`decode` gives back a dict with exactly these keys, even the tag key.

    The keys must be valid (str, without NUL or lone surrogates).
    """
    if _TAG in items:
        pairs = ",".join(f"[{_dumps(k)},{v}]" for k, v in items.items())
        return '{"' + _TAG + '":"dict","v":[' + pairs + "]}"
    return "{" + ",".join(f"{_dumps(k)}:{v}" for k, v in items.items()) + "}"


def fingerprint(value: Any) -> bytes | None:
    """Cheap bytes that differ whenever the strict encoding of ``value`` would, or None
    when there are none ("treat as changed"). See the module docstring.
    """
    try:
        return pickle.dumps(value, protocol=5)
    except Exception:  # unpicklable (a class defined in a function, say): treat as changed
        return None


def input_hash(text: str) -> str:
    """A digest of stored input text that two equal inputs share, whatever their key order
    (two processes may build one input in different orders): idempotent starts compare it."""
    canonical = json.dumps(json.loads(text), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()
