"""Storage backends and the store protocol they implement."""

from __future__ import annotations

from ._base import Store
from .memory import MemoryStorage
from .sqlite import SQLiteStorage

__all__ = ["MemoryStorage", "SQLiteStorage", "Store"]
