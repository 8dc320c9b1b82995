"""Owner ids and recognising a dead owner process on this machine (``fluxrun._owner``)."""

from __future__ import annotations

import os
import subprocess
import sys

from fluxrun._owner import is_dead_local_owner, new_owner_id


def test_this_process_is_alive() -> None:
    assert not is_dead_local_owner(new_owner_id())


def test_an_exited_process_is_dead() -> None:
    code = "from fluxrun._owner import new_owner_id; print(new_owner_id())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    owner = done.stdout.strip()
    assert "#" in owner  # this machine (Linux) can tell
    assert is_dead_local_owner(owner)


def test_a_reused_pid_is_not_mistaken_for_the_owner() -> None:
    base, _, identity = new_owner_id().rpartition("#")
    machine, _, started = identity.rpartition("/")
    # Same pid (this process), another start time: the owner was an earlier process.
    assert is_dead_local_owner(f"{base}#{machine}/{int(started) - 1}")


def test_owners_it_cannot_judge_keep_their_lease() -> None:
    me = new_owner_id()
    base, _, identity = me.rpartition("#")
    machine, _, started = identity.rpartition("/")
    dead_pid_elsewhere = f"otherhost:{os.getpid()}:abc#another-boot/4026531836/{started}"
    for owner in (
        "someone",
        "host:123:abc",  # no machine identity
        f"{base}#{machine}",  # malformed
        dead_pid_elsewhere,
        "host:notapid:abc#" + identity,
    ):
        assert not is_dead_local_owner(owner), owner
