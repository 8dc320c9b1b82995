"""SPEC §7, the client in a web app: ``examples/webapp`` (Starlette, served by Uvicorn)
starts orders and approves them through a ``FluxClient`` while a ``fluxrun worker`` process
drives them; both on one SQLite file. Real processes and real HTTP on 127.0.0.1; nothing
depends on timing (``HANG`` only guards against a hang).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "webapp"
HANG = 60.0


class Proc:
    def __init__(self, log: Path, args: list[str], env: dict[str, str]) -> None:
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                args, cwd=EXAMPLE, env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, pattern: str) -> re.Match[str]:
        deadline = time.monotonic() + HANG
        while True:
            found = re.search(pattern, self.text())
            if found:
                return found
            assert self.proc.poll() is None, f"ended:\n{self.text()}"
            assert time.monotonic() < deadline, f"no {pattern!r} in:\n{self.text()}"
            time.sleep(0.05)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    env = {**os.environ, "FLUX_DB": str(tmp_path / "orders.db")}
    env.pop("FLUX_DSN", None)
    worker = Proc(
        tmp_path / "worker.log", [sys.executable, "-m", "fluxrun", "worker", "flows:engine"], env
    )
    app = Proc(
        tmp_path / "app.log",
        [sys.executable, "-m", "uvicorn", "app:app", "--host", "127.0.0.1", "--port", "0"],
        env,
    )
    try:
        worker.wait_for("ready; workflows: order")
        port = app.wait_for(r"Uvicorn running on http://127\.0\.0\.1:(\d+)").group(1)
        yield f"http://127.0.0.1:{port}"
    finally:
        for p in (app, worker):
            p.proc.terminate()
            p.proc.wait(timeout=HANG)


def _call(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=HANG) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _until(url: str, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    deadline = time.monotonic() + HANG
    while True:
        status, body = _call("GET", url)
        if status == 200 and done(body):
            return dict(body)
        assert time.monotonic() < deadline, f"still {body}"
        time.sleep(0.05)


def test_the_web_app_starts_and_approves_orders_a_worker_drives(served: str) -> None:
    status, made = _call("POST", f"{served}/orders", {"items": ["bike", "bell"]})
    assert status == 202 and made["created"] is True
    order = f"{served}/orders/{made['id']}"
    waiting = _until(order, lambda b: b["status"] == "suspended")
    assert waiting["data"] == {"reserved": ["bike", "bell"]}
    for _ in range(2):  # the second approval is the same signal (dedupe key)
        status, _body = _call("POST", f"{order}/approve", {"by": "ann"})
        assert status == 202
    done = _until(order, lambda b: b["status"] == "completed")
    assert done["data"] == {"reserved": ["bike", "bell"], "shipped_by": "ann"}
    # An order the workflow refuses fails before any step; an unknown one is a 404.
    status, bad = _call("POST", f"{served}/orders", {"items": []})
    assert status == 202
    failed = _until(f"{served}/orders/{bad['id']}", lambda b: b["status"] == "failed")
    assert "input was refused" in failed["error"] and failed["data"] == {}
    assert _call("GET", f"{served}/orders/nope")[0] == 404
    assert _call("POST", f"{served}/orders/nope/approve", {"by": "x"})[0] == 409
