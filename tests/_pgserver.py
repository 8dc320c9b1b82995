"""Throwaway PostgreSQL server for the test suite.

`PostgresServer.start()` runs ``initdb`` into a fresh temporary directory and starts a private
server on a free loopback port from the PostgreSQL binaries installed on the machine (for
Debian: the ``postgresql`` package, ``/usr/lib/postgresql/<version>/bin``). The server trusts
every local connection and has a superuser and a database both named ``fluxrun``::

    server = PostgresServer.start()
    try:
        print(server.dsn)  # postgresql://fluxrun@127.0.0.1:PORT/fluxrun
    finally:
        server.stop()

PostgreSQL refuses to run as root. Under root the server commands are run as the unprivileged
system user ``fluxpg`` (created on first use) through ``runuser``, and the temporary directory is
owned by that user (``setpriv`` is used when ``runuser`` is missing).

The pytest fixtures built on this live in ``tests/conftest.py``. Run this file directly to get a
server for manual experiments: ``.venv/bin/python tests/_pgserver.py``.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: Unprivileged user that runs the server when the tests run as root.
PG_SYSTEM_USER = "fluxpg"
#: Superuser created by initdb, and the name of the database created for the tests.
PG_USER = "fluxrun"
PG_DATABASE = "fluxrun"
#: Set to a directory holding initdb/pg_ctl to override the automatic lookup.
BINDIR_ENV = "FLUXRUN_PG_BINDIR"

_HOST = "127.0.0.1"
_START_ATTEMPTS = 3
_START_TIMEOUT_S = 60
_SERVER_SETTINGS = {
    "fsync": "on",
    "max_connections": "200",
    "idle_in_transaction_session_timeout": "60s",
}


class PostgresServerError(RuntimeError):
    """The throwaway server could not be set up; the message says why (with the server log)."""


def find_bindir() -> Path:
    """Directory holding the PostgreSQL server binaries (``initdb``, ``pg_ctl``, ``postgres``).

    Only ``$FLUXRUN_PG_BINDIR`` when it is set; otherwise ``pg_config --bindir``, then the
    newest ``/usr/lib/postgresql/<version>/bin``, then ``PATH``.
    """
    override = os.environ.get(BINDIR_ENV)
    candidates = [Path(override)] if override else _default_bindirs()
    for bindir in candidates:
        if all(os.access(bindir / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
            return bindir
    looked = ", ".join(str(c) for c in candidates) or "nowhere"
    raise PostgresServerError(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found; looked in: "
        f"{looked}. Install them (Debian: apt-get install postgresql) or set {BINDIR_ENV}."
    )


def _default_bindirs() -> list[Path]:
    candidates: list[Path] = []
    if pg_config := shutil.which("pg_config"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=30
            ).stdout.strip()
            if out:
                candidates.append(Path(out))
    versioned = glob.glob("/usr/lib/postgresql/*/bin")
    candidates.extend(Path(p) for p in sorted(versioned, key=_version_key, reverse=True))
    if initdb := shutil.which("initdb"):
        candidates.append(Path(initdb).resolve().parent)
    return candidates


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", Path(path).parent.name))


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def make_dsn(port: int, dbname: str = PG_DATABASE) -> str:
    return f"postgresql://{PG_USER}@{_HOST}:{port}/{dbname}"


def _ensure_system_user() -> pwd.struct_passwd:
    """Return the unprivileged server user, creating it (as a system user) if needed."""
    try:
        return pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        pass
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    argv = [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin"]
    try:
        proc = subprocess.run([*argv, PG_SYSTEM_USER], capture_output=True, text=True, timeout=60)
        outcome = f"exited {proc.returncode}: {proc.stderr.strip()}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        outcome = f"failed: {exc}"
    try:
        # Another test session may have created it concurrently: trust getpwnam, not the rc.
        return pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        raise PostgresServerError(
            f"running as root, and could not create the system user {PG_SYSTEM_USER!r} "
            f"to run PostgreSQL: {useradd} {outcome}"
        ) from None


def _drop_privileges(user: pwd.struct_passwd) -> list[str]:
    """Command prefix running the rest of the command line as `user` (we are root)."""
    if runuser := shutil.which("runuser"):
        return [runuser, "-u", user.pw_name, "--"]
    if setpriv := shutil.which("setpriv"):
        return [setpriv, f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups"]
    raise PostgresServerError("running as root, and neither runuser nor setpriv is available")


def _world_traversable_base() -> Path:
    """A directory for the server's temp dir that every user can traverse into."""
    for base in (Path(tempfile.gettempdir()), Path("/tmp")):
        path = base.resolve()
        if all(p.stat().st_mode & stat.S_IXOTH for p in (path, *path.parents)):
            return path
    raise PostgresServerError("no world-traversable temporary directory (checked $TMPDIR, /tmp)")


@dataclass
class PostgresServer:
    """A running throwaway server. Create it with `start`, end it with `stop`."""

    bindir: Path
    basedir: Path
    port: int
    run_as: pwd.struct_passwd | None = None
    startup_seconds: float = 0.0
    #: Addresses it listens on besides 127.0.0.1 (test hosts' veth ends: see tests/_hosts.py).
    extra_hosts: tuple[str, ...] = ()
    _stopped: bool = field(default=False, repr=False)

    @property
    def datadir(self) -> Path:
        return self.basedir / "data"

    @property
    def socketdir(self) -> Path:
        return self.basedir / "sock"

    @property
    def logfile(self) -> Path:
        return self.basedir / "server.log"

    @property
    def dsn(self) -> str:
        """DSN of the ``fluxrun`` database (superuser ``fluxrun``, no password)."""
        return make_dsn(self.port)

    def dsn_for(self, dbname: str) -> str:
        """DSN of another database on this server."""
        return make_dsn(self.port, dbname)

    @classmethod
    def start(cls) -> PostgresServer:
        """initdb + start + create the ``fluxrun`` database; raises `PostgresServerError`."""
        began = time.monotonic()
        try:
            bindir = find_bindir()
            run_as = _ensure_system_user() if os.geteuid() == 0 else None
            base = _world_traversable_base()
            basedir = Path(tempfile.mkdtemp(prefix="fluxrun-pg-", dir=base))
        except OSError as exc:
            raise PostgresServerError(f"cannot prepare the server: {exc}") from exc
        server = cls(bindir=bindir, basedir=basedir, port=0, run_as=run_as)
        atexit.register(server.stop)
        try:
            server._init()
            server._start()
            server._create_database(PG_DATABASE)
        except PostgresServerError:
            server.stop()
            raise
        except Exception as exc:
            log = server.log_tail()
            server.stop()
            raise PostgresServerError(
                f"{type(exc).__name__}: {exc}\n--- server log ---\n{log}"
            ) from exc
        except BaseException:
            server.stop()
            raise
        server.startup_seconds = time.monotonic() - began
        return server

    def stop(self) -> None:
        """Stop the server (fast shutdown) and delete its directory. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        if (self.datadir / "postmaster.pid").exists():
            try:
                self._pg(["pg_ctl", "stop", "-w", "-t", "60", "-m", "fast", "-D", self.datadir])
            except PostgresServerError:
                self._kill_postmaster()
        shutil.rmtree(self.basedir, ignore_errors=True)

    def _listen(self) -> str:
        return ",".join((_HOST, *self.extra_hosts))

    def serve_subnet(self, addresses: Sequence[str], subnet: str) -> None:
        """Also listen on ``addresses`` and trust clients from ``subnet`` (the test hosts of
        tests/_hosts.py); restarts the server on the same port."""
        with open(self.datadir / "pg_hba.conf", "a") as hba:
            hba.write(f"host all all {subnet} trust\n")
        self.extra_hosts = tuple(addresses)
        self._pg(["pg_ctl", "stop", "-w", "-t", "60", "-m", "fast", "-D", self.datadir])
        self.restart()

    def crash(self) -> None:
        """Stop the server as a crash would (``pg_ctl stop -m immediate``): no shutdown
        checkpoint, every connection cut."""
        self._pg(["pg_ctl", "stop", "-w", "-t", "60", "-m", "immediate", "-D", self.datadir])

    def restart(self) -> None:
        """Start the server again on the same port (after :meth:`crash`): it recovers."""
        self._pg_start()

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server log, for error messages."""
        try:
            text = self.logfile.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:]) or "(server log is empty)"

    # -- internals ------------------------------------------------------------------------

    def _init(self) -> None:
        self.basedir.chmod(0o700)
        self.socketdir.mkdir(mode=0o700)
        if self.run_as is not None:
            for path in (self.basedir, self.socketdir):
                os.chown(path, self.run_as.pw_uid, self.run_as.pw_gid)
        self._pg(
            [
                "initdb",
                "-D",
                self.datadir,
                "-A",
                "trust",
                "-U",
                PG_USER,
                "--encoding=UTF8",
                "--locale=C",
                "--no-instructions",
            ]
        )

    def _start(self) -> None:
        last_error: PostgresServerError | None = None
        for _ in range(_START_ATTEMPTS):
            # The port may be taken between free_port() and the server binding it: retry.
            self.port = free_port()
            try:
                self._pg_start()
                return
            except PostgresServerError as exc:
                last_error = exc
                self._kill_postmaster()
        assert last_error is not None
        raise last_error

    def _pg_start(self) -> None:
        """``pg_ctl start`` on ``self.port`` and the listen addresses; raise on failure."""
        settings = " ".join(f"-c {key}={value}" for key, value in _SERVER_SETTINGS.items())
        options = f"-h {self._listen()} -p {self.port} -k {self.socketdir} {settings}"
        self._pg(
            [
                "pg_ctl",
                "start",
                "-w",
                "-t",
                str(_START_TIMEOUT_S),
                "-D",
                self.datadir,
                "-l",
                self.logfile,
                "-o",
                options,
            ],
            timeout=_START_TIMEOUT_S + 30,
        )

    def _create_database(self, dbname: str) -> None:
        import psycopg

        try:
            with psycopg.connect(
                self.dsn_for("postgres"), autocommit=True, connect_timeout=30
            ) as conn:
                conn.execute(f'CREATE DATABASE "{dbname}"')
        except psycopg.Error as exc:
            raise PostgresServerError(
                f"could not create database {dbname!r}: {exc}\n--- server log ---\n"
                + self.log_tail()
            ) from exc

    def _pg(self, argv: Sequence[str | Path], timeout: float = 120) -> None:
        """Run a PostgreSQL tool from bindir, as the server user; raise on failure."""
        cmd = [str(self.bindir / str(argv[0])), *(str(a) for a in argv[1:])]
        if self.run_as is not None:
            cmd = [*_drop_privileges(self.run_as), *cmd]
        # Output goes to a file, not a pipe: the postmaster started by pg_ctl could otherwise
        # inherit the pipe and keep it open, and reading it would never finish.
        with tempfile.TemporaryFile("w+") as out:
            try:
                proc = subprocess.run(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=self.basedir,  # the server user may not be able to enter our cwd
                    timeout=timeout,
                    env={**os.environ, "LC_ALL": "C", "LANG": "C"},
                )
                returncode: int | str = proc.returncode
            except (OSError, subprocess.TimeoutExpired) as exc:
                returncode = f"error ({exc})"
            out.seek(0)
            output = out.read().strip()
        if returncode != 0:
            raise PostgresServerError(
                f"{' '.join(cmd)} failed: {returncode}\n{output}\n--- server log ---\n"
                + self.log_tail()
            )

    def _kill_postmaster(self) -> None:
        """Last resort when pg_ctl could not stop the server."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((self.datadir / "postmaster.pid").read_text().splitlines()[0])
            os.kill(pid, signal.SIGQUIT)
            for _ in range(100):
                os.kill(pid, 0)  # raises once the process is gone
                time.sleep(0.05)
            os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    _server = PostgresServer.start()
    print(f"{_server.dsn}  (started in {_server.startup_seconds:.2f}s, Ctrl-C to stop)")
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        _server.stop()
