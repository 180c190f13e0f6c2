"""Locks around a storage's files and rows that Optuna does not take: creating the schema and a
study's bookkeeping (one process at a time), and running a study on an embedded SQLite file (one
`hpo run` at a time, never on a network filesystem)."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

from hpo.errors import StorageError
from hpo.storage.urls import sqlite_path

ENV_WRITER = "HPO_SQLITE_WRITER"  # "<pid>:<path>:<study>" of the run holding a study on SQLite, for its workers


def creation_lock_file(path: Path) -> Path:
    """The file beside a SQLite file that creation_lock holds."""
    return path.with_name(f".{path.name}.lock")


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
        with open(creation_lock_file(path), "a") as f:
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
