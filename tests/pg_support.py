"""A throw-away PostgreSQL cluster for the tests: initdb + pg_ctl on a free loopback port.

The Debian package keeps ``initdb`` and ``pg_ctl`` in ``/usr/lib/postgresql/<major>/bin``
(not on ``PATH``); the newest major installed is used. ``initdb`` refuses to run as
root, so when the tests run as root the cluster belongs to the ``postgres`` OS user
(created by the package) and every server command runs through ``runuser``. The
cluster folder then lies in a fresh folder of the system temp dir, owned by
``postgres``: pytest's own tmp dir is private to root (mode 0700), which the server
process cannot enter.

A missing PostgreSQL *fails* the tests that need it (CI installs it with
``make debian-tools``); it never skips them.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

PG_ROOT = Path("/usr/lib/postgresql")
SUPERUSER = "postgres"


def find_pg_bin() -> Path:
    """The ``bin`` folder of the newest PostgreSQL major version installed."""
    candidates = []
    if PG_ROOT.is_dir():
        for folder in PG_ROOT.iterdir():
            if (folder / "bin" / "initdb").is_file() and folder.name.split(".")[0].isdigit():
                candidates.append((int(folder.name.split(".")[0]), folder / "bin"))
    if candidates:
        return max(candidates)[1]
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    raise FileNotFoundError(
        f"PostgreSQL server binaries not found in {PG_ROOT}/*/bin or on PATH; "
        "install them with `make debian-tools` (Debian package postgresql)"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PgCluster:
    """One initdb'd cluster: start, stop, restart, and a fresh database per test."""

    def __init__(self, root: Path, port: int | None = None, server_options: str = "") -> None:
        self.bin = find_pg_bin()
        self.server_options = server_options
        self.root = root
        self.data = root / "data"
        self.log = root / "server.log"
        self.port = port or free_port()
        self._as_postgres = os.geteuid() == 0

    # -- process control ----------------------------------------------------------------

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin / args[0]), *args[1:]]
        if self._as_postgres:
            command = ["runuser", "-u", SUPERUSER, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr}\n{log}")
        return result

    def init(self) -> None:
        """initdb with trust authentication on loopback (a test cluster, nothing else reaches it)."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self._as_postgres:
            user = pwd.getpwnam(SUPERUSER)
            os.chown(self.root, user.pw_uid, user.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8", "--no-sync")

    def start(self) -> None:
        """Start the server on ``127.0.0.1:port`` without a Unix socket, and wait for it."""
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=off -c max_connections=200"
        options = f"{options} {self.server_options}".strip()
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: disconnect every client, like a restart for maintenance)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def restart(self) -> None:
        self.stop()
        self.start()

    # -- databases ----------------------------------------------------------------------

    def url(self, database: str = "postgres", user: str = SUPERUSER) -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def create_database(self, prefix: str = "t") -> str:
        """A new empty database; returns its URL."""
        import psycopg

        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def give_to_server(path: Path, mode: int = 0o600) -> None:
    """Make ``path`` readable by the server process only (its key files must be private)."""
    if os.geteuid() == 0:
        user = pwd.getpwnam(SUPERUSER)
        os.chown(path, user.pw_uid, user.pw_gid)
    os.chmod(path, mode)


def start_cluster(server_options: str = "", configure: Callable[[PgCluster], None] | None = None) -> tuple[PgCluster, Path]:
    """Create and start a cluster in a fresh temp folder (see the module docstring for why there).

    ``configure`` runs between initdb and the first start (certificates, ``pg_hba.conf``).
    """
    root = Path(tempfile.mkdtemp(prefix="radnode-pg-"))
    os.chmod(root, 0o755)
    cluster = PgCluster(root / "cluster", server_options=server_options)
    cluster.init()
    if configure is not None:
        configure(cluster)
    cluster.start()
    return cluster, root


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A running PostgreSQL for the whole session; missing binaries fail the test."""
    try:
        cluster, root = start_cluster()
    except (FileNotFoundError, RuntimeError) as exc:
        pytest.fail(f"PostgreSQL is needed for this test and could not be started: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


#: The backends a contract test runs on (one parametrised run each).
BACKENDS = ["sqlite", "postgresql"]


def backend_store(request: pytest.FixtureRequest, data_dir: Path, prefix: str) -> tuple[str, Path, str | None]:
    """(backend, data dir, database URL) for ``request.param``: the URL of a fresh database, or None for SQLite."""
    if request.param == "postgresql":
        cluster: PgCluster = request.getfixturevalue("pg_cluster")
        return request.param, data_dir, cluster.create_database(prefix)
    return request.param, data_dir, None


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> str:
    """A fresh, empty database in the session cluster."""
    return pg_cluster.create_database()
