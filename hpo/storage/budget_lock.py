"""The study's budget lock, one per study on every kind of storage: held by a worker from "is
there budget left?" until its new trial exists (hpo.search.slots takes it)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from optuna.storages import BaseStorage, RDBStorage

from hpo._private import backend_of, redis_journal
from hpo.storage.resilient import call_with_retry


class BudgetLock:
    """A lock held from "is there budget left?" until the new trial exists.

    Without it two workers can both see one trial left and both start one. PostgreSQL and MySQL
    have named locks for this, Redis (the journal's server) a lock key, SQLite a lease file beside
    the database (the workers of one run share it), and behind a gRPC proxy the proxy checks the
    budget itself (hpo.search.proxy).

    The hold is bounded: a holder that stops answering (frozen, paused, cut off) for `hold_limit`
    seconds while holding it loses it, so one stuck worker cannot stall the study (PostgreSQL's
    idle_in_transaction_session_timeout, MySQL's wait_timeout, the Redis key's expiry, the SQLite
    lease's expiry; a SQLite holder that is gone loses it at once). Sampling and creating a trial
    take well under a second.
    """

    hold_limit = 15.0  # seconds

    def __init__(self, storage: BaseStorage, study_id: int) -> None:
        backend = backend_of(storage)  # unwrap Optuna's _CachedStorage, JournalStorage
        self.engine = backend.engine if isinstance(backend, RDBStorage) else None
        self.dialect = self.engine.dialect.name if self.engine is not None else ""
        self.key = 0x6870_6F00_0000 + study_id  # "hpo" + study id: one lock per study
        self.conn: Any = None
        self.held = False
        self.redis_lock: Any = None
        self.file: Any = None
        database = self.engine.url.database if self.engine is not None and self.dialect == "sqlite" else None
        if database and database != ":memory:":
            # The slots of one run on one SQLite file: a lock file beside it, freed by a kill.
            path = Path(database).expanduser().resolve()  # as sqlite_path(): one lease per real file
            self.file_path: Path | None = path.with_name(f".{path.name}.budget")
        else:
            self.file_path = None
        client, prefix = redis_journal(backend)
        if client is not None:
            # Expires on its own if the holder dies; a holder frees it as soon as its trial exists.
            self.redis_lock = client.lock(f"{prefix}:hpo-budget-{study_id}", timeout=60)

    def __enter__(self) -> BudgetLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        if self.dialect in ("postgresql", "mysql", "mariadb"):
            call_with_retry(self._acquire)
        elif self.redis_lock is not None:
            self.held = bool(self.redis_lock.acquire())
        elif self.file_path is not None:
            delay = 0.001
            while not self._lease(take=True):
                time.sleep(delay)  # a holder keeps it for the few ms of sampling: look again soon
                delay = min(delay * 2, 0.005)
            self.held = True

    def _acquire(self) -> None:
        # One connection for the worker's lifetime: a checkout per trial would cost a pre-ping.
        if self.conn is None:
            self.conn = self.engine.connect()  # type: ignore[union-attr]
            if self.dialect == "postgresql":  # the lock is taken inside a transaction, idle while held
                limit = int(self.hold_limit * 1000)
                self.conn.exec_driver_sql(f"SET idle_in_transaction_session_timeout = {limit}")
                self.conn.commit()
        try:
            if self.dialect == "postgresql":
                self.conn.exec_driver_sql(f"SELECT pg_advisory_lock({self.key})")
            else:
                self.conn.exec_driver_sql(f"SET SESSION wait_timeout = {max(1, int(self.hold_limit))}")
                self.conn.exec_driver_sql(f"SELECT GET_LOCK('hpo-{self.key}', 60)")
            self.held = True
        except Exception:
            self._drop()
            raise

    def _lease(self, take: bool) -> bool:
        """The SQLite lease: "owner expiry" in the file, read and written under a file lock held
        only for that. `take`: take it if free, expired, or its holder is gone (True if taken);
        else give it up if this process holds it. A flock held across sampling would make a frozen
        holder stall every worker for as long as it is frozen."""
        import fcntl

        from hpo.storage.retry import is_gone, owner

        assert self.file_path is not None
        if self.file is None:
            self.file = open(self.file_path, "a+")
        me = owner()
        fcntl.flock(self.file, fcntl.LOCK_EX)
        try:
            self.file.seek(0)
            holder, _, expiry = self.file.read().strip().rpartition(" ")
            mine = holder == me
            free = not holder or mine or float(expiry or 0) < time.time() or is_gone(holder)
            if take and free:
                self._write_lease(f"{me} {time.time() + self.hold_limit:.3f}")
            elif not take and mine:
                self._write_lease("")
            return take and free
        finally:
            fcntl.flock(self.file, fcntl.LOCK_UN)

    def _write_lease(self, text: str) -> None:
        self.file.seek(0)
        self.file.truncate()
        self.file.write(text)
        self.file.flush()

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if self.file_path is not None:
            self._lease(take=False)
            return
        if self.redis_lock is not None:
            try:
                self.redis_lock.release()
            except Exception:
                pass  # it expired: another worker may hold it now, and keeps it
            return
        try:
            if self.dialect == "postgresql":
                self.conn.exec_driver_sql(f"SELECT pg_advisory_unlock({self.key})")
            else:
                self.conn.exec_driver_sql(f"SELECT RELEASE_LOCK('hpo-{self.key}')")
                self.conn.exec_driver_sql("SET SESSION wait_timeout = DEFAULT")  # idle between trials is fine
            self.conn.commit()
        except Exception:
            self._drop()  # a dropped connection released the lock with it

    def _drop(self) -> None:
        conn, self.conn, self.held = self.conn, None, False
        if conn is not None:
            try:
                conn.invalidate()
                conn.close()
            except Exception:
                pass


@contextmanager
def holding(storage: BaseStorage, study_id: int) -> Iterator[None]:
    """The lock held over a step that changes what the budget counts without creating a trial: a
    dead process's trial failed and queued again (hpo.runtime.lifecycle.end_orphans), two writes
    between which the trial's place would look free."""
    with BudgetLock(storage, study_id):
        yield
