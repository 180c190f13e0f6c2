"""The head start of `hpo run`: start-up work that needs no torch, done in a child process on
another core while the run imports torch.

On a new study most of `hpo run`'s start-up is imports and set-up done one after another: torch,
torch's compiler (every optimizer's constructor imports it), scikit-learn with the dataset's split,
SQLAlchemy with Optuna's tables. The child, forked before torch is imported, creates a new SQLite
file's tables (as the run would: open_storage, under the creation lock) and loads and splits a
built-in dataset (hpo.data.folds.load_raw), sending the arrays back. The run takes each at the
point where it would have made it, so its errors come in the same order, and a run that ends
before it opens the storage removes the file the child created: a mistake still writes nothing.
Nothing is forked when torch is already imported (a script calling hpo.run: nothing to overlap).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from hpo.data.folds import RawData
from hpo.errors import DataError
from hpo.spec.schema import StudySpec
from hpo.storage.locks import creation_lock_file
from hpo.storage.urls import sqlite_path


@dataclass
class HeadStart:
    """The child's pid and its pipe; `created`: the SQLite file it creates (absent before)."""

    pid: int
    pipe: IO[bytes]
    created: Path | None
    loads_data: bool
    _got: dict[str, Any] = field(default_factory=dict)

    def data(self) -> RawData | None:
        """The split dataset (None: the child could not load it; load it here). A DataError the
        loading raised is raised here, where the run would have raised it."""
        if not self.loads_data:
            return None
        got = self._next("data")
        if isinstance(got, DataError):
            raise got
        return got if isinstance(got, RawData) else None

    def storage_ready(self) -> bool:
        """The child created the SQLite file's tables (this Optuna's schema, WAL on): the run opens
        it as checked."""
        return self.created is not None and self._next("storage") is True

    def _next(self, key: str) -> Any:
        while key not in self._got:
            try:
                name, value = pickle.load(self.pipe)
            except Exception:  # noqa: BLE001
                self._got.setdefault("data", None)  # the child died: the run does the rest itself
                self._got.setdefault("storage", None)
                break
            self._got[name] = value
        return self._got[key]

    def taken(self) -> None:
        """The run opened its storage: what the child made is the run's now."""
        self._end(keep=True)

    def abandon(self) -> None:
        """The run ended before it took the head start: stop the child, remove what it created. A
        no-op once taken."""
        self._end(keep=False)

    def _end(self, *, keep: bool) -> None:
        """Wait for the child (kill it unless `keep`); without `keep`, remove what it created."""
        if self.pipe.closed:
            return
        if not keep:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        self.pipe.close()
        if not keep and self.created is not None:
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(f"{self.created}{suffix}").unlink(missing_ok=True)
            creation_lock_file(self.created).unlink(missing_ok=True)


@contextlib.contextmanager
def head_start(spec: StudySpec, url: str) -> Iterator[HeadStart | None]:
    """Fork the child if there is work for it (a SQLite file that does not exist yet, or a built-in
    dataset for hpo's own loop; None where it would gain nothing), before torch is imported. A run
    that ends before it took the head start (HeadStart.taken, once its storage is open) leaves
    nothing of it behind."""
    ahead = _begin(spec, url)
    try:
        yield ahead
    finally:
        if ahead is not None:
            ahead.abandon()


def _begin(spec: StudySpec, url: str) -> HeadStart | None:
    if "torch" in sys.modules or not sys.platform.startswith("linux"):
        return None
    path = sqlite_path(url)
    create = path is not None and not path.exists() and path.parent.is_dir()
    data = spec.train is None and not spec.builtin_data.is_user
    if not (create or data):
        return None
    if create:  # the lock file is the child's too: removed with the file if the run ends early
        assert path is not None
        create = not creation_lock_file(path).exists()
    read, write = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read)
        _child(spec, url, create, data, os.fdopen(write, "wb"))
    os.close(write)
    return HeadStart(pid, os.fdopen(read, "rb"), path if create else None, data)


def _child(spec: StudySpec, url: str, create: bool, data: bool, pipe: IO[bytes]) -> None:
    code = 1
    try:
        from hpo.execution.supervisor import stop_with_parent

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)  # Ctrl-C or the run's end stops it where it is
        stop_with_parent()
        if create:
            _send(pipe, "storage", _create_tables(url))
        if data:
            _send(pipe, "data", _load(spec))
        code = 0
    finally:
        os._exit(code)


def _create_tables(url: str) -> bool:
    from hpo.storage.backends import open_storage

    try:
        open_storage(url, create=True, heartbeat=None)
    except Exception:  # the run opens it again itself and reports what is wrong
        return False
    return True


def _load(spec: StudySpec) -> RawData | DataError | None:
    from hpo.data.folds import load_raw

    try:
        return load_raw(spec.builtin_data, spec.seed)
    except DataError as e:
        return e
    except Exception:  # the run loads it again itself and reports what is wrong
        return None


def _send(pipe: IO[bytes], name: str, value: Any) -> None:
    pickle.dump((name, value), pipe, protocol=pickle.HIGHEST_PROTOCOL)
    pipe.flush()
