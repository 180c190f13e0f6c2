"""Checkpoints and saved models in an Optuna artifact store.

A running trial's checkpoint is overwritten in place each epoch under an id derived from the
study and the trial's *original* number, so a retried trial (a new Optuna trial) finds it without
any storage write per epoch. Two slots are written in turn: a worker killed in the middle of a
write leaves the other slot intact. Final weights of completed trials and the study's best model
are uploaded with `optuna.artifacts.upload_artifact`, so the dashboard lists them (and serves
them: it takes only Optuna's uuid artifact ids, so the files bear no extension; `hpo export`
writes a model to a file of its own).
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact

from hpo.errors import StorageError
from hpo.storage.urls import sqlite_path

ENV_ARTIFACTS = "HPO_ARTIFACTS"
LOG_FILENAME = "log.txt"  # a trial's output, as an artifact of the trial


def default_artifact_path(storage_url: str) -> Path:
    """Beside the SQLite file (hpo.db -> hpo-artifacts/), else ./hpo-artifacts."""
    db = sqlite_path(storage_url)
    if db is not None:
        return db.with_name(db.stem + "-artifacts")
    return Path("hpo-artifacts").resolve()


def resolve_artifact_path(cli_value: str | None, storage_url: str, recorded: str | None) -> Path:
    """--artifacts, else $HPO_ARTIFACTS, else where the study recorded it, else the default:
    absolute from the start, so training code that changes the working directory (os.chdir)
    still writes its checkpoints where the study keeps them."""
    value = cli_value or os.environ.get(ENV_ARTIFACTS) or recorded
    return Path(value).expanduser().resolve() if value else default_artifact_path(storage_url)


def open_store(path: Path) -> FileSystemArtifactStore:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError(f"cannot create artifact folder {path}: {e.strerror}") from None
    if not os.access(path, os.W_OK):
        raise StorageError(f"artifact folder {path} is not writable")
    return FileSystemArtifactStore(base_path=path)


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


class Artifacts:
    """The artifact store of one study."""

    def __init__(self, store: FileSystemArtifactStore, study_uid: str, path: Path) -> None:
        self.store = store
        self.uid = study_uid
        self.path = path

    def _slots(self, number: int) -> tuple[str, str]:
        base = f"{self.uid}-trial{number}"
        return f"{base}-a.ckpt", f"{base}-b.ckpt"

    def checkpoint_files(self, number: int) -> list[Path]:
        """The checkpoint files a trial (by original number) has now."""
        return [self.path / slot for slot in self._slots(number) if (self.path / slot).is_file()]

    def save_checkpoint(self, number: int, state: dict[str, Any]) -> None:
        slot = self._slots(number)[int(state["epoch"]) % 2]
        self.store.write(slot, _serialize(state))

    def load_checkpoint(self, number: int) -> dict[str, Any] | None:
        """The newest readable checkpoint of a trial (by original number), or None."""
        best: dict[str, Any] | None = None
        for slot in self._slots(number):
            if isinstance(self.store, FileSystemArtifactStore) and not (self.path / slot).is_file():
                continue  # missing, or not a regular file (a device would be read forever)
            try:
                with self.store.open_reader(slot) as f:
                    state = _deserialize(f.read())
            except Exception:  # missing, or torn by a kill mid-write: the other slot serves
                continue
            if best is None or state["epoch"] > best["epoch"]:
                best = state
        return best

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
        import torch

        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp) / filename
            torch.save(state, file)
            # a PyTorch file, whatever .pt guesses as
            return self._upload(target, file, storage, "application/octet-stream")

    def log_path(self, number: int) -> Path:
        """Where a running trial's output is written (read by `hpo logs --follow`)."""
        return self.path / f"{self.uid}-trial{number}.log"

    def upload_log(self, trial: optuna.Trial, path: Path) -> str:
        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp) / LOG_FILENAME
            file.write_bytes(path.read_bytes())
            return self._upload(trial, file, None, "text/plain")

    def _upload(self, target: optuna.Trial | optuna.trial.FrozenTrial | optuna.Study, file: Path,
                storage: optuna.storages.BaseStorage | None, mimetype: str) -> str:
        return upload_artifact(artifact_store=self.store, file_path=str(file), study_or_trial=target,
                               storage=storage, mimetype=mimetype)

    def read_text(self, artifact_id: str) -> str:
        with self.store.open_reader(artifact_id) as f:
            return bytes(f.read()).decode("utf-8", errors="replace")

    def read(self, artifact_id: str) -> dict[str, Any]:
        with self.store.open_reader(artifact_id) as f:
            return _deserialize(f.read())

    def file_of(self, artifact_id: str) -> Path:
        return self.path / artifact_id

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
