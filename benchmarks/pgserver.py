"""A throw-away PostgreSQL server for tests and benchmarks: ``start_server()`` returns it running.

It runs the Debian server binaries (``/usr/lib/postgresql/<version>/bin``, or ``$VERBATIM_PG_BIN``)
from a temporary folder: ``initdb`` with trust authentication, listening on 127.0.0.1 only on a
free port, its unix socket inside the folder. PostgreSQL refuses to run as root, so as root the
server runs as ``nobody`` (the folder is given to it). ``stop()`` / ``start()`` / ``restart()``
let a test take the server away and bring it back; ``close()`` stops it and removes the folder.
Nothing here is needed to *use* verbatim with PostgreSQL: it is only a local server to test on.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time

USER = "verbatim"          # the database superuser initdb makes (trust: no password)
RUN_AS = "nobody"          # who runs the server when we are root


class ServerUnavailable(RuntimeError):
    """No PostgreSQL server binaries here, or the server would not start."""


def find_binaries() -> str | None:
    """The folder holding ``initdb``, ``pg_ctl`` and ``postgres`` (the newest version), or None."""
    candidates = [os.environ["VERBATIM_PG_BIN"]] if os.environ.get("VERBATIM_PG_BIN") else []
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                         key=lambda p: int(p.split("/")[-2]) if p.split("/")[-2].isdigit() else 0, reverse=True)
    for folder in candidates:
        if all(os.access(os.path.join(folder, name), os.X_OK) for name in ("initdb", "pg_ctl", "postgres")):
            return folder
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PostgresServer:
    def __init__(self, bindir: str, folder: str, port: int, settings: dict):
        self.bindir, self.folder, self.port = bindir, folder, port
        self.data = os.path.join(folder, "data")
        self.socket_dir = os.path.join(folder, "socket")
        self.log = os.path.join(folder, "server.log")
        self.settings = {"listen_addresses": "127.0.0.1", "port": str(port),
                         "unix_socket_directories": self.socket_dir, "max_connections": "300", **settings}
        self._prefix: list[str] = []
        self._user = None
        if os.geteuid() == 0:
            self._user = pwd.getpwnam(RUN_AS)
            self._prefix = ["setpriv", f"--reuid={self._user.pw_uid}", f"--regid={self._user.pw_gid}",
                            "--clear-groups", "--"]

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{dbname}"

    def _run(self, *args: str, timeout: float = 120) -> None:
        done = subprocess.run([*self._prefix, os.path.join(self.bindir, args[0]), *args[1:]], cwd=self.folder,
                              capture_output=True, text=True, timeout=timeout)
        if done.returncode:
            log = ""
            with contextlib.suppress(OSError):
                log = open(self.log, encoding="utf-8", errors="replace").read()[-2000:]
            raise ServerUnavailable(f"{args[0]} failed ({done.returncode}): {done.stderr.strip()} {log}")

    def init(self) -> None:
        for path in (self.socket_dir,):
            os.makedirs(path, exist_ok=True)
        if self._user is not None:
            for path in (self.folder, self.socket_dir):
                os.chown(path, self._user.pw_uid, self._user.pw_gid)
        self._run("initdb", "-D", self.data, "-U", USER, "--auth=trust", "-E", "UTF8", "--no-locale", "--no-sync")
        with open(os.path.join(self.data, "postgresql.conf"), "a", encoding="utf-8") as conf:
            for key, value in self.settings.items():
                conf.write(f"{key} = '{value}'\n")

    def start(self) -> None:
        self._run("pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "60", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def admin(self, sql: str) -> None:
        """Run one statement as the superuser in the ``postgres`` database (autocommit)."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql)

    def create_database(self, name: str) -> str:
        """A new empty database; returns its URL."""
        self.admin(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        with contextlib.suppress(ServerUnavailable, subprocess.TimeoutExpired):
            self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)


def start_server(*, settings: dict | None = None) -> PostgresServer:
    """Start a fresh server in a new temporary folder (see the module docstring); the caller
    ``close()``s it. ``settings`` are added to postgresql.conf (a test may turn ``fsync`` off)."""
    bindir = find_binaries()
    if bindir is None:
        raise ServerUnavailable("no PostgreSQL server binaries (initdb, pg_ctl, postgres) under /usr/lib/postgresql/*/bin;"
                                " install the Debian package postgresql, or set VERBATIM_PG_BIN")
    # Not under a folder only root may enter (pytest's tmp_path): the server's user must reach it.
    folder = tempfile.mkdtemp(prefix="verbatim-pg-")
    server = PostgresServer(bindir, folder, _free_port(), dict(settings or {}))
    try:
        server.init()
        started = time.monotonic()
        while True:
            try:
                server.start()
                return server
            except ServerUnavailable:  # the free port was taken meanwhile: another one
                if time.monotonic() - started > 60:
                    raise
                server.port = _free_port()
                with open(os.path.join(server.data, "postgresql.conf"), "a", encoding="utf-8") as conf:
                    conf.write(f"port = '{server.port}'\n")
    except BaseException:
        server.close()
        raise
