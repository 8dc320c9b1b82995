"""Several "hosts" on one machine: network namespaces, each reaching the host side over a
veth pair (10.88.<n>.2 in the namespace, 10.88.<n>.1 outside), for tests and scripts that
run fluxrun workers as if on separate machines against one PostgreSQL.

Making namespaces needs root and ``ip`` (iproute2). Where they cannot be made, :func:`hosts`
gives loopback "hosts" instead (plain processes on 127.0.0.1) and says so in ``fallback``.
Nothing here reaches beyond this machine: the veth pairs connect only the namespaces to it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = ["SUBNET", "Host", "Hosts", "hosts"]

SUBNET = "10.88.0.0/16"


@dataclass(frozen=True)
class Host:
    """One host: the namespace to run in (None: this machine's own), and the address it
    reaches the database host by."""

    name: str
    netns: str | None
    db_address: str

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run on this host."""
        if self.netns is None:
            return list(argv)
        return ["ip", "netns", "exec", self.netns, *argv]


@dataclass(frozen=True)
class Hosts:
    """The hosts made, and the database host's addresses they use."""

    hosts: tuple[Host, ...]
    fallback: str | None  # why they are loopback processes, if they are

    @property
    def db_addresses(self) -> tuple[str, ...]:
        """What the database must listen on besides 127.0.0.1."""
        return tuple(sorted({h.db_address for h in self.hosts if h.netns is not None}))


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@contextmanager
def hosts(count: int, *, tag: str | None = None) -> Iterator[Hosts]:
    """``count`` hosts, removed afterwards."""
    tag = tag or str(os.getpid())
    made: list[Host] = []
    why = None
    if os.geteuid() != 0:
        why = "not root: namespaces cannot be made"
    elif shutil.which("ip") is None:
        why = "no 'ip' command (iproute2)"
    try:
        if why is None:
            try:
                for n in range(1, count + 1):
                    made.append(_make(n, tag))
            except (subprocess.CalledProcessError, OSError) as exc:
                detail = getattr(exc, "stderr", "") or str(exc)
                why = f"namespaces could not be made ({detail.strip()})"
                for host in made:
                    _remove(host, tag)
                made = []
        if why is not None:
            made = [Host(f"local-{n}", None, "127.0.0.1") for n in range(1, count + 1)]
        yield Hosts(tuple(made), why)
    finally:
        for host in made:
            if host.netns is not None:
                _remove(host, tag)


def _make(n: int, tag: str) -> Host:
    ns = f"flux-{tag}-{n}"
    outside, inside = f"fxo{tag[-5:]}{n}"[:15], f"fxi{tag[-5:]}{n}"[:15]
    _ip("netns", "add", ns)
    host = Host(f"host-{n}", ns, f"10.88.{n}.1")
    try:
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        _ip("link", "set", inside, "netns", ns)
        _ip("addr", "add", f"10.88.{n}.1/24", "dev", outside)
        _ip("link", "set", outside, "up")
        _ip("-n", ns, "addr", "add", f"10.88.{n}.2/24", "dev", inside)
        _ip("-n", ns, "link", "set", inside, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
    except BaseException:
        _remove(host, tag)
        raise
    return host


def _remove(host: Host, tag: str) -> None:
    n = host.name.rsplit("-", 1)[1]
    subprocess.run(["ip", "link", "del", f"fxo{tag[-5:]}{n}"[:15]], capture_output=True, timeout=30)
    if host.netns is not None:
        subprocess.run(["ip", "netns", "del", host.netns], capture_output=True, timeout=30)
