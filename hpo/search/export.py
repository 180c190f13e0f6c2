"""The best model back: `hpo.load_best()` in Python and `hpo export` to one file.

An export is a dict that `torch.load(path, weights_only=True)` reads (tensors, numbers, text):
the trial, its parameters (every one, fixed and the user's own included), its values, its test
scores, the spec, with population-based training the schedule of parameters it trained with, and either hpo's trained model (each fold's weights, the model family, input
shape, outputs and input scaling) or, for a `train:` study, the final state the trial saved.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from hpo.errors import HpoError
from hpo.search.records import TEST_ATTR
from hpo.search.saved import read_scored_model, read_trial_model, trial_model
from hpo.search.study import StudyHandle
from hpo.search.summary import best_trial, front
from hpo.storage.lineage import schedule

FORMAT = 1


@dataclass(frozen=True)
class BestState:
    """The best trial of a `train:` study: what its last `save_checkpoint()` saved, with its
    parameters (rebuild your model from them and load the state)."""

    number: int
    params: dict[str, Any]
    values: dict[str, float]
    test: dict[str, float] | None
    state: Any


def chosen_trial(handle: StudyHandle, number: int | None) -> tuple[optuna.trial.FrozenTrial, dict[str, Any] | None]:
    """The trial to export (the best, or `number`, a member of the Pareto front with several
    objectives) and its test record, if it was scored."""
    study = handle.study
    record = study.user_attrs.get(TEST_ATTR)
    if handle.spec.multi_objective:
        members = front(study)
        numbers = [t.number for t in members]
        if number is None or number not in numbers:
            what = "choose" if number is None else f"trial {number} is not on it;"
            raise HpoError(f"study {study.study_name} has several objectives: {what} a trial of its Pareto front "
                           f"({', '.join(map(str, numbers)) or 'empty'})")
        records = {r["trial"]: r for r in (record or {}).get("front") or []}
        return next(t for t in members if t.number == number), records.get(number)
    best = best_trial(study)
    if best is None:
        raise HpoError(f"study {study.study_name} has no completed trial yet")
    if number is not None and number != best.number:
        raise HpoError(f"trial {number} is not the best trial of study {study.study_name} (#{best.number}): only "
                       "the best trial's model is kept")
    return best, record if isinstance(record, dict) and record.get("trial") == best.number else None


def exported(handle: StudyHandle, number: int | None = None) -> dict[str, Any]:
    """The self-describing export of the best trial (or front member `number`)."""
    from hpo.spec.space import resolve_values

    study, spec = handle.study, handle.spec
    trial, record = chosen_trial(handle, number)
    names = study.metric_names or [o.name for o in spec.goals]
    out: dict[str, Any] = {
        "hpo_export": FORMAT, "study": study.study_name, "trial": trial.number,
        "params": dict(resolve_values(spec, trial.params)), "values": dict(zip(names, trial.values)),
        "test": dict(record["scores"]) if record else None, "spec": spec.to_dict(),
    }
    if spec.search.segmented:  # the parameters it trained with, segment by segment: a schedule to replay
        out["schedule"] = schedule(study.get_trials(deepcopy=False), trial.number)
    if spec.train is not None:
        model_id = trial_model(study, trial)
        if model_id is None:
            raise HpoError(f"trial {trial.number} of study {study.study_name} kept no state: its train function "
                           "never called trial.save_checkpoint()")
        out["state"] = read_trial_model(handle, trial, model_id)
        return out
    if record is None or not record.get("model_artifact"):
        raise HpoError(f"the best model of study {study.study_name} (trial {trial.number}) is not scored and saved "
                       f"yet: run the study again (hpo run, or hpo worker {study.study_name}) to finish it")
    bundle = read_scored_model(handle, trial, record["model_artifact"])
    out["params"] = dict(bundle["params"])
    out["model"] = {"family": bundle["model_family"], "input_shape": list(bundle["input_shape"]),
                    "n_outputs": int(bundle["n_outputs"]), "task": bundle.get("task", "classification"),
                    "folds": bundle["models"], "scalings": bundle.get("scalings")}
    return out


def model_from(export: dict[str, Any]) -> Any:
    """hpo's trained model from an export (eval mode, on the CPU), or a BestState for a `train:` study."""
    if "model" not in export:
        return BestState(int(export["trial"]), dict(export["params"]), dict(export["values"]), export.get("test"),
                         export["state"])
    from hpo.training.models import Predictor, build_model

    m = export["model"]
    if m.get("scalings") is None:
        raise HpoError("this model was saved by an earlier hpo without its input scaling; run hpo export on the "
                       "study again after scoring it with this version")
    models = []
    for state in m["folds"]:
        model = build_model(m["family"], export["params"], tuple(m["input_shape"]), m["n_outputs"])
        model.load_state_dict(state)
        models.append(model)
    identity = {"x_shift": 0.0, "x_scale": 1.0}
    scalings = [s if s is not None else identity for s in m["scalings"]]
    return Predictor(models, scalings, m["task"]).eval()


def read_export(path: Path) -> dict[str, Any]:
    import torch

    try:
        raw: Any = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
    except Exception as e:
        raise HpoError(f"{path}: not a file hpo export wrote ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict) or raw.get("hpo_export") != FORMAT:
        raise HpoError(f"{path}: not a file hpo export wrote")
    return raw
