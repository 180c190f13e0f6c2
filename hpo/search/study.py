"""Create a study from a spec, or join one from the spec stored in it.

The spec lives in the study's user attributes, so any Optuna tool sees what was run and a worker
needs only the study name and the storage URL. A study is resumed only when the stored spec
describes the same search (the budget may grow).
"""

from __future__ import annotations

import os
import re
import uuid
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

import optuna
from optuna.storages import BaseStorage

from hpo._private import storage_of, study_id, study_names, undecodable_attrs
from hpo.errors import (
    HpoError,
    SettingError,
    SpecError,
    StorageError,
    StudyExistsError,
    UnreadableStudyError,
)
from hpo.runtime.stopping import STOP_ATTR
from hpo.search.records import SPEC_ATTR, stored_spec
from hpo.search.samplers import make_pruner, make_sampler
from hpo.spec.loading import spec_from_mapping
from hpo.spec.schema import StudySpec
from hpo.storage.artifacts import Artifacts, open_store
from hpo.storage.keys import ARTIFACTS_ATTR, ENV_ARTIFACTS, UID_ATTR, study_folder
from hpo.storage.locks import creation_lock
from hpo.storage.retry import mark_queued
from hpo.storage.urls import mask



@dataclass
class StudyHandle:
    study: optuna.Study
    spec: StudySpec
    artifacts: Artifacts
    notes: list[str] = field(default_factory=list)  # what a front end tells the person once (hpo says nothing itself)


def choose_device(name: str | None) -> torch.device:
    """`auto` (default): CUDA when present, else CPU."""
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SettingError("device", f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SettingError("device", f"{name} requested but no CUDA GPU is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SettingError("device", f"{name} does not exist ({torch.cuda.device_count()} GPUs)")
    elif device.type != "cpu":
        raise SettingError("device", f"unsupported device {name!r} (use auto, cpu, cuda or cuda:N)")
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
    return storage_of(study).get_study_system_attrs(study_id(study))


def _handle(study: optuna.Study, spec: StudySpec, storage_url: str, artifact_dir: str | None) -> StudyHandle:
    """The study with its spec and its artifact store: the folder given (--artifacts, or
    HPO_ARTIFACTS), else where the study recorded it, else the default beside the storage."""
    path, note = study_folder(artifact_dir, storage_url, system_attrs(study))
    return StudyHandle(study, spec, _artifacts(study, path), [note] if note is not None else [])


def _artifacts(study: optuna.Study, path: Path) -> Artifacts:
    system = system_attrs(study)
    store = open_store(path)
    if system.get(ARTIFACTS_ATTR) is None:
        storage_of(study).set_study_system_attr(study_id(study), ARTIFACTS_ATTR, str(path.resolve()))
    uid = system.get(UID_ATTR)
    if uid is None:
        uid = uuid.uuid4().hex[:12]
        storage_of(study).set_study_system_attr(study_id(study), UID_ATTR, uid)
    elif not (isinstance(uid, str) and re.fullmatch(r"[0-9a-f]{12}", uid)):
        # It names checkpoint files: a crafted value must not steer writes outside the store.
        raise StorageError(f"study {study.study_name!r} has an invalid {UID_ATTR} ({str(uid)[:40]!r}); "
                           "its database was edited by something other than hpo")
    return Artifacts(store, uid, path)


def open_for_spec(
    spec: StudySpec, storage: BaseStorage, storage_url: str, artifact_dir: str | None = None
) -> StudyHandle:
    """Create the spec's study, or resume it when the stored spec describes the same search.
    Processes doing this at the same instant take turns (one study, one checkpoint id)."""
    with creation_lock(storage_url):
        return _open_for_spec(spec, storage, storage_url, artifact_dir)


def _open_for_spec(spec: StudySpec, storage: BaseStorage, storage_url: str, artifact_dir: str | None) -> StudyHandle:
    sampler, pruner = make_sampler(spec), make_pruner(spec)
    try:
        readable_attrs(storage, storage.get_study_id_from_name(spec.name), spec.name)  # one line, before any write
    except KeyError:
        pass  # a new study
    starts = warm_start_configurations(spec, storage, storage_url)  # a missing study: refused before any write
    if explicit := artifact_dir or os.environ.get(ENV_ARTIFACTS):
        open_store(Path(explicit))  # an unusable folder is refused before the study exists
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = optuna.create_study(
            storage=storage,
            study_name=spec.name,
            directions=[optuna.study.StudyDirection[o.direction.upper()] for o in spec.goals],
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
        if not spec.pruner.given and spec.pruner != old.pruner:  # hpo's default changed since: the study keeps its own
            spec = replace(spec, pruner=old.pruner)
            study.pruner = make_pruner(spec)
        if (key := _diff(old.search_definition(), spec.search_definition())) is not None:
            raise StudyExistsError(
                f"{spec.source}: study {spec.name!r} already exists with a different spec "
                f"(first difference: {key}); rename the study or delete the existing one", spec.name
            )
    if stored != spec.to_dict():
        study.set_user_attr(SPEC_ATTR, spec.to_dict())  # first run, or a changed budget
    if stored is None:
        _name_objectives(study, [o.name for o in spec.goals])
    enqueue(study, [*spec.enqueue, *starts])
    return _handle(study, spec, storage_url, artifact_dir)


def _name_objectives(study: optuna.Study, names: list[str]) -> None:
    """The dashboard then labels its axes val_accuracy instead of "Objective 0"."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(names)


def enqueue(study: optuna.Study, configurations: list[Mapping[str, Any]]) -> list[int | None]:
    """Queue known configurations to run first (counted in the budget). One already queued or run
    is skipped, so re-runs and workers starting together queue each once (they take turns under the
    creation lock). Returns each one's trial number, or None where it was already there."""
    numbers: list[int | None] = []
    storage, sid = storage_of(study), study_id(study)
    for params in configurations:
        before = storage.get_n_trials(sid)  # a count, not a read of every trial
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "enqueue_trial is experimental" and out-of-range notes
            study.enqueue_trial(dict(params), skip_if_exists=True)
        after = storage.get_n_trials(sid)
        numbers.append(after - 1 if after > before else None)
        if after > before:
            mark_queued(study, after - 1)
    return numbers


def warm_start_configurations(spec: StudySpec, storage: BaseStorage, storage_url: str) -> list[dict[str, Any]]:
    """`warm_start: {study, top}`: the other study's best `top` configurations (its Pareto front
    first with several objectives), restricted to this space's tuned parameters and values."""
    if spec.warm_start is None:
        return []
    from hpo.search.summary import ranked
    from hpo.spec.validate import value_problem

    name = spec.warm_start.study
    try:
        storage.get_study_id_from_name(name)
    except KeyError:
        raise SpecError(f"{spec.source}: warm_start.study: no study named {name!r} in {mask(storage_url)}") from None
    other = optuna.load_study(study_name=name, storage=storage)
    tuned = {p.name: p for p in spec.space if p.tuned}
    out: list[dict[str, Any]] = []
    for trial in ranked(other):
        config = {k: v for k, v in trial.params.items() if k in tuned and value_problem(tuned[k], v) is None}
        if config and config not in out:
            out.append(config)
        if len(out) == spec.warm_start.top:
            break
    return out


def readable_attrs(storage: BaseStorage, study_id: int, name: str) -> dict[str, Any]:
    """A study's user attributes (its spec, its test record); UnreadableStudyError, saying which
    attribute and why, when one cannot be decoded (written by another tool, a bad migration)."""
    try:
        attrs = storage.get_study_user_attrs(study_id)
        storage.get_study_system_attrs(study_id)
    except ValueError as e:
        bad = undecodable_attrs(storage, study_id)
        what = ", ".join(f"its {kind} attribute {key!r} is not valid JSON ({why})" for kind, key, why in bad) \
            or f"its attributes cannot be decoded ({e})"
        raise UnreadableStudyError(f"study {name!r} cannot be read: {what}; it was written by something other "
                                   "than hpo", name) from None
    return attrs


def open_existing(name: str, storage: BaseStorage, storage_url: str, artifact_dir: str | None = None) -> StudyHandle:
    """Join a study from the spec stored in it: a worker needs only the name and the storage."""
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        names = [n for _, n in study_names(storage)] or [s.study_name for s in storage.get_all_studies()]
        hint = f" (studies there: {', '.join(names[:10])})" if names else " (it holds no studies)"
        raise StorageError(f"no study named {name!r} in {mask(storage_url)}{hint}") from None
    spec = spec_from_mapping(stored_spec(readable_attrs(storage, study_id, name), name), f"study {name!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = optuna.load_study(
            study_name=name, storage=storage, sampler=make_sampler(spec), pruner=make_pruner(spec)
        )
    return _handle(study, spec, storage_url, artifact_dir)


def stop_requests(study: optuna.Study) -> int:
    """How many times `hpo stop` was asked for this study: a worker stops when it changes."""
    value = system_attrs(study).get(STOP_ATTR, 0)
    return int(value) if isinstance(value, int) else 0


def retry_failed(study: optuna.Study) -> list[tuple[int, int]]:
    """`hpo retry`: queue every failed trial that nothing retries yet, with its parameters, to run
    from the start (a failed trial's checkpoint is gone). Returns (failed, queued) numbers."""
    from hpo.search.budget import retried_numbers
    from hpo.storage.retry import requeue_fresh

    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    out = []
    for t in trials:
        if t.state == optuna.trial.TrialState.FAIL and t.number not in retried:
            out.append((t.number, requeue_fresh(study, t)))
    return out


def rerun_completed(study: optuna.Study, number: int) -> int:
    """`hpo retry STUDY N`: queue trial N again with its parameters and seed. A failed trial runs
    from the start, as `hpo retry` queues every failed one; a completed one runs again so that
    its saved model, which cannot be read back, is written anew. Returns the new trial's number."""
    from hpo.search.budget import retried_numbers
    from hpo.storage.keys import RERUN_ATTR
    from hpo.storage.retry import requeue_fresh, rerun

    trials = study.get_trials(deepcopy=False)
    if number >= len(trials):
        raise HpoError(f"study {study.study_name} has no trial {number} (it has {len(trials)})")
    trial = trials[number]
    if trial.state == optuna.trial.TrialState.FAIL and number not in retried_numbers(trials):
        return requeue_fresh(study, trial)
    if trial.state != optuna.trial.TrialState.COMPLETE:
        raise HpoError(f"trial {number} of study {study.study_name} is {trial.state.name.lower()}"
                       f"{' and already queued again' if number in retried_numbers(trials) else ''}: only a failed "
                       "or completed trial can be run again")
    waiting = [t.number for t in trials if t.state in (optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING)
               and t.system_attrs.get(RERUN_ATTR) == number]
    if waiting:
        raise HpoError(f"trial {number} of study {study.study_name} is already queued again (as #{waiting[0]})")
    return rerun(study, trial)
