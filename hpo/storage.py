"""Storage URL -> an Optuna storage, with heartbeats and safe connection settings.

SQLite is the embedded default. It is put in WAL mode so that readers (the dashboard, `hpo
trials`) never block the running study (optuna-dashboard#545), and waits instead of failing when
the file is busy. Server databases get `pool_pre_ping`, which Optuna sets only for MySQL
(optuna#5600), so a connection dropped while a long trial ran is replaced instead of failing.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.storages import BaseStorage, RDBStorage, RetryHeartbeatStaleTrialCallback

from hpo.errors import StorageError

DEFAULT_STORAGE = "sqlite:///hpo.db"
ENV_STORAGE = "HPO_STORAGE"


@dataclass(frozen=True)
class Heartbeat:
    """A running trial writes a heartbeat every `interval` s; after `grace` s of silence another
    worker fails it and queues a retry that resumes from its checkpoint."""

    interval: int = 10
    grace: int = 30
    max_retry: int = 3


def resolve_url(url: str | None) -> str:
    """--storage, else $HPO_STORAGE, else the embedded SQLite file."""
    return url or os.environ.get(ENV_STORAGE) or DEFAULT_STORAGE


def mask(url: str) -> str:
    """The URL with any password replaced by ***, for messages, logs and the dashboard."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        if "@" in url and "://" in url:
            scheme, rest = url.split("://", 1)
            creds, host = rest.rsplit("@", 1)
            user = creds.split(":", 1)[0]
            return f"{scheme}://{user}:***@{host}"
        return url


def sqlite_path(url: str) -> Path | None:
    """The file behind a sqlite URL, or None for other URLs and in-memory SQLite."""
    if not url.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(url).database
    if not database or database == ":memory:":
        return None
    return Path(database)


def _check_sqlite_file(path: Path, url: str, create: bool) -> None:
    shown = mask(url)
    if path.is_dir():
        raise StorageError(f"cannot open storage {shown}: {path} is a directory, not a database file")
    if not path.exists():
        if not create:
            raise StorageError(
                f"no storage at {shown} ({path} does not exist); run a study first or pass --storage"
            )
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise StorageError(f"cannot create storage {shown}: folder {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise StorageError(f"cannot create storage {shown}: folder {parent} is not writable")
    elif create and not os.access(path, os.W_OK):
        raise StorageError(f"cannot write to storage {shown}: {path} is read-only")


def open_storage(
    url: str, *, create: bool = True, heartbeat: Heartbeat | None = Heartbeat()
) -> BaseStorage:
    """Open the storage; `create=False` refuses to create a new SQLite file (read-only commands)."""
    path = sqlite_path(url)
    if path is not None:
        _check_sqlite_file(path, url, create)
    scheme = url.split(":", 1)[0].lower()
    if scheme.startswith("sqlite"):
        engine_kwargs: dict[str, object] = {"connect_args": {"timeout": 60}}
    else:
        engine_kwargs = {"pool_pre_ping": True, "pool_recycle": 3600}
    hb: dict[str, object] = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if heartbeat is not None:
                hb = {
                    "heartbeat_interval": heartbeat.interval,
                    "grace_period": heartbeat.grace,
                    "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(
                        max_retry=heartbeat.max_retry, inherit_intermediate_values=True
                    ),
                }
            storage = RDBStorage(url, engine_kwargs=engine_kwargs, **hb)  # type: ignore[arg-type]
    except ImportError as e:
        raise StorageError(f"cannot open storage {mask(url)}: driver not installed ({e.name or e})") from None
    except Exception as e:  # SQLAlchemy reports bad URLs, refused connections, auth failures
        raise StorageError(f"cannot open storage {mask(url)}: {_reason(e)}") from None
    if path is not None:
        _enable_wal(storage)
    return storage


def _enable_wal(storage: RDBStorage) -> None:
    # WAL is a property of the file, so setting it once per open is enough and cheap.
    with storage.engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA journal_mode=WAL")


def _reason(e: BaseException) -> str:
    """The first meaningful line of a driver error, without SQL or URLs."""
    orig = getattr(e, "orig", None)
    text = str(orig if orig is not None else e).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = lines[0] if lines else type(e).__name__
    if "Can't load plugin" in line:
        return f"unknown database kind ({line.split(':')[-1].strip()})"
    if "Could not parse" in line:
        return "not a valid storage URL (expected e.g. sqlite:///hpo.db or postgresql://user@host/db)"
    return line
