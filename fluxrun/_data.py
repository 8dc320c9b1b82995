"""``ctx.data`` tracked per top-level key, so a step saves only what it changed, and pays
only for what it touched.

``ctx.data`` is a :class:`WatchedDict`: a dict that notes the keys a step reads, writes or
deletes (and notes "all of them" when a step takes every value at once: ``values()``,
``items()``, ``copy()``, ``dict(ctx.data)``, ``{**ctx.data}``). After an attempt, the cheap
fingerprint of each key it touched is compared with the one saved last; only the keys that
changed are strictly encoded (and so validated) and written, as the step's ``changes``. A
key the step never looked at cannot have changed through ``ctx.data``, so its value is not
fingerprinted: a step's cost follows what it touched, not the size of the data. (A value
kept from an earlier step in a variable of one's own and changed later without going
through ``ctx.data`` is not seen: read it through ``ctx.data`` in the step that changes
it.) A step that replaces ``ctx.data`` with a plain dict has all of it compared.

The fingerprint (:func:`fluxrun._codec.fingerprint`) is exact about types, so a change of
type alone (a list made a tuple, an int made an ``IntEnum``, a key ``"1"`` made
``1``) is saved, or rejected, like any other. The encoded form of the last saved data is
kept, so a failed attempt's half-made changes can be thrown away and the result handed out
as a private copy.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ._codec import decode, encode, fingerprint
from ._state import apply_changes, changes_text
from .errors import SerializationError

__all__ = ["TrackedData", "WatchedDict"]

_Print = bytes | tuple[str] | None
"""A value's fingerprint (see :func:`_fingerprint`)."""

_UNLIMITED = 1 << 62


def _fingerprint(value: Any) -> _Print:
    """What tells whether a ``ctx.data`` value changed; None means "treat it as changed".

    A str (exactly: a ``StrEnum`` is not one) is immutable, so it is its own fingerprint:
    comparing it is far cheaper than pickling it. It is wrapped in a tuple to tell it from
    the bytes :func:`fingerprint` gives any other value.
    """
    if type(value) is str:
        return (value,)
    return fingerprint(value)


class WatchedDict(dict[str, Any]):
    """``ctx.data``: a dict that notes which keys a step may have changed (see the module).

    ``touched`` holds the keys read, written or deleted since the last save; ``everything``
    says that a step took all the values at once (then every key is compared).
    """

    __slots__ = ("everything", "touched")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.touched: set[Any] = set()
        self.everything = False

    def forget(self) -> None:
        """Start noting afresh (what was touched is saved now)."""
        self.touched = set()
        self.everything = False

    def __getitem__(self, key: Any) -> Any:
        self.touched.add(key)
        return super().__getitem__(key)

    def get(self, key: Any, default: Any = None) -> Any:
        self.touched.add(key)
        return super().get(key, default)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.touched.add(key)
        super().__setitem__(key, value)

    def __delitem__(self, key: Any) -> None:
        self.touched.add(key)
        super().__delitem__(key)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self.touched.add(key)
        return super().setdefault(key, default)

    def pop(self, key: Any, *default: Any) -> Any:
        self.touched.add(key)
        return super().pop(key, *default)

    def popitem(self) -> tuple[Any, Any]:
        item = super().popitem()
        self.touched.add(item[0])
        return item

    # What hands out every value (or may change any key) notes everything.
    def update(self, *args: Any, **kwargs: Any) -> None:
        self.everything = True
        super().update(*args, **kwargs)

    def clear(self) -> None:
        self.everything = True
        super().clear()

    def values(self) -> Any:
        self.everything = True
        return super().values()

    def items(self) -> Any:
        self.everything = True
        return super().items()

    def copy(self) -> dict[str, Any]:
        self.everything = True
        return dict(super().items())

    def __ior__(self, other: Any) -> WatchedDict:  # type: ignore[override]
        self.everything = True
        super().update(other)
        return self

    def __or__(self, other: Any) -> dict[str, Any]:  # type: ignore[override]
        self.everything = True
        merged = dict(super().items())
        merged.update(other)
        return merged

    def __iter__(self) -> Any:
        # Defined so that CPython's fast paths that copy a dict's values without calling
        # __getitem__ (dict(d), {**d}, other.update(d)) take the mapping path instead,
        # which reads each value through __getitem__ and so notes it.
        return super().__iter__()

    def __reduce__(self) -> Any:
        return (dict, (dict(super().items()),))


class TrackedData:
    """The live ``ctx.data`` of a run plus what is known to be saved of it."""

    __slots__ = ("_enc", "_fp", "_max_size", "_pending", "data")

    def __init__(self, data: dict[str, Any], *, max_size: int) -> None:
        self.data: dict[str, Any] = WatchedDict(data)
        self._max_size = max_size
        self._enc: dict[str, str] = {}
        self._fp: dict[str, _Print] = {}
        self._pending: tuple[dict[str, tuple[str, _Print]], list[str]] | None = None
        self._remember_all()

    def _remember_all(self) -> None:
        # The data came from the store, so it is valid; the size limit applies to new writes.
        self._enc = {
            k: encode(v, what=f"ctx.data[{k!r}]", max_size=_UNLIMITED) for k, v in self.data.items()
        }
        self._fp = {k: _fingerprint(v) for k, v in self.data.items()}

    def diff(self) -> str | None:
        """Encode what the last attempt changed; remember it as pending until :meth:`accept`.

        Raises:
            SerializationError: a changed value cannot be stored.
        """
        data = self.data
        keys: Any = None  # the keys to compare: None for all of them
        if type(data) is WatchedDict:
            if not data.everything:
                keys = data.touched
        elif type(data) is not dict:
            if not isinstance(data, dict):
                raise SerializationError(
                    f"ctx.data must stay a dict, but a step set it to {type(data).__name__}"
                )
            self.data = data = dict(data)
        fps = self._fp
        sets: dict[str, tuple[str, _Print]] = {}
        # dict.items / dict.__contains__ on the dict itself: looking must not note anything.
        pairs: Iterable[tuple[str, Any]]
        if keys is None:
            pairs = dict.items(data)
        else:
            pairs = [(k, dict.__getitem__(data, k)) for k in keys if dict.__contains__(data, k)]
        for key, value in pairs:
            fp = _fingerprint(value)
            if fp is None or fps.get(key, False) != fp:
                if not isinstance(key, str):
                    raise SerializationError(
                        f"ctx.data keys must be str, got {type(key).__name__} {key!r:.40}"
                    )
                what = f"ctx.data[{key!r}]"
                encode(key, what=f"the key {what}")
                sets[key] = (encode(value, what=what, max_size=self._max_size), fp)
        if keys is None:
            dels = [k for k in self._enc if not dict.__contains__(data, k)]
        else:
            dels = [k for k in keys if k in self._enc and not dict.__contains__(data, k)]
        if not sets and not dels:
            self._pending = None
            return None
        self._pending = (sets, dels)
        return changes_text({k: v[0] for k, v in sets.items()}, dels)

    def accept(self) -> None:
        """The pending changes were saved: they are now the saved data."""
        data = self.data
        if type(data) is WatchedDict:
            data.forget()
        else:  # replaced by a plain dict: watched from now on
            self.data = WatchedDict(data)
        if self._pending is None:
            return
        sets, dels = self._pending
        for key, (text, fp) in sets.items():
            self._enc[key] = text
            self._fp[key] = fp
        for key in dels:
            del self._enc[key]
            del self._fp[key]
        self._pending = None

    def restore(self) -> None:
        """Throw away unsaved changes: ``data`` becomes the last saved data.

        A new dict is made, so a timed-out synchronous handler that is still running keeps
        writing into the old one, which nobody reads any more.
        """
        self._pending = None
        self.data = self.fresh()

    def apply_recorded(self, changes: str | None) -> None:
        """Apply changes saved earlier (a commit step passed over on resume)."""
        if changes is not None:
            apply_changes(self.data, changes)
            self._remember_all()
            if type(self.data) is WatchedDict:
                self.data.forget()

    def saved(self) -> dict[str, str]:
        """The last saved data, encoded per key (read-only: it is the tracker's own)."""
        return self._enc

    def committed(self) -> dict[str, Any]:
        """A private copy of the last saved data."""
        return {k: decode(v) for k, v in self._enc.items()}

    def fresh(self) -> WatchedDict:
        """:meth:`committed` as the live ``ctx.data`` of the next attempt."""
        return WatchedDict(self.committed())
