"""After the search: the best model scored once on the test split, summaries, deletion."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial

from hpo._private import storage_of, study_id
from hpo.search.records import TEST_ATTR
from hpo.search.saved import (
    best_model_problem,
    read_trial_model,
    recorded_problem,
    trial_model,
)
from hpo.search.study import StudyHandle, system_attrs
from hpo.storage.keys import ARTIFACTS_ATTR, UID_ATTR
from hpo.search.summary import best_trial, front
from hpo.storage.artifacts import UID_RE, named_links, own_file
from hpo.storage.files import TEMP_FOLDER

if TYPE_CHECKING:
    import torch

    from hpo.data.splits import DataCache


SCORING_ATTR = "hpo:scoring"  # {"key", "owner", "since"}: the worker scoring the test set now, or None
SCORING_LIMIT = 3600.0  # seconds after which a claim on another machine is taken as abandoned


def finalize(handle: StudyHandle, device: torch.device, data: DataCache | None = None) -> dict[str, Any] | None:
    """Score the best trial once on the test data and record it: hpo's own loop scores its saved
    model on the test split and saves it as the study's model; a user's `test` function is called
    with the best trial's params and final state. With several objectives every trial of the
    Pareto front is scored once (the first `test_top` of it when the spec says), each model saved.
    Once per study: the first worker to get here scores, the others wait for its record."""
    study = handle.study
    if handle.spec.multi_objective:
        numbers = [t.number for t in front(study)[:handle.spec.test_top]]

        def front_done(r: dict[str, Any] | None) -> bool:
            return r is not None and [x["trial"] for x in r.get("front") or []] == numbers \
                and best_model_problem(study, r) is None

        return _once(study, f"front:{numbers}", front_done, lambda: _score_front(handle, device, data))
    best = best_trial(study)
    if best is None:
        return None
    chosen = best

    def best_done(r: dict[str, Any] | None) -> bool:
        # A recorded model that cannot be read back (cut, torn) is scored again from the trial's state.
        return r is not None and r.get("trial") == chosen.number and recorded_problem(r) is None

    return _once(study, f"best:{best.number}", best_done, lambda: _score_best(handle, chosen, device, data))


def _once(study: optuna.Study, key: str, done: Callable[[dict[str, Any] | None], bool],
          score: Callable[[], dict[str, Any] | None]) -> dict[str, Any] | None:
    """`score()` and its record, unless another worker has scored `key` (its record is returned)
    or is scoring it now (waited for, as long as its process lives)."""
    from hpo.storage.budget_lock import BudgetLock
    from hpo.storage.retry import is_gone, owner

    storage, sid = storage_of(study), study_id(study)
    while True:
        recorded = storage.get_study_user_attrs(sid).get(TEST_ATTR)
        if done(recorded):
            return recorded
        with BudgetLock(storage, sid):  # a short hold, as when a trial is created
            held = storage.get_study_system_attrs(sid).get(SCORING_ATTR)
            if held and held.get("key") == key and not is_gone(held["owner"]) \
                    and time.time() - held["since"] < SCORING_LIMIT:
                mine = held["owner"] == owner()
            else:
                storage.set_study_system_attr(sid, SCORING_ATTR, {"key": key, "owner": owner(), "since": time.time()})
                mine = True
        if mine:
            break
        time.sleep(0.5)  # another worker scores the same model: its record comes soon
    try:
        record = score()
    finally:
        storage.set_study_system_attr(sid, SCORING_ATTR, None)
    return record


def _score_front(handle: StudyHandle, device: torch.device, data: DataCache | None) -> dict[str, Any]:
    study = handle.study
    done = {r["trial"]: r for r in (study.user_attrs.get(TEST_ATTR) or {}).get("front") or []
            if recorded_problem(r) is None}
    records = []
    trials = front(study)[:handle.spec.test_top]
    if data is None and handle.spec.train is None and any(t.number not in done for t in trials):
        from hpo.data.splits import DataCache

        spec = handle.spec  # loaded once for every model of the front
        data = DataCache(spec.builtin_data, spec.seed, device, spec.model)
    for t in trials:
        record = done.get(t.number) or _score(handle, t, device, data, f"model_trial{t.number}.pt")
        if record is not None:
            records.append(record)
    if [r["trial"] for r in records] != list(done):
        study.set_user_attr(TEST_ATTR, {"front": records})
    return {"front": records}


def _score_best(handle: StudyHandle, best: FrozenTrial, device: torch.device,
                data: DataCache | None) -> dict[str, Any] | None:
    record = _score(handle, best, device, data, "best_model.pt")
    if record is not None:
        handle.study.set_user_attr(TEST_ATTR, record)
    return record


def _score(handle: StudyHandle, best: FrozenTrial, device: torch.device, data: DataCache | None,
           filename: str) -> dict[str, Any] | None:
    """One trial's test record (its model saved as `filename`), or None when it cannot be scored."""
    from hpo.data.splits import DataCache
    from hpo.spec.params import Params
    from hpo.training.builtin import fold_models
    from hpo.training.models import build_model
    from hpo.training.trainer import evaluate_ensemble

    study, spec = handle.study, handle.spec
    if spec.train is not None:
        return _score_with_user_test(handle, best, device) if spec.test is not None else None
    model_id = trial_model(study, best)
    if model_id is None:
        return None
    saved = read_trial_model(handle, best, model_id)
    values = dict(saved["params"])
    params = Params.from_mapping(values)
    data = data or DataCache(spec.builtin_data, spec.seed, device, spec.model)
    folds = data.folds(params.scaling)
    models = []
    for fold, state in zip(folds, fold_models(saved)):
        model = build_model(spec.model, values, fold.input_shape, fold.n_outputs)
        model.load_state_dict(state)
        models.append(model.to(device))
    # With cross-validation the best model is the ensemble of its k fold models.
    scores = evaluate_ensemble(models, [f.test for f in folds], folds[0].task, device)
    metric = spec.metric.replace("val_", "test_")
    bundle = {
        "models": [m.state_dict() for m in models],
        "params": values,
        "model_family": spec.model,
        "input_shape": list(folds[0].input_shape),
        "n_outputs": folds[0].n_outputs,
        "task": folds[0].task,
        "scalings": [f.scaling.to_dict() if f.scaling is not None else None for f in folds],
        "spec": spec.to_dict(),
        "trial": best.number,
        "test": scores,
    }
    artifact_id = handle.artifacts.upload(study, filename, bundle)
    return _record(handle, best, metric, scores[metric.removeprefix("test_")], scores, artifact_id, filename)


def _record(handle: StudyHandle, best: FrozenTrial, metric: str, value: float, scores: dict[str, float],
            artifact_id: str | None, name: str) -> dict[str, Any]:
    """The test record of a scored trial; its model (`artifact_id`) is also linked as `<artifact id>-<name>`."""
    return {
        "trial": best.number,
        "metric": metric,
        "value": value,
        "scores": scores,
        "val_value": best.values[0] if len(best.values) == 1 else dict(zip(handle.study.metric_names or [],
                                                                              best.values)),
        "model_artifact": artifact_id,
        "model_path": str(handle.artifacts.named(artifact_id, name).resolve()) if artifact_id else None,
    }


def _score_with_user_test(handle: StudyHandle, best: FrozenTrial, device: torch.device) -> dict[str, Any]:
    """Call the spec's `test` function once, on the best trial: its params and final saved state."""
    from hpo.data import seeding
    from hpo.runtime.trial import Trial, TrialContext, TrialRecord, as_number
    from hpo.spec.space import resolve_values
    from hpo.spec.user_code import UserCodeError, load

    spec = handle.spec
    assert spec.test is not None
    who = f"test: {spec.test}"
    test_fn = load(spec.test, "test")
    model_id = trial_model(handle.study, best)
    state = read_trial_model(handle, best, model_id) if model_id is not None else None
    record = TrialRecord(TrialContext(spec, handle.artifacts, device, who=who), best.number, None, state=state)
    trial = Trial(record, resolve_values(spec, best.params))
    trial.start_epoch = trial.epochs
    seeding.seed_all(trial.seed)
    out = test_fn(trial)
    name = spec.metric.replace("val_", "test_") if spec.metric.startswith("val_") else f"test_{spec.metric}"
    raw = out if isinstance(out, Mapping) else {name: out}
    scores: dict[str, float] = {}
    for key, value in raw.items():
        number = as_number(value)
        if number is None:
            raise UserCodeError(f"{who}: returned {key}={value!r}; return a number or a dict of numbers")
        scores[str(key)] = number
    if not scores:
        raise UserCodeError(f"{who}: returned no scores; return a number or a dict of numbers")
    metric = name if name in scores else next(iter(scores))
    return _record(handle, best, metric, scores[metric], scores, model_id, f"trial{best.number}-model.pt")


def delete_study(study: optuna.Study) -> int:
    """Delete a study and the files it put in its artifact store; returns files removed.

    Everything read from the study is untrusted (anyone who can write the database can write it):
    only names hpo itself creates (Optuna's uuid artifact ids and their `<id>-best_model.pt` links,
    this study's `<uid>-trialN-a.ckpt` and `<uid>-trialN.log`) are removed, only as regular files
    directly inside the recorded artifact folder, never through a link."""
    from optuna.artifacts import get_all_artifact_meta

    system = system_attrs(study)
    removed = 0
    folder = system.get(ARTIFACTS_ATTR)
    if isinstance(folder, str) and Path(folder).is_dir():
        base = Path(folder).resolve()
        names = {m.artifact_id for m in get_all_artifact_meta(study)}
        for t in study.get_trials(deepcopy=False):
            names.update(m.artifact_id for m in get_all_artifact_meta(t, storage=storage_of(study)))
        uid = system.get(UID_ATTR)
        if isinstance(uid, str) and UID_RE.match(uid):
            names.update(p.name for p in base.glob(f"{uid}-trial*.ckpt"))
            names.update(p.name for p in base.glob(f"{uid}-trial*.log"))  # logs of trials still running
        names.update(link for n in list(names) if isinstance(n, str) for link in named_links(base, n))
        for name in names:
            if (path := own_file(base, name, uid)) is not None:
                path.unlink()
                removed += 1
        with contextlib.suppress(OSError):  # the store's folder for files being written, when no one writes
            (base / TEMP_FOLDER).rmdir()
    optuna.delete_study(study_name=study.study_name, storage=storage_of(study))
    return removed



