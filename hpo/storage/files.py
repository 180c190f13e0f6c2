"""A file hpo writes is whole or absent; a file hpo reads may be torn, truncated or missing.

Writes go to a temporary name on the same filesystem, are flushed and fsynced, then renamed over
the target and the folder fsynced (how PostgreSQL and git write): a kill at any moment leaves the
old file or the new one, never part of one. A full disk is one `DiskFullError` naming the folder
and the space left, and the temporary file is removed. Temporary files a killed process left
behind are swept when the folder is opened again.

Reads are checked without torch (`problem`): PyTorch files are zip archives, so a cut or torn
file is found by its missing central directory.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import tempfile
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from hpo.errors import DiskFullError

TEMP_FOLDER = ".hpo-tmp"  # inside an artifact folder: files being written, renamed into the folder when whole
_FULL = (errno.ENOSPC, errno.EDQUOT)


def write_whole(target: Path, fill: Callable[[BinaryIO], None], temp_folder: Path | None = None) -> None:
    """Write `target` through `fill(file)`, whole or not at all. `temp_folder` (on the same
    filesystem) holds the file while it is written; by default the target's own folder."""
    folder = temp_folder or target.parent
    tmp = folder / f".{os.getpid()}@{socket.gethostname()}~{uuid.uuid4().hex[:8]}~{target.name}.tmp"
    try:
        with _create(tmp) as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        sync_folder(target.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in _FULL:
            raise disk_full(target.parent) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)  # a stop (Ctrl-C) mid-write leaves nothing behind either
        raise


def _create(path: Path) -> BinaryIO:
    """Open a new file for writing, making its folder (again, where `hpo delete` removed it empty
    a moment ago)."""
    for _ in range(3):
        try:
            return open(path, "wb")
        except FileNotFoundError:
            path.parent.mkdir(exist_ok=True)
    return open(path, "wb")


def staging(folder: Path) -> tempfile.TemporaryDirectory[str]:
    """A private temporary folder inside `folder` (made as `_create` makes one)."""
    for _ in range(3):
        try:
            return tempfile.TemporaryDirectory(dir=folder)
        except FileNotFoundError:
            folder.mkdir(exist_ok=True)
    return tempfile.TemporaryDirectory(dir=folder)


def disk_full(folder: Path) -> DiskFullError:
    try:
        free: int | None = shutil.disk_usage(folder).free
    except OSError:
        free = None
    return DiskFullError(str(folder), free)


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, DiskFullError) or (isinstance(e, OSError) and e.errno in _FULL)


def as_disk_full(e: BaseException) -> DiskFullError:
    """A full disk met anywhere (the training code's own files too), as hpo words it."""
    if isinstance(e, DiskFullError):
        return e
    name = getattr(e, "filename", None)
    where = Path(name).parent if isinstance(name, str) and name else Path(".").resolve()
    return disk_full(where).writing(name if isinstance(name, str) and name else "a file of the training code",
                                    "the trial resumes from its last checkpoint")


def sync_folder(folder: Path) -> None:
    """fsync a folder, so a rename into it survives a power cut (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sweep(temp_folder: Path) -> int:
    """Remove the temporary files that processes of this host left when they were killed mid-write
    (their pid is gone); a live writer's are left alone. Returns how many were removed."""
    if not temp_folder.is_dir():
        return 0
    host, removed = socket.gethostname(), 0
    for entry in os.scandir(temp_folder):
        pid, _, rest = entry.name[1:].partition("@")
        if not entry.name.endswith(".tmp") or not pid.isdigit() or rest.split("~", 1)[0] != host \
                or _alive(int(pid)):
            continue
        try:
            os.unlink(entry.path)
            removed += 1
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def problem(path: Path) -> str | None:
    """Why a PyTorch file hpo wrote cannot be read back, in a few words, or None when it looks
    whole (its zip directory is there and lists a pickle). Checks the structure, not every byte."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"cannot be opened ({e.strerror})"
    if size == 0:
        return "empty (0 bytes)"
    try:
        with zipfile.ZipFile(path) as z:
            if not any(name.endswith("data.pkl") for name in z.namelist()):
                return "not a PyTorch file"
    except zipfile.BadZipFile:
        return f"truncated or torn ({size} bytes, not a whole PyTorch file)"
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    return None


def load_problem(e: BaseException, head: bytes | None = None) -> str:
    """What torch.load's error says about a file, in a few words; `head`: the file's first bytes
    (hpo writes PyTorch's zip format only, so anything else is not its file)."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if head is not None and not head:
        return "empty (0 bytes)"
    if head is not None and not head.startswith(b"PK"):
        return "not a PyTorch file"
    if "central directory" in text or "zip archive" in text or isinstance(e, EOFError):
        return "truncated or torn (not a whole PyTorch file)"
    if "Weights only load failed" in text or "weights_only" in text:
        return "holds objects other than data (refused: a checkpoint is loaded with weights_only=True)"
    return f"{type(e).__name__}: {text}"[:300]
