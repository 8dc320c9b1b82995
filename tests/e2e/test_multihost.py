"""SPEC §7, proof on several hosts: ``fluxrun worker`` processes, each in a network namespace
of its own reaching PostgreSQL over a veth pair (loopback processes where namespaces cannot
be made), drive runs a client starts: with 1, 2 and 4 workers, with one worker killed
(``kill -9``) mid-run, and with PostgreSQL stopped ``-m immediate`` and restarted mid-run.
In every case no run is lost, no step result is recorded twice, no key of a limited
workflow has more runs at once than its limit, and no schedule tick fires twice. The same
harness prints the table of ``python -m benchmarks --only hosts``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks._multihost import proof, table

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


async def test_workers_on_several_hosts_lose_nothing() -> None:
    cases, fallback = await proof(60)
    print("\n".join(table(cases, fallback)))
    assert [(c.name, c.lost, c.twice, c.over, c.ticks_twice) for c in cases] == [
        ("1 worker(s)", 0, 0, 0, 0),
        ("2 worker(s)", 0, 0, 0, 0),
        ("4 worker(s)", 0, 0, 0, 0),
        ("kill -9 one of 2", 0, 0, 0, 0),
        ("postgres restart", 0, 0, 0, 0),
    ]
    assert all(c.ticks >= 2 for c in cases)  # the schedule fired in every case
    if os.geteuid() == 0:
        assert fallback is None, fallback  # root here: the hosts are real namespaces
