"""Names hpo gives what it keeps in Optuna's storage and artifact store: one place, read without
optuna by the read-only commands (hpo.search.reading) and written by the rest."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hpo.storage.urls import sqlite_path

RESUMES_ATTR = "hpo:resumes"  # trial system attr of a retry that resumes a trial stopped under it (not a failure)
CHECKPOINT_ATTR = "hpo:checkpoint_epoch"  # trial system attr of a requeued trial: the epoch it resumes from
RERUN_ATTR = "hpo:rerun_of"  # trial system attr: this trial runs a completed trial again, to save its model anew
PBT_ATTR = "hpo:pbt"  # trial system attr: a segment of a population member (hpo.search.pbt.Segment), kept by retries
MODEL_FILE = "model.pt"  # a trial's final state, kept when it may be the best (the test step's input)
LOG_FILENAME = "log.txt"  # a trial's output, as an artifact of the trial
ERROR_ATTR = "hpo:error"  # trial system attr of a failed trial: hpo.runtime.endings.error_record() of its exception
UID_ATTR = "hpo:uid"  # study system attr: names the study's checkpoints in the artifact store
ARTIFACTS_ATTR = "hpo:artifacts"  # study system attr: where this study's artifacts were written
ENV_ARTIFACTS = "HPO_ARTIFACTS"


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


def study_folder(cli_value: str | None, storage_url: str, system_attrs: dict[str, Any]) -> tuple[Path, str | None]:
    """The study's artifact folder as a worker resolves it (resolve_artifact_path), and what a
    person is told once when it is not the folder the study recorded: checkpoints and models then
    live in two places."""
    recorded = system_attrs.get(ARTIFACTS_ATTR)
    path = resolve_artifact_path(cli_value, storage_url, recorded)
    if recorded is None or Path(recorded) == path:
        return path, None
    return path, (f"Note: artifacts go to {path} (the artifact folder this worker was given, or HPO_ARTIFACTS), "
            f"not to the study's folder {recorded}; trials this worker resumes find no checkpoint from "
            "workers that use the study's folder")


class ArtifactFolder:
    """Where a study's files lie in its artifact folder: checkpoint slots and live logs, named by
    the study's uid and a trial's number; artifacts by their id. Paths only (the read-only
    commands read them without optuna; hpo.storage.artifacts writes them)."""

    def __init__(self, path: Path, uid: str | None) -> None:
        self.path = path
        self.uid = uid  # None: a study no worker has opened yet has no files

    def _slots(self, number: int) -> tuple[str, str]:
        base = f"{self.uid}-trial{number}"
        return f"{base}-a.ckpt", f"{base}-b.ckpt"

    def checkpoint_paths(self, number: int) -> list[Path]:
        """Where a trial's (by original number) two checkpoint slots are, whether or not they exist."""
        return [self.path / slot for slot in self._slots(number)] if self.uid else []

    def checkpoint_files(self, number: int) -> list[Path]:
        """The checkpoint files a trial (by original number) has now."""
        return [p for p in self.checkpoint_paths(number) if p.is_file()]

    def log_path(self, number: int) -> Path:
        """Where a running trial's output is written (read by `hpo logs --follow`)."""
        return self.path / f"{self.uid}-trial{number}.log"

    def file_of(self, artifact_id: str) -> Path:
        return self.path / artifact_id

    def read_text(self, artifact_id: str) -> str:
        """An artifact as text (FileNotFoundError where this folder does not hold it)."""
        return self.file_of(artifact_id).read_bytes().decode("utf-8", errors="replace")
