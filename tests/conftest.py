"""Shared fixtures: real SQLite files in tmp dirs, small real studies, the CLI runner."""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner

from hpo.cli.run import cli
from tests import servers

torch.set_num_threads(min(2, torch.get_num_threads()))

# .ci/run sets HPO_REQUIRE_ALL=1: there a missing package or system install is a CI bug, so the
# tests that need one fail instead of skipping (elsewhere they skip, saying what to install).
REQUIRE_ALL = os.environ.get("HPO_REQUIRE_ALL") == "1"


def missing(reason: str) -> None:
    """A prerequisite of this test is absent: skip, or fail where CI promised it."""
    (pytest.fail if REQUIRE_ALL else pytest.skip)(reason)


def need_module(name: str) -> Any:
    """pytest.importorskip, except under REQUIRE_ALL, where an absent module is a failure."""
    if REQUIRE_ALL:
        import importlib

        return importlib.import_module(name)
    return pytest.importorskip(name)

# A small, real study: synthetic tabular data, a few epochs, fast enough for many tests.
SMALL: dict[str, Any] = {
    "name": "small",
    "metric": "val_accuracy",
    "seed": 3,
    "data": {"dataset": "synthetic", "n_samples": 600, "n_features": 12, "n_classes": 3},
    "space": {
        "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
        "width": {"type": "int", "low": 8, "high": 64, "log": True},
        "depth": {"type": "int", "low": 1, "high": 2},
        "batch_size": [32, 64],
    },
    "sampler": {"name": "tpe", "n_startup_trials": 3},
    "pruner": {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 1},
    "budget": {"n_trials": 6, "epochs": 4},
}


def small_spec(**overrides: Any) -> dict[str, Any]:
    """A copy of SMALL with top-level keys replaced; nested dicts are replaced whole."""
    spec = copy.deepcopy(SMALL)
    spec.update(copy.deepcopy(overrides))
    return spec


@pytest.fixture(autouse=True)
def one_worker_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """`hpo run` starts one worker process per core by default; the suite runs one in-process
    worker (deterministic, and no torch start-up per run) except where a test asks for slots
    with --workers, which overrides this."""
    monkeypatch.setenv("HPO_WORKERS", "1")


@pytest.fixture
def write_spec(tmp_path: Path):
    def write(doc: Any, name: str = "spec.yaml") -> Path:
        path = tmp_path / name
        path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
        return path

    return write


@pytest.fixture
def storage_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'hpo.db'}"


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> CliRunner:
    monkeypatch.delenv("HPO_STORAGE", raising=False)
    monkeypatch.delenv("HPO_ARTIFACTS", raising=False)
    monkeypatch.chdir(tmp_path)
    return CliRunner()


def invoke(runner: CliRunner, *args: str):
    return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False, prog_name="hpo")


def wait_for(predicate, what: str, limit: float = 120.0) -> None:
    """Poll a condition in the storage (not a timing assumption); fail if it never comes."""
    import time

    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def env_without_storage() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("HPO_STORAGE", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _server(make: Any) -> Any:
    found = make()
    if isinstance(found, str):
        missing(found)
    try:
        yield found
    finally:
        found.stop()


@pytest.fixture(scope="session")
def postgres_server():
    """PostgreSQL: the machine's on 127.0.0.1:5432, else one the suite starts (tests/servers.py)."""
    yield from _server(servers.postgres)


@pytest.fixture(scope="session")
def redis_server():
    """Redis: the machine's on 127.0.0.1:6379, else one the suite starts (tests/servers.py)."""
    yield from _server(servers.redis)


@pytest.fixture(scope="session")
def mariadb_server():
    """MariaDB: the machine's on 127.0.0.1:3306, or the test is skipped with what to install."""
    yield from _server(servers.mariadb)


def pg_admin(server: servers.Server) -> dict[str, Any]:
    return dict(host=server.host, port=server.port, user="postgres", dbname="postgres")


@pytest.fixture
def pg_url(postgres_server):
    """A fresh PostgreSQL database, dropped afterwards."""
    import uuid

    psycopg = need_module("psycopg")
    name = f"hpo_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(**pg_admin(postgres_server), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@{postgres_server.host}:{postgres_server.port}/{name}"
    finally:  # a new connection: a test may have restarted the server
        with psycopg.connect(**pg_admin(postgres_server), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def mysql_url(mariadb_server):
    """A fresh database on the MariaDB server (root, empty password), dropped afterwards."""
    import uuid

    pymysql = need_module("pymysql")
    name = f"hpo_test_{uuid.uuid4().hex[:12]}"
    where = dict(host=mariadb_server.host, port=mariadb_server.port, user="root", password="", autocommit=True)
    conn = pymysql.connect(**where)
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}`")
    conn.close()
    try:
        yield f"mysql+pymysql://root@{mariadb_server.host}:{mariadb_server.port}/{name}"
    finally:
        conn = pymysql.connect(**where)
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        conn.close()


@pytest.fixture
def redis_url(redis_server):
    """A fresh key prefix on the Redis server, its keys removed afterwards."""
    import uuid

    redis = need_module("redis")
    prefix = f"hpo-test-{uuid.uuid4().hex[:8]}"
    yield f"redis://{redis_server.host}:{redis_server.port}/0?prefix={prefix}"
    client = redis.Redis(host=redis_server.host, port=redis_server.port)
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)


@pytest.fixture
def backend_url(request, tmp_path):
    """One storage of each kind a test is parametrised over, as Optuna's tests do with
    `optuna.testing.storages`: `@pytest.mark.parametrize("backend_url", ["sqlite", "postgresql"],
    indirect=True)` gives a SQLite file in tmp_path, or a fresh database on the local server
    (postgresql, mysql) or a fresh Redis key prefix (redis)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'hpo.db'}"
    return request.getfixturevalue({"postgresql": "pg_url", "mysql": "mysql_url", "redis": "redis_url"}[request.param])


@contextlib.contextmanager
def grpc_proxy(storage: str, cwd: Path, stderr: list[str] | None = None) -> Iterator[str]:
    """`hpo proxy` serving `storage`, as grpc://127.0.0.1:PORT, stopped with Ctrl-C afterwards
    (within 30 s); what it printed is appended to `stderr` when given."""
    need_module("grpc")
    import socket

    import grpc

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proxy = subprocess.Popen([sys.executable, "-m", "hpo", "proxy", "--storage", storage,
                              "--port", str(port)], env=env_without_storage(), cwd=cwd,
                             stderr=subprocess.PIPE, text=True)
    try:
        # Wait for the proxy to listen: it imports torch and optuna first, which on a loaded CI
        # machine outlasts the 5 s a worker gives an unanswering proxy.
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=120)
        yield f"grpc://127.0.0.1:{port}"
    finally:
        proxy.send_signal(signal.SIGINT)
        _, err = proxy.communicate(timeout=30)
        if stderr is not None:
            stderr.append(err)


@pytest.fixture
def proxy_url(tmp_path, storage_url):
    """`hpo proxy` serving the test's SQLite storage, as grpc://127.0.0.1:PORT."""
    with grpc_proxy(storage_url, tmp_path) as url:
        yield url


def user_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, package: str, modules: dict[str, str]) -> Path:
    """A user's package in a folder outside the repository, importable through PYTHONPATH as an
    installed one would be, fresh for each test (not cached by hpo or Python)."""
    root = tmp_path / "site"
    (root / package).mkdir(parents=True)
    (root / package / "__init__.py").write_text("")
    for module, source in modules.items():
        (root / package / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("PYTHONPATH", str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for name in [m for m in sys.modules if m.startswith(package)]:
        monkeypatch.delitem(sys.modules, name)
    from hpo.spec import user_code

    monkeypatch.setattr(user_code, "_cache", {})
    return root
