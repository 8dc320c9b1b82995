"""Numbered, forward-only schema migrations kept as ``.sql`` files per dialect."""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

__all__ = ["Migration", "migrations"]

_FILE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration: its number, file name and statements, in order."""

    version: int
    name: str
    statements: tuple[str, ...]


def _statements(sql: str) -> tuple[str, ...]:
    # Our migration files hold no semicolons inside literals, so splitting on them is safe.
    lines = [line for line in sql.splitlines() if not line.lstrip().startswith("--")]
    return tuple(s.strip() for s in "\n".join(lines).split(";") if s.strip())


def migrations(dialect: str) -> tuple[Migration, ...]:
    """The migrations of ``dialect`` (``"sqlite"`` or ``"postgres"``), oldest first."""
    folder = resources.files("fluxrun.storage").joinpath("sql", dialect)
    found = []
    for entry in folder.iterdir():
        match = _FILE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), entry.name, _statements(entry.read_text())))
    found.sort(key=lambda m: m.version)
    expected = list(range(1, len(found) + 1))
    if [m.version for m in found] != expected:
        raise RuntimeError(f"{dialect} migrations are not numbered 1..n: {found}")
    return tuple(found)
