"""Storage URL -> an Optuna storage, with heartbeats and safe connection settings.

SQLite is the embedded default. It is put in WAL mode so that readers (the dashboard, `hpo
trials`) never block the running study (optuna-dashboard#545), and waits instead of failing when
the file is busy. Server databases get `pool_pre_ping`, which Optuna sets only for MySQL
(optuna#5600), so a connection dropped while a long trial ran is replaced instead of failing.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.storages import BaseStorage, RDBStorage

from hpo._private import backend_of, microsecond_times_on_mysql, storage_of
from hpo.errors import StorageError
from hpo.storage.locks import creation_lock
from hpo.storage.resilient import ResilientRDBStorage, enable_wal, sqlite_pragmas
from hpo.storage.retry import RetryStaleTrial
from hpo.storage.tables import check_holds_studies, check_sqlite_file
from hpo.storage.urls import driver_line, mask, scrub, sqlite_path


@dataclass(frozen=True)
class Heartbeat:
    """A running trial writes a heartbeat every `interval` s; after `grace` s of silence another
    worker fails it and queues a retry that resumes from its checkpoint."""

    interval: int = 10
    grace: int = 30
    max_retry: int = 3


def _open_redis(url: str) -> BaseStorage:
    """redis://host:port/db[?prefix=name]: Optuna's journal on Redis (no heartbeats)."""
    from urllib.parse import parse_qs, urlsplit, urlunsplit

    from optuna.storages.journal import JournalRedisBackend, JournalStorage

    parts = urlsplit(url)
    prefix = parse_qs(parts.query).get("prefix", [""])[0]
    plain = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    try:
        import redis

        redis.Redis.from_url(plain, socket_connect_timeout=10).ping()
        return JournalStorage(JournalRedisBackend(plain, prefix=prefix))
    except ImportError:
        raise StorageError("redis:// storage needs the redis package: pip install 'hpo[redis]'") from None
    except Exception as e:
        raise StorageError(f"cannot open storage {mask(url)}: {scrub(driver_line(e), url)}") from None


def _open_grpc(url: str) -> BaseStorage:
    """grpc://host:port: a storage proxy started with `hpo proxy` (Optuna's gRPC server)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    try:
        port = parts.port or 13000
        host = parts.hostname or "localhost"
    except ValueError:
        raise StorageError(f"cannot open storage {mask(url)}: bad port") from None
    try:
        import grpc

        channel = grpc.insecure_channel(f"{host}:{port}")
        grpc.channel_ready_future(channel).result(timeout=5)
        channel.close()
        with warnings.catch_warnings():  # said once per worker on stderr otherwise
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.GrpcStorageProxy(host=host, port=port)
    except ImportError:
        raise StorageError("grpc:// storage needs grpcio: pip install 'hpo[grpc]'") from None
    except Exception:
        raise StorageError(f"cannot open storage {mask(url)}: no storage proxy answers there "
                           "(start one with hpo proxy)") from None


def open_storage(
    url: str, *, create: bool = True, heartbeat: Heartbeat | None = Heartbeat(), checked: bool = False,
    connections: int = 4,
) -> BaseStorage:
    """Open the storage; `create=False` (read-only commands) refuses a database without Optuna's
    tables and creates none.
    `checked`: this process's parent has just opened it (tables made, schema version checked), so
    a worker it starts skips both (about half a second each).
    `connections`: a database server's connections kept open (`hpo proxy` keeps one per thread
    that serves workers: more connect and disconnect for each request)."""
    if url.startswith(("redis://", "rediss://")):
        return _open_redis(url)
    if url.startswith("grpc://"):
        return _open_grpc(url)
    path = sqlite_path(url)
    if path is not None:
        check_sqlite_file(path, url, create)
    has_tables = not create and check_holds_studies(url, path)
    scheme = url.split(":", 1)[0].lower()
    if scheme.startswith("sqlite"):
        engine_kwargs: dict[str, object] = {"connect_args": {"timeout": 60}}
    else:
        # pre_ping replaces connections the server dropped while a long trial ran; a connect
        # timeout turns an unreachable host into an error in seconds, not minutes.
        engine_kwargs = {"pool_pre_ping": True, "pool_recycle": 3600, "pool_size": connections, "max_overflow": 8}
        if scheme.startswith(("postgresql", "mysql", "mariadb")):
            engine_kwargs["connect_args"] = {"connect_timeout": 10}
        if scheme.startswith(("mysql", "mariadb")):
            microsecond_times_on_mysql()  # Optuna's times to the second there otherwise
    hb: dict[str, object] = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if heartbeat is not None:
                hb = {
                    "heartbeat_interval": heartbeat.interval,
                    "grace_period": heartbeat.grace,
                    "heartbeat_stale_trial_callback": RetryStaleTrial(heartbeat.max_retry),
                }
            with creation_lock(url) if create else contextlib.nullcontext():
                # A read-only command found Optuna's tables there (above): it creates none, which
                # also keeps it from writing to a database of an older schema before the check.
                storage = ResilientRDBStorage(url, engine_kwargs=engine_kwargs, skip_compatibility_check=checked,
                                              skip_table_creation=checked or has_tables, **hb)
    except ImportError as e:
        missing = getattr(e.__cause__, "name", None) or e.name or "a database driver"
        extra = {"postgresql": "postgres", "mysql": "mysql", "mariadb": "mysql"}.get(scheme.split("+")[0])
        hint = f"; pip install 'hpo[{extra}]'" if extra else ""
        raise StorageError(f"cannot open storage {mask(url)}: {missing} is not installed{hint}") from None
    except Exception as e:  # SQLAlchemy reports bad URLs, refused connections, auth failures
        raise StorageError(f"cannot open storage {mask(url)}: {scrub(driver_line(e), url)}") from None
    if path is not None and not checked:
        enable_wal(storage)
    elif path is not None:
        sqlite_pragmas(storage)
    return storage


def forget_connections(study: Any) -> None:
    """In a forked child: drop the parent's pooled connections without closing them (closing
    would end the parent's sessions; SQLite forbids using a connection across a fork)."""
    backend = backend_of(storage_of(study))
    if isinstance(backend, RDBStorage):
        backend.engine.dispose(close=False)
