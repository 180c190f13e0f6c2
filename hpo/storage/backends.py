"""Storage URL -> an Optuna storage, with heartbeats and safe connection settings.

SQLite is the embedded default. It is put in WAL mode so that readers (the dashboard, `hpo
trials`) never block the running study (optuna-dashboard#545), and waits instead of failing when
the file is busy. Server databases get `pool_pre_ping`, which Optuna sets only for MySQL
(optuna#5600), so a connection dropped while a long trial ran is replaced instead of failing.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, RDBStorage

from hpo._private import (
    backend_of,
    microsecond_times_on_mysql,
    rdb_models,
    rdb_session,
    redis_journal,
    reported_values,
    set_param_without_commit,
    storage_of,
    trial_id,
)
from hpo.errors import SettingError, StorageError
from hpo.storage.retry import RetryStaleTrial

_log = logging.getLogger("hpo.storage.backends")

DEFAULT_STORAGE = "sqlite:///hpo.db"
ENV_STORAGE = "HPO_STORAGE"
ENV_WRITER = "HPO_SQLITE_WRITER"  # "<pid>:<path>:<study>" of the run holding a study on SQLite, for its workers


@dataclass(frozen=True)
class Heartbeat:
    """A running trial writes a heartbeat every `interval` s; after `grace` s of silence another
    worker fails it and queues a retry that resumes from its checkpoint."""

    interval: int = 10
    grace: int = 30
    max_retry: int = 3


def resolve_url(url: str | None) -> str:
    """--storage, else $HPO_STORAGE, else the embedded SQLite file. A blank value is a mistake
    (an unset variable in a script, say), not a request for the default."""
    if url is not None and not url.strip():
        raise SettingError("storage", "is empty; give a storage URL, or leave it out for sqlite:///hpo.db")
    env = os.environ.get(ENV_STORAGE)
    if url is None and env is not None and not env.strip():
        raise StorageError(f"{ENV_STORAGE} is set but empty; unset it for sqlite:///hpo.db, or give a storage URL")
    resolved = url or env or DEFAULT_STORAGE
    scheme, _, rest = resolved.partition("://")
    if scheme.split("+")[0].lower() in ("postgresql", "mysql", "mariadb") and not rest.strip("/"):
        raise StorageError(f"{resolved} names no server or database; write {scheme}://USER@HOST/DATABASE")
    return resolved


def mask(url: str) -> str:
    """The URL with any password replaced by ***, for messages, logs and the dashboard, and a
    relative SQLite file's absolute path beside it. Parsed by
    hand, not by a URL library: the credentials run to the *last* '@' (a password with an
    unencoded '@' must not show its tail), and `password=` in the query is masked too."""
    if "://" not in url:
        return url
    if (db := sqlite_path(url)) is not None and not url.startswith("sqlite:////"):
        return f"{url} ({db})"  # a relative file: where it is (runs from another folder use another file)
    scheme, rest = url.split("://", 1)
    if "@" in rest:
        creds, host = rest.rsplit("@", 1)
        if ":" in creds:
            rest = f"{creds.split(':', 1)[0]}:***@{host}"
    return re.sub(r"(?i)([?&](?:password|passwd|pwd)=)[^&]*", r"\1***", f"{scheme}://{rest}")


def scrub(text: str, url: str) -> str:
    """A driver's message with every piece of the URL's password masked: a password with an
    unencoded '@' is split by the driver, which may quote the tail as a host name."""
    rest = url.split("://", 1)[-1]
    if "@" in rest and ":" in rest.rsplit("@", 1)[0]:
        password = rest.rsplit("@", 1)[0].split(":", 1)[1]
        for piece in sorted({password, *password.split("@")}, key=len, reverse=True):
            if len(piece) >= 2:
                text = text.replace(piece, "***")
    return text


def sqlite_path(url: str) -> Path | None:
    """The file behind a sqlite URL, or None for other URLs and in-memory SQLite: resolved, so a
    file reached through a symlink or `..` is known as itself (its one-writer and budget locks)."""
    if not url.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(url).database
    if not database or database == ":memory:":
        return None
    return Path(database).expanduser().resolve()


@contextlib.contextmanager
def creation_lock(url: str) -> Iterator[None]:
    """Serialise creating a storage's schema and a study's bookkeeping across processes.

    Optuna creates its tables and a study's rows without a lock of its own: two processes opening a
    fresh SQLite file (or three `hpo create` on a fresh PostgreSQL database) at the same instant
    race on the schema, and two opening a new study may record different checkpoint ids. A file
    lock beside the SQLite file, or a server-side named lock, makes them take turns."""
    path = sqlite_path(url)
    if path is not None:
        import fcntl

        if not path.parent.is_dir():
            yield  # the missing folder is reported by the caller
            return
        with open(path.with_name(f".{path.name}.lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return
    scheme = url.split(":", 1)[0].lower()
    if not scheme.startswith(("postgresql", "mysql", "mariadb")):
        yield
        return
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    try:
        engine = create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 10})
        conn = engine.connect()
    except Exception:
        yield  # unreachable or misconfigured: opening the storage says why, in one line
        return
    key = 0x6870_6F43_5245  # "hpoCRE"
    try:
        if scheme.startswith("postgresql"):
            conn.exec_driver_sql(f"SELECT pg_advisory_lock({key})")
        else:
            conn.exec_driver_sql("SELECT GET_LOCK('hpo-create', 120)")
        yield
    finally:
        try:
            conn.exec_driver_sql(f"SELECT pg_advisory_unlock({key})" if scheme.startswith("postgresql")
                                 else "SELECT RELEASE_LOCK('hpo-create')")
        finally:
            conn.close()
            engine.dispose()


@contextlib.contextmanager
def sole_writer(url: str, study: str) -> Iterator[None]:
    """Hold a study on an embedded SQLite file for this run: a second `hpo run` or `hpo worker` of
    the same study on the same file is refused in one line (other studies on the file, and readers
    such as `hpo dashboard`, are not). Several processes share one file safely on a local disk:
    WAL mode, a 60 s busy timeout, the retried transactions of ResilientRDBStorage, the creation
    lock and the budget's file lock; each process takes its share of the CPUs. What stays refused
    is a second run of one study, which has its own workers (`--workers K`) and would double
    them. A kill releases it with the process."""
    path = sqlite_path(url)
    if path is None or not path.parent.is_dir():
        yield
        return
    if (kind := network_filesystem(path.resolve())) is not None:
        raise StorageError(f"{path} is on a network filesystem ({kind}): SQLite's locks and WAL mode do not work "
                           "across machines, so hpo does not write it there; keep the file on a local disk, or use "
                           "a server storage (postgresql://, mysql+pymysql://) for workers on several machines")
    held = f"{os.getppid()}:{path.resolve()}:{study}"
    if os.environ.get(ENV_WRITER) == held:
        yield  # a worker started by the `hpo run` that holds the study: its slots share it
        return
    import fcntl
    import hashlib

    tag = re.sub(r"[^A-Za-z0-9_.-]", "_", study)[:40] + "-" + hashlib.sha1(study.encode()).hexdigest()[:8]
    with open(path.with_name(f".{path.name}.{tag}.writer"), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "?"
            raise StorageError(
                f"study {study} in {path} is being run by another hpo process (pid {pid}): on a SQLite file a "
                "study is run by one hpo run at a time, which runs its own workers (as many as its workers "
                "setting says). Wait for it, or use a server storage (postgresql://, mysql+pymysql://) to add "
                "workers from elsewhere"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        before = os.environ.get(ENV_WRITER)
        os.environ[ENV_WRITER] = f"{os.getpid()}:{path.resolve()}:{study}"  # inherited by this run's workers
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(ENV_WRITER, None)
            else:
                os.environ[ENV_WRITER] = before
            fcntl.flock(f, fcntl.LOCK_UN)


NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "ceph", "glusterfs", "lustre", "gpfs",
                       "beegfs", "fuse.sshfs", "fuse.glusterfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.rclone")


def network_filesystem(path: Path, mountinfo: str | None = None) -> str | None:
    """The type of the network filesystem `path` lies on (from /proc/self/mountinfo), or None."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return None  # not Linux: nothing to go on
    best, kind = "", None
    for line in mountinfo.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        point = fields[4].replace("\\040", " ")
        fstype = line.split(" - ", 1)[1].split()[0]
        inside = str(path) == point or str(path).startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fstype
    return kind if kind in NETWORK_FILESYSTEMS else None


def _check_holds_studies(url: str, path: Path | None) -> None:
    """Read-only commands open only a storage that hpo (or Optuna) made: opening an empty database
    with Optuna would create its schema there."""
    empty = StorageError(f"no storage at {mask(url)}: it holds no Optuna tables; run a study first or name another storage")
    if path is not None:
        import sqlite3

        if path.stat().st_size == 0:
            raise empty
        try:
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
                found = db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='studies'").fetchone()
        except sqlite3.DatabaseError as e:
            raise StorageError(f"cannot open storage {mask(url)}: {e}") from None
        if not found:
            raise empty
        return
    scheme = url.split(":", 1)[0].lower()
    if not scheme.startswith(("postgresql", "mysql", "mariadb")):
        return
    from sqlalchemy import create_engine, inspect
    from sqlalchemy.pool import NullPool

    try:
        engine = create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 10})
        try:
            found = inspect(engine).has_table("studies")
        finally:
            engine.dispose()
    except Exception:
        return  # unreachable or misconfigured: opening the storage says why, in one line
    if not found:
        raise empty


def _check_sqlite_file(path: Path, url: str, create: bool) -> None:
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


# RDBStorage methods that touch the database, including the private ones _CachedStorage and the
# heartbeat thread call directly.
_DB_METHODS = (
    "create_new_study", "set_study_user_attr", "set_study_system_attr",
    "get_study_id_from_name", "get_study_name_from_id", "get_study_directions",
    "get_study_user_attrs", "get_study_system_attrs", "get_all_studies",
    "create_new_trial", "get_trial_param", "set_trial_intermediate_value", "set_trial_user_attr",
    "set_trial_system_attr", "get_trial_user_attrs", "get_trial_system_attrs",
    "get_trial_id_from_study_id_trial_number", "get_trial", "get_all_trials", "_get_trials",
    "get_best_trial", "_get_best_trial_id", "record_heartbeat", "_get_stale_trial_ids",
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
            _sqlite_pragmas(self)

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
            self._db(super()._set_trial_param, trial_id, param_name, param_value_internal, distribution,
                     previous_distribution)
            if study is not None:
                self._known.setdefault((study, param_name), distribution)
            return
        optuna.distributions.check_distribution_compatibility(previous_distribution, distribution)
        with self._params_lock:
            self._params.append((trial_id, param_name, param_value_internal, distribution, previous_distribution))

    def _create_new_trial(self, study_id: int, template_trial: Any = None) -> Any:
        frozen = self._db(super()._create_new_trial, study_id, template_trial)
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
                self._set_trial_attr_without_commit(session, table, trial_id, key, value)

        self._upsert(table, rows, [table.trial_id, table.key], one_by_one)

    def set_trials_intermediate_values(self, reports: list[tuple[int, int, float]]) -> None:
        """(trial id, step, value) of several trials in one statement: a fused round reports K
        trials at once, and Optuna's API takes two queries and a commit for each."""
        self.write_params()
        models = rdb_models()

        table = models.TrialIntermediateValueModel
        rows = []
        for trial_id, step, value in reports:
            stored, kind = table.intermediate_value_to_stored_repr(value)
            rows.append({"trial_id": trial_id, "step": step, "intermediate_value": stored,
                         "intermediate_value_type": kind})

        def one_by_one(session: Any) -> None:
            for trial_id, step, value in reports:
                self._set_trial_intermediate_value_without_commit(session, trial_id, step, value)

        self._upsert(table, rows, [table.trial_id, table.step], one_by_one)

    def _upsert(self, table: Any, rows: list[dict[str, Any]], keys: list[Any], one_by_one: Any) -> None:
        """One multi-row upsert into a trial's child table, as Optuna's per-row writes do one
        row at a time, after the same check that every trial is still running."""
        import sqlite3

        models = rdb_models()
        from sqlalchemy import select
        from sqlalchemy.dialects import mysql, postgresql, sqlite

        dialect = self.engine.name
        ids = sorted({r["trial_id"] for r in rows})
        update = [c for c in rows[0] if c not in {k.key for k in keys}]

        def write() -> None:
            with rdb_session(self) as session:
                trials = models.TrialModel
                found = select(trials.trial_id, trials.state).where(trials.trial_id.in_(ids))
                states: dict[int, Any] = dict(session.execute(found).all())
                for trial_id in ids:
                    if trial_id not in states:
                        raise KeyError(f"No trial with trial_id {trial_id} exists.")
                    self.check_trial_is_updatable(trial_id, states[trial_id])
                if dialect == "postgresql" or (dialect == "sqlite" and sqlite3.sqlite_version_info >= (3, 24)):
                    ins = (postgresql if dialect == "postgresql" else sqlite).insert(table).values(rows)
                    session.execute(ins.on_conflict_do_update(
                        index_elements=keys, set_={c: ins.excluded[c] for c in update}))
                elif dialect == "mysql":
                    my = mysql.insert(table).values(rows)
                    session.execute(my.on_duplicate_key_update({c: my.inserted[c] for c in update}))
                else:
                    one_by_one(session)

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
        raise StorageError(f"cannot open storage {mask(url)}: {scrub(_reason(e), url)}") from None


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
        return optuna.storages.GrpcStorageProxy(host=host, port=port)
    except ImportError:
        raise StorageError("grpc:// storage needs grpcio: pip install 'hpo[grpc]'") from None
    except Exception:
        raise StorageError(f"cannot open storage {mask(url)}: no storage proxy answers there "
                           "(start one with hpo proxy)") from None


def open_storage(
    url: str, *, create: bool = True, heartbeat: Heartbeat | None = Heartbeat(), checked: bool = False
) -> BaseStorage:
    """Open the storage; `create=False` refuses to create a new SQLite file (read-only commands).
    `checked`: this process's parent has just opened it (tables made, schema version checked), so
    a worker it starts skips both (about half a second each)."""
    if url.startswith(("redis://", "rediss://")):
        return _open_redis(url)
    if url.startswith("grpc://"):
        return _open_grpc(url)
    path = sqlite_path(url)
    if path is not None:
        _check_sqlite_file(path, url, create)
    if not create:
        _check_holds_studies(url, path)
    scheme = url.split(":", 1)[0].lower()
    if scheme.startswith("sqlite"):
        engine_kwargs: dict[str, object] = {"connect_args": {"timeout": 60}}
    else:
        # pre_ping replaces connections the server dropped while a long trial ran; a connect
        # timeout turns an unreachable host into an error in seconds, not minutes.
        engine_kwargs = {"pool_pre_ping": True, "pool_recycle": 3600, "pool_size": 4, "max_overflow": 8}
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
                storage = ResilientRDBStorage(url, engine_kwargs=engine_kwargs, skip_compatibility_check=checked,
                                              skip_table_creation=checked, **hb)
    except ImportError as e:
        missing = getattr(e.__cause__, "name", None) or e.name or "a database driver"
        extra = {"postgresql": "postgres", "mysql": "mysql", "mariadb": "mysql"}.get(scheme.split("+")[0])
        hint = f"; pip install 'hpo[{extra}]'" if extra else ""
        raise StorageError(f"cannot open storage {mask(url)}: {missing} is not installed{hint}") from None
    except Exception as e:  # SQLAlchemy reports bad URLs, refused connections, auth failures
        raise StorageError(f"cannot open storage {mask(url)}: {scrub(_reason(e), url)}") from None
    if path is not None and not checked:
        _enable_wal(storage)
    elif path is not None:
        _sqlite_pragmas(storage)
    return storage


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


def forget_connections(study: Any) -> None:
    """In a forked child: drop the parent's pooled connections without closing them (closing
    would end the parent's sessions; SQLite forbids using a connection across a fork)."""
    backend = backend_of(storage_of(study))
    if isinstance(backend, RDBStorage):
        backend.engine.dispose(close=False)


def _enable_wal(storage: RDBStorage) -> None:
    """WAL (a property of the file) so readers never block the writer, and synchronous=NORMAL
    (per connection): in WAL mode a commit then needs no fsync, and the database stays
    consistent through a crash of the process; only a power cut can lose the last commits."""
    _sqlite_pragmas(storage)
    with storage.engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA journal_mode=WAL")


def _sqlite_pragmas(storage: RDBStorage) -> None:
    from sqlalchemy import event

    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    event.listen(storage.engine, "connect", on_connect)
    storage.engine.dispose()  # connections opened before the listener existed are replaced


def reason(e: BaseException) -> str:
    """One line describing a storage failure, for users."""
    while getattr(e, "__cause__", None) is not None and not getattr(e, "orig", None):
        e = e.__cause__  # type: ignore[assignment]
    return _reason(e)


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
