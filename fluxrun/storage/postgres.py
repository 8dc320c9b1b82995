"""Placeholder; replaced by the PostgreSQL store."""

from __future__ import annotations

__all__ = ["PostgresStorage"]


class PostgresStorage:
    """PostgreSQL store (being written)."""
