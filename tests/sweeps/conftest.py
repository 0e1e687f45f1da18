"""A real PostgreSQL server for the sweep tests: one per session, started by the suite on a free localhost port in a
temp folder, with a fresh database per test. Where the server (Debian's `postgresql` package: `make postgres`, which
`.ci/run` calls) or the driver (`psycopg`, dev extra) is missing, the tests that need it are skipped with the
reason. initdb and postgres refuse to run as root, so as root (CI) the server runs as the user `nobody`."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def _server_bin() -> Path | None:
    """The folder of initdb/pg_ctl: Debian keeps them off PATH, in /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return versions[-1].parent if versions else None


@dataclass(frozen=True)
class PostgresServer:
    """The session's server: its URL, and pg_ctl on its data folder (as its owner) to take it down under a test."""

    url: str
    ctl: Callable[..., None]  # ctl("stop", "-m", "fast") runs pg_ctl stop -m fast -w on the server
    options: str

    def restart(self) -> None:
        """`pg_ctl -m fast restart`: open connections are cut, the server is back in well under a second."""
        self.ctl("restart", "-m", "fast", "-o", self.options)

    def stop(self) -> None:
        self.ctl("stop", "-m", "fast")

    def start(self) -> None:
        self.ctl("start", "-o", self.options)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server that lives for the test session (see the module docstring)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("PostgreSQL tests: the driver psycopg is not installed (pip install -e '.[dev]')")
    bindir = _server_bin()
    if bindir is None:
        pytest.skip("PostgreSQL tests: no server found (initdb); `make postgres` installs Debian's postgresql package")
    root = Path(tempfile.mkdtemp(prefix="diva-pg-"))  # not under pytest's basetemp: root-only, and nobody must enter
    as_user: list[str] = []
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
        as_user = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data, env = root / "data", dict(os.environ, LC_ALL="C", HOME=str(root))

    def pg(*args: str) -> None:
        done = subprocess.run([*as_user, *args], cwd=root, env=env, capture_output=True, text=True, timeout=120)
        if done.returncode:
            log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
            raise RuntimeError(f"{' '.join(args)} failed:\n{done.stdout}{done.stderr}{log}")

    options = f"-p {port} -h 127.0.0.1 -k {root} -c fsync=off -c synchronous_commit=off"

    def ctl(command: str, *args: str) -> None:
        pg(str(bindir / "pg_ctl"), command, "-D", str(data), "-l", str(root / "server.log"), "-w", *args)

    try:
        pg(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        ctl("start", "-o", options)
        yield PostgresServer(f"postgresql://postgres@127.0.0.1:{port}", ctl, options)
    finally:
        if (data / "postmaster.pid").exists():
            pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server(postgres: PostgresServer) -> str:
    """`postgresql://postgres@127.0.0.1:<port>` of the session's server."""
    return postgres.url


@pytest.fixture
def postgres_url(postgres_server: str) -> str:
    """A URL of a database of its own for this test."""
    import psycopg

    name = f"sweep_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{postgres_server}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"{postgres_server}/{name}"
