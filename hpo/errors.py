"""The project's own errors.

Library code raises these; only the CLI turns them into one-line messages. Anything else that
escapes is a bug in hpo, not a user mistake, and is allowed to show a traceback.
"""

from __future__ import annotations

import sys


class HpoError(Exception):
    """Something the user can fix: the message says what and how."""


class SpecError(HpoError):
    """A study file (or a spec stored in a study) is invalid."""


class StorageError(HpoError):
    """The storage cannot be reached, or does not hold what was asked for."""


class UnreadableStudyError(StorageError):
    """A study's stored attributes cannot be decoded (written by another tool, a bad migration);
    `name` is the study, for a front end's hint."""

    def __init__(self, message: str, name: str) -> None:
        super().__init__(message)
        self.name = name


class DataError(HpoError):
    """A dataset cannot be loaded or does not have the expected shape."""


class SettingError(HpoError):
    """A run setting (the device, the storage URL, fusion) is unusable. `setting` names it; the CLI
    words it as the flag that gave it (`--device: ...`), the library as the setting (`device: ...`)."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting
        self.message = message


class StudyExistsError(SpecError):
    """A study of that name exists with another search; `name` is the study, for a front end's hint."""

    def __init__(self, message: str, name: str) -> None:
        super().__init__(message)
        self.name = name


def is_proxy_failure(e: BaseException) -> bool:
    """A call to a grpc:// storage (`hpo proxy`) that failed in transport or on the proxy's side."""
    if "grpc" not in sys.modules:
        return False  # no grpc:// storage was opened
    import grpc

    return isinstance(e, grpc.RpcError)


def is_storage_failure(e: BaseException) -> bool:
    """The database refused a write or a query (read-only file, lost server past the retries), or
    the storage proxy stopped answering: the worker's problem (retry or stop, one line), never a
    verdict on a trial or a bug in hpo."""
    if is_proxy_failure(e):
        return True
    if "sqlalchemy" not in sys.modules:
        return False  # nothing has talked to a database (click's own exits, --help): no import for nothing
    try:
        from optuna.exceptions import StorageInternalError
        from sqlalchemy.exc import SQLAlchemyError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(e, (SQLAlchemyError, StorageInternalError))


class DiskFullError(HpoError):
    """No space left where hpo writes a file (a checkpoint, a log, a model). `folder` is where,
    `free` the bytes left then, `what` the file ("trial 3's checkpoint"), `then` what a user does
    next; the file was not written (a file hpo writes is whole or absent)."""

    def __init__(self, folder: str, free: int | None, what: str = "", then: str = "") -> None:
        self.folder, self.free, self.what, self.then = folder, free, what, then
        left = f" ({human_bytes(free)} free)" if free is not None else ""
        writing = f" writing {what}" if what else ""
        super().__init__(f"no space left on {folder}{left}{writing}; free space and run again" + (f": {then}" if then
                                                                                                  else ""))

    def writing(self, what: str, then: str = "") -> DiskFullError:
        """The same error, saying which file was being written and what happens on the next run."""
        return DiskFullError(self.folder, self.free, what, then or self.then)


class UnreadableFileError(HpoError):
    """A file hpo wrote earlier cannot be read back (truncated, torn, of another format, missing)."""


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
