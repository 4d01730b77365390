"""Databases for the storage tests: a SQLite file, and a throwaway PostgreSQL server.

``database_url`` (a fixture, parametrized) is a fresh, empty database of each kind. The
PostgreSQL server is started once per test session (``postgres_server``): ``initdb`` into a
temporary folder, ``pg_ctl start`` on a free loopback port with its unix socket in that
folder, and ``pg_ctl stop`` at the end; nothing outside the folder is touched. Each test gets
its own database on it.

The binaries: ``initdb`` on PATH, else Debian's ``/usr/lib/postgresql/<version>/bin`` (the
newest), as ``.ci/run`` installs them. Without them the PostgreSQL cases are skipped, saying so (under
``.ci/run``, which sets ``CI_REQUIRE_POSTGRES=1``, they fail instead).
PostgreSQL refuses to run as root, so under root the server runs as ``nobody``.

A test module uses them with ``from tests.postgres import database_url, postgres_server``.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.servers import free_port

DEBIAN_BINARIES = Path("/usr/lib/postgresql")
START_TIMEOUT_SECONDS = 60
UNPRIVILEGED_USER = "nobody"
SUPERUSER = "tanglebox"
REQUIRED_ENV = "CI_REQUIRE_POSTGRES"  # set by .ci/run: no PostgreSQL is a failure there


def postgres_binaries() -> Path | None:
    """The folder holding initdb and pg_ctl, or None when PostgreSQL is not installed."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    versions = [folder for folder in DEBIAN_BINARIES.glob("*/bin") if (folder / "initdb").exists()]
    versions.sort(key=lambda folder: [int(n) for n in re.findall(r"\d+", folder.parent.name)])
    return versions[-1] if versions else None


class PostgresServer:
    """A PostgreSQL cluster in a temporary folder, on a free loopback port."""

    def __init__(self, binaries: Path) -> None:
        self.binaries = binaries
        self.folder = Path(tempfile.mkdtemp(prefix="tanglebox-postgres-"))
        self.data = self.folder / "data"
        self.port = free_port()
        self.user = UNPRIVILEGED_USER if os.geteuid() == 0 else None
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(self.folder, entry.pw_uid, entry.pw_gid)

    def start(self) -> "PostgresServer":
        # C.UTF-8: ILIKE folds the case of every letter, not only ASCII, whatever LANG says.
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust",
                  "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync")
        # -F: no fsync (a throwaway server); the socket stays in our folder, not /run.
        options = (f"-F -p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 "
                   "-c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.folder / "server.log"), "-w",
                  "-t", str(START_TIMEOUT_SECONDS), "-o", options, "start")
        return self

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new, empty database; its URL."""
        import psycopg
        name = "t_" + uuid.uuid4().hex
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={SUPERUSER} "
                             "dbname=postgres", autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def log(self) -> str:
        path = self.folder / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _run(self, program: str, *args: str) -> None:
        result = subprocess.run([str(self.binaries / program), *args], capture_output=True,
                                text=True, timeout=START_TIMEOUT_SECONDS + 30, user=self.user,
                                group=self.user and pwd.getpwnam(self.user).pw_gid,
                                cwd=self.folder)
        if result.returncode != 0:
            raise RuntimeError(f"{program} failed ({result.returncode}):\n{result.stderr}\n"
                               f"{self.log()}")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    binaries = postgres_binaries()
    if binaries is None:
        missing = ("PostgreSQL is not installed (no initdb on PATH or in "
                   f"{DEBIAN_BINARIES}/*/bin): install Debian's postgresql package, as .ci/run "
                   "does")
        if os.environ.get(REQUIRED_ENV) == "1":  # CI: a skip would hide untested storage
            pytest.fail(missing)
        pytest.skip(missing)
    server = PostgresServer(binaries).start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    """A fresh, empty database of each kind, as a ``databaseUrl``."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'conversations.db'}"
    return request.getfixturevalue("postgres_server").create_database()
