"""ResilientRDBStorage: Optuna's RDBStorage that waits out a database restart instead of failing,
writes a trial's parameters in one transaction and several trials' reports or attributes in one
statement; `set_user_attrs` and `report_all` use those batches where the storage has them."""

from __future__ import annotations

import functools
import logging
import threading
import time
from typing import Any

import optuna
from optuna.storages import RDBStorage

from hpo._private import (
    RDB_PRIVATE_DB_METHODS,
    backend_of,
    rdb_create_new_trial,
    rdb_models,
    rdb_session,
    rdb_set_trial_param,
    reported_values,
    set_attr_without_commit,
    set_intermediate_value_without_commit,
    set_param_without_commit,
    trial_id,
)
from hpo.storage.upserts import upsert

_log = logging.getLogger("hpo.storage.resilient")

# RDBStorage methods that touch the database, including the private ones _CachedStorage and the
# heartbeat thread call directly.
_DB_METHODS = (
    "create_new_study", "set_study_user_attr", "set_study_system_attr",
    "get_study_id_from_name", "get_study_name_from_id", "get_study_directions",
    "get_study_user_attrs", "get_study_system_attrs", "get_all_studies",
    "create_new_trial", "get_trial_param", "set_trial_intermediate_value", "set_trial_user_attr",
    "set_trial_system_attr", "get_trial_user_attrs", "get_trial_system_attrs",
    "get_trial_id_from_study_id_trial_number", "get_trial", "get_all_trials",
    "get_best_trial", "record_heartbeat", *RDB_PRIVATE_DB_METHODS,
)

# What drivers say when the server or the connection is the problem (and waiting can fix it);
# "attempt to write a readonly database" or a missing table is also an OperationalError, but
# waiting would only delay the error.
_TRANSIENT = (
    "database is locked", "could not connect", "connection refused", "server closed",
    "terminating connection", "connection reset", "broken pipe", "lost connection",
    "gone away", "timed out", "timeout expired", "connection is closed", "connection was closed",
    "ssl syscall", "the database system is", "can't connect", "connection to server",
    "no connection to the server", "consuming input failed",
)


def is_connection_error(e: BaseException | None) -> bool:
    """A dropped or refused connection (server restart, network blip, SQLite busy), as opposed
    to a bad query, a read-only file or a constraint violation, which retrying cannot fix."""
    from sqlalchemy import exc

    while e is not None:
        if isinstance(e, exc.DBAPIError) and e.connection_invalidated:
            return True
        if isinstance(e, exc.PendingRollbackError):  # a transaction the server dropped
            return True
        if isinstance(e, (exc.OperationalError, exc.InterfaceError)):
            text = str(e.orig if e.orig is not None else e).lower()
            return any(marker in text for marker in _TRANSIENT)
        e = e.__cause__  # Optuna wraps SQLAlchemy errors in StorageInternalError
    return False


class ResilientRDBStorage(RDBStorage):
    """RDBStorage that waits out a database restart (retrying with backoff) instead of failing,
    and writes a trial's parameters in one transaction. It keeps RDBStorage's contract (Optuna's
    StorageTestCase runs against it in tests/test_storage_contract.py).

    The heartbeat thread's writes are retried too: otherwise one failed heartbeat would end the
    thread and the healthy trial would later be declared stale.
    """

    retry_for: float = 300.0  # seconds of outage tolerated before the error is raised

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._batch_state()

    def _batch_state(self) -> None:
        self._params: list[tuple[Any, ...]] = []  # parameters not written yet (see set_trial_param)
        self._params_lock = threading.Lock()
        self._running: dict[int, int] = {}  # trial id -> study id, of the trials this object started
        self._known: dict[tuple[int, str], Any] = {}  # (study id, parameter) -> a distribution it holds

    def __getstate__(self) -> dict[Any, Any]:
        """Picklable as RDBStorage is (joblib, copy.deepcopy of a study): what it holds back is
        written first, and the copy starts with no lock, batch or cache of its own."""
        self.write_params()
        state = super().__getstate__()
        for name in ("_params", "_params_lock", "_running", "_known"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__(state)
        self._batch_state()
        if self.engine.name == "sqlite":
            sqlite_pragmas(self)

    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float, distribution: Any) -> None:
        study = self._running.get(trial_id)
        known = self._known.get((study, param_name)) if study is not None else None
        if known is not None:
            try:
                optuna.distributions.check_distribution_compatibility(known, distribution)
            except ValueError:
                known = None  # the database has the last word, below
        self._set_trial_param(trial_id, param_name, param_value_internal, distribution, known)

    def _set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float, distribution: Any,
                         previous_distribution: Any) -> None:
        """As RDBStorage: a finished or unknown trial raises, a distribution that does not match the
        study's raises ValueError, at this call. Where this object started the trial and the
        study's distribution of the parameter is known (Optuna's cached storage passes it; else
        this object saw it), the check is made here and the write held until the next call, which
        writes the trial's parameters in one transaction: Optuna's suggest API commits each one on
        its own, the largest storage cost of a short trial after its reports. Any other call
        writes them first, so nothing reads the trial without them."""
        study = self._running.get(trial_id)
        if study is None or previous_distribution is None:
            self._db(rdb_set_trial_param, self, trial_id, param_name, param_value_internal, distribution,
                     previous_distribution)
            if study is not None:
                self._known.setdefault((study, param_name), distribution)
            return
        optuna.distributions.check_distribution_compatibility(previous_distribution, distribution)
        with self._params_lock:
            self._params.append((trial_id, param_name, param_value_internal, distribution, previous_distribution))

    def _create_new_trial(self, study_id: int, template_trial: Any = None) -> Any:
        frozen = self._db(rdb_create_new_trial, self, study_id, template_trial)
        if frozen.state == optuna.trial.TrialState.RUNNING:
            self._running[trial_id(frozen)] = study_id
        return frozen

    def set_trial_state_values(self, trial_id: int, state: Any, values: Any = None) -> bool:
        done: bool = self._db(super().set_trial_state_values, trial_id, state, values)
        if state.is_finished():
            self._running.pop(trial_id, None)
        return done

    def delete_study(self, study_id: int) -> None:
        self._db(super().delete_study, study_id)
        self._known = {k: v for k, v in self._known.items() if k[0] != study_id}
        self._running = {t: s for t, s in self._running.items() if s != study_id}

    def _db(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        """A database call: what is held back is written first, and a dropped connection is retried."""
        if self._params:
            self.write_params()
        return call_with_retry(method, *args, retry_for=self.retry_for, on_retry=self.reset_session, **kwargs)

    def write_params(self) -> None:
        """What set_trial_param held back, a transaction per trial (behind `hpo proxy` the held
        parameters can be several workers'). A trial ended meanwhile by another process (failed
        as stale) takes its parameters with it, as its own next write will say; the others are
        written all the same."""
        with self._params_lock:
            pending, self._params = self._params, []
        by_trial: dict[int, list[tuple[Any, ...]]] = {}
        for args in pending:
            by_trial.setdefault(args[0], []).append(args)
        for rows in by_trial.values():

            def write(rows: list[tuple[Any, ...]] = rows) -> None:
                with rdb_session(self) as session:
                    for args in rows:
                        set_param_without_commit(self, session, *args)

            try:
                call_with_retry(write, retry_for=self.retry_for, on_retry=self.reset_session)
            except (optuna.exceptions.UpdateFinishedTrialError, KeyError):
                self._running.pop(rows[0][0], None)

    def set_trial_user_attrs(self, trial_id: int, attrs: dict[str, Any]) -> None:
        """Several user attributes in one transaction: Optuna's API commits each one apart,
        and a trial's end-of-trial facts were four commits (a few ms each on a server)."""
        import json

        self.write_params()

        models = rdb_models()

        table = models.TrialUserAttributeModel
        rows = [{"trial_id": trial_id, "key": k, "value_json": json.dumps(v)} for k, v in attrs.items()]

        def one_by_one(session: Any) -> None:
            for key, value in attrs.items():
                set_attr_without_commit(self, session, table, trial_id, key, value)

        self._upsert(table, rows, [table.trial_id, table.key], one_by_one)

    def set_trials_intermediate_values(self, reports: list[tuple[int, int, float]]) -> None:
        """(trial id, step, value) of several trials in one statement: a fused round reports K
        trials at once, and Optuna's API takes two queries and a commit for each."""
        self.write_params()
        models = rdb_models()

        table = models.TrialIntermediateValueModel
        rows = []
        for tid, step, value in reports:
            stored, kind = table.intermediate_value_to_stored_repr(value)
            rows.append({"trial_id": tid, "step": step, "intermediate_value": stored,
                         "intermediate_value_type": kind})

        def one_by_one(session: Any) -> None:
            for tid, step, value in reports:
                set_intermediate_value_without_commit(self, session, tid, step, value)

        self._upsert(table, rows, [table.trial_id, table.step], one_by_one)

    def _upsert(self, table: Any, rows: list[dict[str, Any]], keys: list[Any], one_by_one: Any) -> None:
        def write() -> None:
            with rdb_session(self) as session:
                upsert(self, session, table, rows, keys, one_by_one)

        call_with_retry(write, retry_for=self.retry_for, on_retry=self.reset_session)

    def reset_session(self) -> None:
        """Drop this thread's session: after the server dropped a connection mid-transaction
        (a restart), SQLAlchemy refuses every later use of it until it is rolled back."""
        self.scoped_session.remove()


def _batching(trial: Any) -> ResilientRDBStorage | None:
    """The storage under `trial` (Optuna wraps an RDBStorage in a cache) where it can write
    several rows in one statement; None where writes go one by one through Optuna's API."""
    backend = backend_of(trial.storage)
    return backend if isinstance(backend, ResilientRDBStorage) else None


def set_user_attrs(trial: Any, attrs: dict[str, Any]) -> None:
    """Write a trial's user attributes in one commit where the storage can, else one by one."""
    backend = _batching(trial)
    if backend is not None and len(attrs) > 1:
        backend.set_trial_user_attrs(trial_id(trial), attrs)
        cached = getattr(trial, "_cached_frozen_trial", None)  # what trial.user_attrs returns
        if cached is not None:
            cached.user_attrs.update(attrs)
    else:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)


def report_all(reports: list[tuple[Any, float, int]]) -> None:
    """Trial.report for several (trial, value, step) in one commit where the storage can. As
    Trial.report, a step already reported (a retry's inherited values) is left as it was."""
    fresh = [(t, float(v), int(s)) for t, v, s in reports if int(s) not in reported_values(t)]
    backend = _batching(fresh[0][0]) if fresh else None
    if backend is not None and len(fresh) > 1:
        try:
            backend.set_trials_intermediate_values([(trial_id(t), s, v) for t, v, s in fresh])
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # one was ended elsewhere (failed as stale): report one by one, so it raises alone
        else:
            for t, v, s in fresh:
                reported_values(t)[s] = v
            return
    for t, v, s in fresh:  # Trial.report's own write (it refuses a study of several objectives)
        t.storage.set_trial_intermediate_value(trial_id(t), s, v)
        reported_values(t)[s] = v


def call_with_retry(fn: Any, *args: Any, retry_for: float = 300.0, on_retry: Any = None, **kwargs: Any) -> Any:
    """Call `fn`, retrying with backoff while the database is unreachable; `on_retry` resets
    what the failed attempt may have left behind (a session stuck in a dead transaction)."""
    delay, deadline, warned = 0.25, time.monotonic() + retry_for, False
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if not is_connection_error(e) or time.monotonic() > deadline:
                raise
            if not warned:
                _log.warning("storage unreachable (%s); retrying for up to %.0f s",
                             type(e).__name__, deadline - time.monotonic())
                warned = True
            if on_retry is not None:
                try:
                    on_retry()
                except Exception:
                    pass  # the server is still down; the next attempt says so
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def _retrying(name: str) -> Any:
    method = getattr(RDBStorage, name)

    @functools.wraps(method)
    def wrapper(self: ResilientRDBStorage, *args: Any, **kwargs: Any) -> Any:
        if name == "record_heartbeat":  # from the heartbeat thread: the trial's own thread writes its parameters
            return call_with_retry(method, self, *args, retry_for=self.retry_for, on_retry=self.reset_session,
                                   **kwargs)
        return self._db(method, self, *args, **kwargs)

    return wrapper

for _name in _DB_METHODS:
    setattr(ResilientRDBStorage, _name, _retrying(_name))


def enable_wal(storage: RDBStorage) -> None:
    """WAL (a property of the file) so readers never block the writer, and synchronous=NORMAL
    (per connection): in WAL mode a commit then needs no fsync, and the database stays
    consistent through a crash of the process; only a power cut can lose the last commits."""
    sqlite_pragmas(storage)
    with storage.engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA journal_mode=WAL")


def sqlite_pragmas(storage: RDBStorage) -> None:
    from sqlalchemy import event

    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    event.listen(storage.engine, "connect", on_connect)
    storage.engine.dispose()  # connections opened before the listener existed are replaced
