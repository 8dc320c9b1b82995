"""A lint: the stores never build SQL from values with f-strings or ``%`` formatting.

Values always travel as bound parameters; the only SQL the stores assemble is made of fixed
fragments (column names, placeholders). This test reads the stores' source and fails on an
``execute(...)``-like call whose query argument is an f-string or a ``%`` expression.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

STORAGE = Path(__file__).resolve().parents[2] / "fluxrun" / "storage"
QUERY_CALLS = {"execute", "executemany", "_fetchall", "_rowcount"}


def _bad_queries(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not isinstance(node, ast.Call):
            continue
        name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
        if name not in QUERY_CALLS:
            continue
        for arg in node.args[:2]:
            if isinstance(arg, ast.JoinedStr) or (
                isinstance(arg, ast.BinOp) and isinstance(arg.op, ast.Mod)
            ):
                found.append(f"{path.name}:{node.lineno}")
    return found


@pytest.mark.parametrize("path", sorted(STORAGE.glob("*.py")), ids=lambda p: p.name)
def test_no_query_is_formatted_from_values(path: Path) -> None:
    assert _bad_queries(path) == []


def test_the_lint_catches_what_it_looks_for(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text('conn.execute(f"SELECT {x}")\ncur.execute("SELECT %s" % x)\n')
    assert _bad_queries(bad) == ["bad.py:1", "bad.py:2"]
