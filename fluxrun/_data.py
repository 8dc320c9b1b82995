"""``ctx.data`` tracked per top-level key, so a step saves only what it changed.

After an attempt, each key's cheap fingerprint is compared with the one saved last; only the
keys that changed are strictly encoded (and so validated) and written, as the step's
``changes``. The fingerprint (:func:`fluxrun._codec.fingerprint`) is exact about types, so a
change of type alone (a list made a tuple, an int made an ``IntEnum``, a key ``"1"`` made
``1``) is saved, or rejected, like any other. The encoded form of the last saved data is
kept, so a failed attempt's half-made changes can be thrown away and the result handed out
as a private copy.
"""

from __future__ import annotations

from typing import Any

from ._codec import decode, encode, fingerprint
from ._state import apply_changes, changes_text
from .errors import SerializationError

__all__ = ["TrackedData"]

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


class TrackedData:
    """The live ``ctx.data`` of a run plus what is known to be saved of it."""

    __slots__ = ("_enc", "_fp", "_max_size", "_pending", "data")

    def __init__(self, data: dict[str, Any], *, max_size: int) -> None:
        self.data = data
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
        if type(data) is not dict:
            if not isinstance(data, dict):
                raise SerializationError(
                    f"ctx.data must stay a dict, but a step set it to {type(data).__name__}"
                )
            self.data = data = dict(data)
        fps = self._fp
        sets: dict[str, tuple[str, _Print]] = {}
        for key, value in data.items():
            fp = _fingerprint(value)
            if fp is None or fps.get(key, False) != fp:
                if not isinstance(key, str):
                    raise SerializationError(
                        f"ctx.data keys must be str, got {type(key).__name__} {key!r:.40}"
                    )
                what = f"ctx.data[{key!r}]"
                encode(key, what=f"the key {what}")
                sets[key] = (encode(value, what=what, max_size=self._max_size), fp)
        dels = [k for k in self._enc if k not in data]
        if not sets and not dels:
            self._pending = None
            return None
        self._pending = (sets, dels)
        return changes_text({k: v[0] for k, v in sets.items()}, dels)

    def accept(self) -> None:
        """The pending changes were saved: they are now the saved data."""
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
        self.data = self.committed()

    def apply_recorded(self, changes: str | None) -> None:
        """Apply changes saved earlier (a commit step passed over on resume)."""
        if changes is not None:
            apply_changes(self.data, changes)
            self._remember_all()

    def saved(self) -> dict[str, str]:
        """The last saved data, encoded per key (read-only: it is the tracker's own)."""
        return self._enc

    def committed(self) -> dict[str, Any]:
        """A private copy of the last saved data."""
        return {k: decode(v) for k, v in self._enc.items()}
