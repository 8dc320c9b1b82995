"""The README's example is a real program: extract it and run it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_example_runs(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    example = blocks[0]
    assert len(example.strip().splitlines()) <= 20
    # The saga shape: a step with a compensation, then the commit step, then a retried step.
    shape = re.findall(r"compensate=|\.commit\(|retries=", example)
    assert shape == ["compensate=", ".commit(", "retries="]
    script = tmp_path / "example.py"
    script.write_text(example)
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("completed {")
    assert "'shipped_by': 'ann'" in done.stdout
    assert (tmp_path / "flux.db").exists()
