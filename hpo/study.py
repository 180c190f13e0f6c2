"""Studies: create or join one, run trials until the study's total budget is met, score the best.

The budget is the study's, not the process's: every worker counts finished, running, queued and
unretried failed trials in the storage before it starts another, so re-running a spec resumes
and any number of workers stop at the same total.
"""

from __future__ import annotations

import gc
import time
import uuid
import warnings
from collections import Counter
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

import optuna
import torch
from optuna.storages import BaseStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from hpo.artifacts import Artifacts, find_artifact, open_store, resolve_artifact_path
from hpo.data import DataCache
from hpo.errors import HpoError, SpecError, StorageError, TrialError
from hpo.model import build_model
from hpo.objective import Listener, Objective
from hpo.params import Params
from hpo.samplers import effective_n_trials, make_pruner, make_sampler
from hpo.spec import StudySpec, spec_from_mapping
from hpo.storage import BudgetLock, mask
from hpo.train import configure_device, evaluate_ensemble

SPEC_ATTR = "spec"  # user attr: the spec, readable by any Optuna tool
TEST_ATTR = "test"  # user attr: the best model's one test-split score
UID_ATTR = "hpo:uid"  # system attr: names the study's checkpoints in the artifact store
ARTIFACTS_ATTR = "hpo:artifacts"  # system attr: where this study's artifacts were written


@dataclass
class StudyHandle:
    study: optuna.Study
    spec: StudySpec
    artifacts: Artifacts


@dataclass(frozen=True)
class BudgetStatus:
    total: int
    finished: int  # COMPLETE + PRUNED
    failed: int  # FAIL and not queued for a retry
    running: int
    waiting: int  # queued retries (or enqueued trials)

    @property
    def remaining(self) -> int:
        return self.total - self.finished - self.failed - self.running - self.waiting


@dataclass
class WorkerResult:
    ran: int = 0
    stopped: str = ""
    interrupted_trial: int | None = None
    resumes_from_epoch: int | None = None
    counts: dict[str, int] = field(default_factory=dict)


def choose_device(name: str | None) -> torch.device:
    """`auto` (default): CUDA when present, else CPU."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise HpoError(f"--device: unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise HpoError(f"--device: {name} requested but no CUDA GPU is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise HpoError(f"--device: {name} does not exist ({torch.cuda.device_count()} GPUs)")
    elif device.type != "cpu":
        raise HpoError(f"--device: unsupported device {name!r} (use auto, cpu, cuda or cuda:N)")
    return device


def _diff(a: Any, b: Any, path: str = "") -> str | None:
    """The first key path where two spec dicts differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if (d := _diff(a.get(key), b.get(key), f"{path}.{key}" if path else key)) is not None:
                return d
        return None
    return None if a == b else (path or "spec")


def system_attrs(study: optuna.Study) -> dict[str, Any]:
    # Optuna 5 keeps study system attrs on the storage API only.
    return study._storage.get_study_system_attrs(study._study_id)


def _artifacts(study: optuna.Study, storage_url: str, artifact_dir: str | None) -> Artifacts:
    system = system_attrs(study)
    path = resolve_artifact_path(artifact_dir, storage_url, system.get(ARTIFACTS_ATTR))
    store = open_store(path)
    if system.get(ARTIFACTS_ATTR) is None:
        study._storage.set_study_system_attr(study._study_id, ARTIFACTS_ATTR, str(path.resolve()))
    uid = system.get(UID_ATTR)
    if uid is None:
        uid = uuid.uuid4().hex[:12]
        study._storage.set_study_system_attr(study._study_id, UID_ATTR, uid)
    return Artifacts(store, uid, path)


def open_for_spec(
    spec: StudySpec, storage: BaseStorage, storage_url: str, artifact_dir: str | None = None
) -> StudyHandle:
    """Create the spec's study, or resume it when the stored spec describes the same search."""
    sampler, pruner = make_sampler(spec), make_pruner(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = optuna.create_study(
            storage=storage,
            study_name=spec.name,
            direction=spec.direction,  # type: ignore[arg-type]
            sampler=sampler,
            pruner=pruner,
            load_if_exists=True,
        )
    stored = study.user_attrs.get(SPEC_ATTR)
    if stored is None:
        if study.trials:
            raise SpecError(
                f"study {spec.name!r} already exists in {mask(storage_url)} and was not made by hpo; "
                "choose another name"
            )
    else:
        old = spec_from_mapping(stored, f"study {spec.name!r}")
        if (key := _diff(old.search_definition(), spec.search_definition())) is not None:
            raise SpecError(
                f"{spec.source}: study {spec.name!r} already exists with a different spec "
                f"(first difference: {key}); rename the study or `hpo delete {spec.name} --yes`"
            )
    if stored != spec.to_dict():
        study.set_user_attr(SPEC_ATTR, spec.to_dict())  # first run, or a changed budget
    if stored is None:
        _name_objective(study, spec.metric)
    return StudyHandle(study, spec, _artifacts(study, storage_url, artifact_dir))


def _name_objective(study: optuna.Study, metric: str) -> None:
    """The dashboard then labels its axes val_accuracy instead of "Objective 0"."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([metric])


def open_existing(
    name: str, storage: BaseStorage, storage_url: str, artifact_dir: str | None = None
) -> StudyHandle:
    """Join a study from the spec stored in it: a worker needs only the name and the storage."""
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        names = [s.study_name for s in storage.get_all_studies()]
        hint = f" (studies there: {', '.join(names[:10])})" if names else " (it holds no studies)"
        raise StorageError(f"no study named {name!r} in {mask(storage_url)}{hint}") from None
    stored = storage.get_study_user_attrs(study_id).get(SPEC_ATTR)
    if stored is None:
        raise StorageError(f"study {name!r} was not created by hpo (it has no stored spec)")
    spec = spec_from_mapping(stored, f"study {name!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = optuna.load_study(
            study_name=name, storage=storage, sampler=make_sampler(spec), pruner=make_pruner(spec)
        )
    return StudyHandle(study, spec, _artifacts(study, storage_url, artifact_dir))


def retried_numbers(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of trials that live on in a retry (they do not count against the budget)."""
    out: set[int] = set()
    for t in trials:
        out.update(int(n) for n in t.system_attrs.get("retry_history", ()))
    return out


def budget_status(study: optuna.Study, total: int) -> BudgetStatus:
    trials = study.get_trials(deepcopy=False)
    counts = Counter(t.state for t in trials)
    retried = retried_numbers(trials)
    failed = sum(1 for t in trials if t.state == TrialState.FAIL and t.number not in retried)
    return BudgetStatus(
        total=total,
        finished=counts[TrialState.COMPLETE] + counts[TrialState.PRUNED],
        failed=failed,
        running=counts[TrialState.RUNNING],
        waiting=counts[TrialState.WAITING],
    )


def _heartbeat_enabled(study: optuna.Study) -> bool:
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(study._storage)


def wait_for_running(study: optuna.Study) -> bool:
    """With the budget used up but trials still RUNNING (elsewhere, or a dead worker's that will
    go stale and come back as a retry), wait a moment and say so, rather than leave one behind.
    Without heartbeats a dead worker's trial can never be told apart, so there is no waiting."""
    if not _heartbeat_enabled(study):
        return False
    if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    time.sleep(min(2.0, max(0.2, study._storage.get_heartbeat_interval() / 4)))  # type: ignore[attr-defined]
    return True


def requeue(study: optuna.Study, trial_id: int) -> FrozenTrial | None:
    """Queue a retry of an interrupted trial, the way a heartbeat-stale trial is retried."""
    trial = study._storage.get_trial(trial_id)
    if trial.state != TrialState.FAIL:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)(study, trial)
    return trial


class _Tracker(Listener):
    """Remembers the trial in flight (to requeue it on Ctrl-C) and forwards to the front end."""

    def __init__(self, inner: Listener) -> None:
        self.inner = inner
        self.current: int | None = None
        self.epoch = 0

    def trial_started(self, number: int, params: Params, resumed_epoch: int) -> None:
        self.current, self.epoch = number, resumed_epoch
        self.inner.trial_started(number, params, resumed_epoch)

    def epoch_done(self, number: int, result: Any, value: float) -> None:
        self.epoch = result.epoch + 1
        self.inner.epoch_done(number, result, value)

    def trial_finished(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.current = None
        self.inner.trial_finished(study, trial)


def run_worker(
    handle: StudyHandle,
    *,
    device: torch.device,
    n_trials: int | None = None,
    timeout: float | None = None,
    listener: Listener | None = None,
    data: DataCache | None = None,
    wait_for_others: bool = True,
    checkpoint_interval: float = 2.0,
) -> WorkerResult:
    """Run trials until the study's budget is met, `n_trials` ran here, or `timeout` passed.

    KeyboardInterrupt (Ctrl-C, or SIGTERM turned into it by the CLI) ends the trial in flight as
    FAIL, queues its retry and re-raises: the next run resumes it from its last checkpoint.
    """
    study, spec = handle.study, handle.spec
    configure_device(device)
    tracker = _Tracker(listener or Listener())
    data = data or DataCache(spec.data, spec.seed, device, spec.model)
    objective = Objective(spec, data, device, handle.artifacts, tracker, checkpoint_interval)
    total = effective_n_trials(spec)
    timeout = timeout if timeout is not None else spec.budget.timeout
    deadline = time.monotonic() + timeout if timeout else None
    result = WorkerResult()

    def after_trial(s: optuna.Study, t: FrozenTrial) -> None:
        tracker.trial_finished(s, t)
        if t.state == TrialState.FAIL and device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()

    lock = BudgetLock(study._storage, study._study_id)
    objective.on_start = lock.release
    while True:
        if n_trials is not None and result.ran >= n_trials:
            result.stopped = f"ran the {n_trials} trials asked of this worker"
            break
        if deadline is not None and time.monotonic() >= deadline:
            result.stopped = f"timeout of {timeout:g} s reached"
            break
        lock.acquire()  # held until the next trial exists, so workers never overshoot
        status = budget_status(study, total)
        if status.remaining <= 0 and status.waiting == 0:
            lock.release()
            if wait_for_others and wait_for_running(study):
                continue
            result.stopped = f"study budget of {total} trials reached"
            break
        try:
            study.optimize(objective, n_trials=1, catch=(TrialError,), callbacks=[after_trial])
        except KeyboardInterrupt:
            lock.release()  # before the storage writes below
            if tracker.current is not None:
                trial_id = study._storage.get_trial_id_from_study_id_trial_number(
                    study._study_id, tracker.current
                )
                if requeue(study, trial_id) is not None:
                    result.interrupted_trial = tracker.current
                    result.resumes_from_epoch = objective.checkpointed_epoch
            raise Interrupted(result) from None
        finally:
            lock.release()
        result.ran += 1
    return result


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the worker; `result` says which trial will resume where."""

    def __init__(self, result: WorkerResult) -> None:
        super().__init__()
        self.result = result


# ---- after the search ----------------------------------------------------------------------


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:
        return None


def finalize(handle: StudyHandle, device: torch.device, data: DataCache | None = None) -> dict[str, Any] | None:
    """Score the best trial's model once on the test split and save it as the study's model."""
    study, spec = handle.study, handle.spec
    best = best_trial(study)
    if best is None:
        return None
    recorded = study.user_attrs.get(TEST_ATTR)
    if recorded and recorded.get("trial") == best.number:
        return recorded
    model_id = find_artifact(best, "model.pt", study._storage)
    if model_id is None:
        return None
    saved = handle.artifacts.read(model_id)
    params = Params.from_mapping(saved["params"])
    data = data or DataCache(spec.data, spec.seed, device, spec.model)
    folds = data.folds(params.scaling)
    models = []
    for fold, state in zip(folds, saved["models"]):
        model = build_model(spec.model, params, fold.input_shape, fold.n_outputs)
        model.load_state_dict(state)
        models.append(model.to(device))
    # With cross-validation the best model is the ensemble of its k fold models.
    scores = evaluate_ensemble(models, [f.test for f in folds], folds[0].task, device)
    metric = spec.metric.replace("val_", "test_")
    bundle = {
        "models": [m.state_dict() for m in models],
        "params": params.to_dict(),
        "model_family": spec.model,
        "input_shape": list(folds[0].input_shape),
        "n_outputs": folds[0].n_outputs,
        "spec": spec.to_dict(),
        "trial": best.number,
        "test": scores,
    }
    artifact_id = handle.artifacts.upload(study, "best_model.pt", bundle)
    record = {
        "trial": best.number,
        "metric": metric,
        "value": scores[metric.removeprefix("test_")],
        "scores": scores,
        "val_value": best.value,
        "model_artifact": artifact_id,
        "model_path": str(handle.artifacts.file_of(artifact_id).resolve()),
    }
    study.set_user_attr(TEST_ATTR, record)
    return record


def delete_study(study: optuna.Study) -> int:
    """Delete a study and the files it put in its artifact store; returns files removed."""
    from optuna.artifacts import get_all_artifact_meta

    system = system_attrs(study)
    removed = 0
    if (folder := system.get(ARTIFACTS_ATTR)) and Path(folder).is_dir():
        ids = {m.artifact_id for m in get_all_artifact_meta(study)}
        for t in study.get_trials(deepcopy=False):
            ids.update(m.artifact_id for m in get_all_artifact_meta(t, storage=study._storage))
        paths = [Path(folder) / i for i in ids]
        if uid := system.get(UID_ATTR):
            paths += list(Path(folder).glob(f"{uid}-trial*.ckpt"))
        for path in paths:
            if path.is_file():
                path.unlink()
                removed += 1
    optuna.delete_study(study_name=study.study_name, storage=study._storage)
    return removed


@dataclass(frozen=True)
class Summary:
    name: str
    direction: str
    metric: str
    counts: dict[str, int]
    best_number: int | None
    best_value: float | None
    best_params: dict[str, Any]
    test: dict[str, Any] | None
    n_trials_budget: int | None


def summarize(study: optuna.Study) -> Summary:
    trials = study.get_trials(deepcopy=False)
    counts = Counter(t.state.name for t in trials)
    best = best_trial(study)
    attrs = study.user_attrs
    spec = attrs.get(SPEC_ATTR) or {}
    return Summary(
        name=study.study_name,
        direction=study.direction.name.lower(),
        metric=spec.get("metric", "value"),
        counts=dict(counts),
        best_number=best.number if best else None,
        best_value=best.value if best else None,
        best_params=dict(best.params) if best else {},
        test=attrs.get(TEST_ATTR),
        n_trials_budget=(spec.get("budget") or {}).get("n_trials"),
    )


__all__ = [
    "BudgetStatus",
    "Interrupted",
    "StudyHandle",
    "Summary",
    "WorkerResult",
    "budget_status",
    "choose_device",
    "finalize",
    "open_existing",
    "open_for_spec",
    "run_worker",
    "summarize",
]
