"""A database as the read-only commands meet it: the checks that it exists and holds Optuna's
tables (none is created by a command that only reads), and a connection that only reads. No
optuna: `hpo studies`, `best` and `trials` ask the database directly (hpo.search.reading)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hpo.errors import StorageError
from hpo.storage.urls import driver_line, mask, scrub, sqlite_path

SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mariadb")  # storages whose tables can be read directly


def check_holds_studies(url: str, path: Path | None) -> bool:
    """Read-only commands open only a storage that hpo (or Optuna) made: opening an empty database
    with Optuna would create its schema there. True when Optuna's tables were seen."""
    if path is not None:
        import sqlite3

        if path.stat().st_size == 0:
            raise _no_tables(url)
        try:
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
                found = db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='studies'").fetchone()
        except sqlite3.DatabaseError as e:
            raise StorageError(f"cannot open storage {mask(url)}: {e}") from None
        if not found:
            raise _no_tables(url)
        return True
    scheme = url.split(":", 1)[0].lower()
    if not scheme.startswith(("postgresql", "mysql", "mariadb")):
        return False
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    try:
        engine = create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 10})
        try:
            with engine.connect() as conn:
                return _holds_studies(conn, url)
        finally:
            engine.dispose()
    except StorageError:
        raise
    except Exception:
        return False  # unreachable or misconfigured: opening the storage says why, in one line


def _holds_studies(conn: Any, url: str) -> bool:
    from sqlalchemy import inspect

    if not inspect(conn).has_table("studies"):
        raise _no_tables(url)
    return True


def _no_tables(url: str) -> StorageError:
    return StorageError(f"no storage at {mask(url)}: it holds no Optuna tables; run a study first or name another storage")


def check_sqlite_file(path: Path, url: str, create: bool) -> None:
    shown = mask(url)
    if path.is_dir():
        raise StorageError(f"cannot open storage {shown}: {path} is a directory, not a database file")
    if not path.exists():
        if not create:
            raise StorageError(
                f"no storage at {shown} ({path} does not exist); run a study first or name another storage"
            )
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise StorageError(f"cannot create storage {shown}: folder {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise StorageError(f"cannot create storage {shown}: folder {parent} is not writable")
    elif create and not os.access(path, os.W_OK):
        raise StorageError(f"cannot write to storage {shown}: {path} is read-only")



def reads_sql(url: str) -> bool:
    """Whether the storage is a database whose tables the read-only commands can query."""
    return url.split(":", 1)[0].split("+")[0].lower() in SQL_SCHEMES


@contextlib.contextmanager
def read_only(url: str) -> Iterator[Any]:
    """A connection to a database that holds Optuna's tables, for reading: one line when there is
    no such database or it cannot be reached (as opening it with Optuna would say)."""
    from sqlalchemy import create_engine
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.pool import NullPool

    path = sqlite_path(url)
    if path is not None:
        check_sqlite_file(path, url, create=False)
        check_holds_studies(url, path)
        target, kwargs = f"sqlite:///file:{path}?mode=ro&uri=true", {}
    else:
        target, kwargs = url, {"connect_args": {"connect_timeout": 10}}
    try:
        engine = create_engine(target, poolclass=NullPool, **kwargs)
        conn = engine.connect()
    except SQLAlchemyError as e:
        raise StorageError(f"cannot open storage {mask(url)}: {scrub(driver_line(e), url)}") from None
    except ImportError as e:
        raise StorageError(f"cannot open storage {mask(url)}: {e.name or 'a database driver'} is not installed") from None
    try:
        if path is None:  # a server: asked on this connection (a second one costs a connect and its handshake)
            _holds_studies(conn, url)
        yield conn
    finally:
        conn.close()
        engine.dispose()
