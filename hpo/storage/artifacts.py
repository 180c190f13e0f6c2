"""Checkpoints and saved models in an Optuna artifact store.

A running trial's checkpoint is replaced each epoch under an id derived from the study and the
trial's *original* number, so a retried trial (a new Optuna trial) finds it without any storage
write per epoch. Every file is written whole or not at all (hpo.storage.files); two slots are
written in turn, so a checkpoint damaged later (a bad copy, a disk error) still leaves the one
before it. Final weights of completed trials and the study's best model
are uploaded with `optuna.artifacts.upload_artifact`, so the dashboard lists them (and serves
them: it takes only Optuna's uuid artifact ids, so the files bear no extension; `hpo export`
writes a model to a file of its own).
"""

from __future__ import annotations

import io
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact

from hpo.errors import DiskFullError, StorageError, UnreadableFileError
from hpo.storage.files import (
    TEMP_FOLDER,
    disk_full,
    is_disk_full,
    load_problem,
    staging,
    sweep,
    write_whole,
)
from hpo.storage.keys import LOG_FILENAME, ArtifactFolder

class WholeFileArtifactStore(FileSystemArtifactStore):
    """Optuna's file-system artifact store whose writes are whole or absent: a kill during a
    write leaves the artifact as it was (or absent), never torn (hpo.storage.files). Reads and
    removals are Optuna's."""

    def __init__(self, base_path: str | Path) -> None:
        super().__init__(base_path)
        self.base = Path(base_path)

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        target = Path(os.path.abspath(self.base / artifact_id))
        if os.path.isabs(artifact_id) or target.parent != Path(os.path.abspath(self.base)):
            raise ValueError(f"Invalid artifact_id: {artifact_id}")  # as Optuna's store refuses it
        write_whole(target, lambda f: shutil.copyfileobj(content_body, f), self.base / TEMP_FOLDER)


def open_store(path: Path) -> WholeFileArtifactStore:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError(f"cannot create artifact folder {path}: {e.strerror}") from None
    if not os.access(path, os.W_OK):
        raise StorageError(f"artifact folder {path} is not writable")
    sweep(path / TEMP_FOLDER)  # what writers killed mid-write left
    return WholeFileArtifactStore(base_path=path)


def _serialize(state: dict[str, Any]) -> io.BytesIO:
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


def _deserialize(data: bytes) -> dict[str, Any]:
    import torch

    # weights_only: a checkpoint is data, never code (a tampered file cannot run anything).
    state: dict[str, Any] = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return state


class Artifacts(ArtifactFolder):
    """The artifact store of one study: its folder's layout (hpo.storage.keys) and the writes."""

    def __init__(self, store: FileSystemArtifactStore, study_uid: str, path: Path) -> None:
        super().__init__(path, study_uid)
        self.store = store

    def save_checkpoint(self, number: int, state: dict[str, Any]) -> None:
        slot = self._slots(number)[int(state["epoch"]) % 2]
        with _writing(f"trial {number}'s checkpoint", "the trial resumes from its last checkpoint", self.path):
            self.store.write(slot, _serialize(state))

    def load_checkpoint(self, number: int, valid: Any = None) -> tuple[dict[str, Any] | None, list[str]]:
        """The newest readable checkpoint of a trial (by original number), or None, and what is
        wrong with each checkpoint file that cannot be used ("<file>: truncated or torn ...").
        `valid(state)`: None for a state of the expected format, else why it is not."""
        best: dict[str, Any] | None = None
        problems: list[str] = []
        for slot in self._slots(number):
            path = self.path / slot
            if isinstance(self.store, FileSystemArtifactStore) and not path.exists():
                continue
            if isinstance(self.store, FileSystemArtifactStore) and not path.is_file():
                problems.append(f"{path}: not a regular file")  # a device would be read forever
                continue
            data = b""
            try:
                with self.store.open_reader(slot) as f:
                    data = f.read()
                state = _deserialize(data)
            except Exception as e:
                problems.append(f"{path}: {load_problem(e, data[:2])}")
                continue
            if (wrong := valid(state) if valid is not None else None) is not None:
                problems.append(f"{path}: {wrong}")
                continue
            if best is None or state["epoch"] > best["epoch"]:
                best = state
        return best, problems

    def remove_checkpoint(self, number: int) -> None:
        for slot in self._slots(number):
            try:
                self.store.remove(slot)
            except Exception:
                pass

    def upload(
        self,
        target: optuna.Trial | optuna.trial.FrozenTrial | optuna.Study,
        filename: str,
        state: dict[str, Any],
        storage: optuna.storages.BaseStorage | None = None,
    ) -> str:
        what = f"trial {target.number}'s {filename}" if not isinstance(target, optuna.Study) else f"the study's {filename}"
        then = "the trial resumes from its last checkpoint" if not isinstance(target, optuna.Study) else \
            "the best model is scored again"
        with _writing(what, then, self.path), staging(self.path / TEMP_FOLDER) as tmp:
            file = Path(tmp) / filename
            # Serialized in memory, then written: torch's own file writer words a full disk as a
            # RuntimeError, Python's as the OSError it is.
            file.write_bytes(_serialize(state).getbuffer())
            # a PyTorch file, whatever .pt guesses as
            return self._upload(target, file, storage, "application/octet-stream")

    def rewrite(self, artifact_id: str, state: dict[str, Any], what: str) -> None:
        """Write `state` over an existing artifact (a model saved again), whole or not at all."""
        with _writing(what, "the trial resumes from its last checkpoint", self.path):
            self.store.write(artifact_id, _serialize(state))

    def upload_log(self, trial: optuna.Trial, path: Path) -> str:
        with _writing(f"trial {trial.number}'s log", "the trial resumes from its last checkpoint", self.path):
            return self._upload(trial, path, None, "text/plain", LOG_FILENAME)

    def _upload(self, target: optuna.Trial | optuna.trial.FrozenTrial | optuna.Study, file: Path,
                storage: optuna.storages.BaseStorage | None, mimetype: str, filename: str | None = None) -> str:
        if filename is not None and filename != file.name:  # Optuna names an artifact by its file
            with staging(self.path / TEMP_FOLDER) as tmp:
                named = Path(tmp) / filename
                try:
                    os.link(file, named)
                except OSError:
                    shutil.copyfile(file, named)
                return self._upload(target, named, storage, mimetype)
        return upload_artifact(artifact_store=self.store, file_path=str(file), study_or_trial=target,
                               storage=storage, mimetype=mimetype)

    def read(self, artifact_id: str) -> dict[str, Any]:
        """A saved state; UnreadableFileError saying why when it cannot be read back."""
        path = self.file_of(artifact_id)
        data = b""
        try:
            with self.store.open_reader(artifact_id) as f:
                data = f.read()
            return _deserialize(data)
        except Exception as e:
            why = "missing" if not path.exists() else load_problem(e, data[:2])
            raise UnreadableFileError(f"{path}: {why}") from None

    def named(self, artifact_id: str, name: str) -> Path:
        """The artifact under a name a person recognises, `<artifact id>-<name>` ending in .pt, beside
        it: a hard link (the same file, no copy), a copy where the filesystem has none. The
        dashboard keeps serving the artifact by its id."""
        target = self.path / f"{artifact_id}-{name}"
        tmp = target.with_name(f".{target.name}.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        try:
            os.link(self.file_of(artifact_id), tmp)
        except OSError:
            import shutil

            shutil.copyfile(self.file_of(artifact_id), tmp)
        os.replace(tmp, target)  # a reader sees the old model or the new one, never half of one
        return target


@contextmanager
def _writing(what: str, then: str, folder: Path) -> Iterator[None]:
    """A full disk while writing `what` into `folder` says so, and what the next run does about it."""
    try:
        yield
    except DiskFullError as e:
        raise e.writing(what, then) from None
    except OSError as e:
        if not is_disk_full(e):
            raise
        raise disk_full(folder).writing(what, then) from None


def find_artifact(
    target: optuna.trial.FrozenTrial | optuna.Study,
    filename: str,
    storage: optuna.storages.BaseStorage | None = None,
) -> str | None:
    """The newest artifact id uploaded under `filename` to a trial or study, if any."""
    from optuna.artifacts import get_all_artifact_meta

    metas = [m for m in get_all_artifact_meta(target, storage=storage) if m.filename == filename]
    return metas[-1].artifact_id if metas else None


UID_RE = re.compile(r"^[0-9a-f]{12}$")
# Optuna's uuid artifact ids, and the named links of scored models (`<id>-best_model.pt`).
_ARTIFACT_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}(-[A-Za-z0-9_]+\.pt)?$")


def named_links(base: Path, artifact_id: str) -> list[str]:
    """The `<id>-<name>.pt` links `Artifacts.named` made of an artifact (none for a name that is
    not an artifact id)."""
    if not _ARTIFACT_RE.match(artifact_id) or artifact_id.endswith(".pt"):
        return []
    return [p.name for p in base.glob(f"{artifact_id}-*.pt")]


def own_file(base: Path, name: Any, uid: Any) -> Path | None:
    """`base/name` when `name` is a file hpo made there: an artifact id or one of this study's
    checkpoint slots, a regular file (not a link), directly inside `base`."""
    if not isinstance(name, str):
        return None
    ckpt = isinstance(uid, str) and re.fullmatch(rf"{re.escape(uid)}-trial\d+(-[ab]\.ckpt|\.log)", name)
    if not (_ARTIFACT_RE.match(name) or ckpt):
        return None
    path = base / name
    if path.is_symlink() or not path.is_file() or path.resolve().parent != base:
        return None
    return path
