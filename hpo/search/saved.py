"""The models a study keeps, read back: or one line saying why not and what to run.

A completed trial that may be the best keeps its final state (`model.pt`, uploaded to the trial);
the test step turns the best one into the study's scored model (`best_model.pt`, hpo's own loop)
or calls the user's `test` with it. Either file may be damaged after it was written (a bad copy,
a disk error, a file cut by hand): whoever reads it (`hpo best`, `hpo export`, `hpo.load_best`,
the test step) says so in one line, naming the file, why, and the command that makes it again.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpo._private import storage_of
from hpo.errors import HpoError, UnreadableFileError
from hpo.storage.files import problem
from hpo.storage.keys import MODEL_FILE

if TYPE_CHECKING:  # `hpo best` reads the records and checks the files without optuna
    import optuna
    from optuna.trial import FrozenTrial

    from hpo.search.study import StudyHandle

class ModelUnreadable(HpoError):
    """A saved model cannot be read back; the message names the file, why, and what to run."""


def trial_model(study: optuna.Study, trial: FrozenTrial) -> str | None:
    """The artifact id of a trial's final state, if it kept one."""
    from hpo.storage.artifacts import find_artifact

    return find_artifact(trial, MODEL_FILE, storage_of(study))


def rerun_advice(study: str, number: int) -> str:
    return f"run trial {number} again to save it anew: hpo retry {study} {number}, then hpo run (or hpo worker {study})"


def rescore_advice(study: str) -> str:
    return f"run the study again to score and save it anew: hpo run SPEC (or hpo worker {study})"


def read_trial_model(handle: StudyHandle, trial: FrozenTrial, artifact_id: str) -> dict[str, Any]:
    """A trial's saved final state; ModelUnreadable (with the re-run to ask for) when it cannot be read."""
    try:
        return handle.artifacts.read(artifact_id)
    except UnreadableFileError as e:
        name = handle.study.study_name
        raise ModelUnreadable(f"the saved model of trial {trial.number} of study {name} cannot be read ({e}); "
                              f"{rerun_advice(name, trial.number)}") from None


def read_scored_model(handle: StudyHandle, trial: FrozenTrial, artifact_id: str) -> dict[str, Any]:
    """The study's scored model (its best trial's); when it cannot be read, the line says whether
    scoring again is enough (the trial's own state is whole) or the trial must run again."""
    try:
        return handle.artifacts.read(artifact_id)
    except UnreadableFileError as e:
        name = handle.study.study_name
        own = trial_model(handle.study, trial)
        whole = own is not None and own != artifact_id and problem(handle.artifacts.file_of(own)) is None
        advice = rescore_advice(name) if whole else rerun_advice(name, trial.number)
        raise ModelUnreadable(f"the best model of study {name} (trial {trial.number}) cannot be read ({e}); "
                              f"{advice}") from None


def recorded_problem(record: Any) -> str | None:
    """Why the model file a test record names cannot be read ("<path>: truncated or torn ..."), or
    None when it looks whole or the record names none. Checked without torch."""
    if not isinstance(record, dict) or not isinstance(record.get("model_path"), str):
        return None
    path = Path(record["model_path"])
    if isinstance(record.get("model_artifact"), str):  # what readers read; the named file is a link to it
        path = path.parent / record["model_artifact"]
    why = problem(path)
    return f"{path}: {why}" if why is not None else None


def best_model_problem(study: optuna.Study, test: Any) -> str | None:
    """One line when the model a study's test record names cannot be read (the best trial's, or
    with several objectives any front member's), with what to run; None when each looks whole."""
    records = test.get("front") if isinstance(test, dict) and "front" in test else [test]
    trials = study.get_trials(deepcopy=False)
    for record in records or []:
        if recorded_problem(record) is not None:
            number = int(record["trial"])
            own = trial_model(study, trials[number]) if number < len(trials) else None
            return model_problem(study.study_name, record, own)
    return None


def model_problem(name: str, record: Any, own: str | None) -> str | None:
    """One line when the model a test record names cannot be read, with what to run: the study
    again when the trial's own final state (artifact `own`) is whole, else the trial again."""
    if (why := recorded_problem(record)) is None:
        return None
    number = int(record["trial"])
    folder = Path(record["model_path"]).parent
    whole = own is not None and own != record.get("model_artifact") and problem(folder / own) is None
    advice = rescore_advice(name) if whole else rerun_advice(name, number)
    return f"the best model of study {name} (trial {number}) cannot be read ({why}); {advice}"
