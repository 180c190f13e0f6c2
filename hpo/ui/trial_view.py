"""One trial as a person reads it: `hpo show` (everything the study holds about it) and `hpo logs`
(what its code printed, live while it runs). No torch: both read the storage and the artifact
folder only."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo._private import storage_of, study_id
from hpo.errors import HpoError
from hpo.runtime.endings import ERROR_ATTR
from hpo.search.study import StudyHandle
from hpo.storage.artifacts import find_artifact
from hpo.storage.keys import LOG_FILENAME
from hpo.ui.text import fmt, table_lines

# Attributes shown in their own section, not among "Attributes".
_OWN = {"reason", "traceback", "retry_reason", "epoch_seconds"}


def find_trial(study: optuna.Study, number: int) -> FrozenTrial:
    """Trial `number`, read alone (a study of 100,000 trials is not loaded to show one)."""
    storage = storage_of(study)
    try:
        return storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study_id(study), number))
    except KeyError:
        n = storage.get_n_trials(study_id(study))
        where = f"trials 0-{n - 1}" if n else "no trials yet"
        raise HpoError(f"study {study.study_name} has no trial {number} ({where})") from None


def log_of(handle: StudyHandle, trial: FrozenTrial) -> str | None:
    """What the trial's code printed: the live file while it runs, then the trial's log.txt."""
    live = handle.artifacts.log_path(trial.number)
    if trial.state == TrialState.RUNNING and live.is_file():
        try:
            return live.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:  # it ended between the two calls: its artifact holds it
            trial = find_trial(handle.study, trial.number)
    artifact = find_artifact(trial, LOG_FILENAME, storage_of(handle.study))
    if artifact is None:
        # A process killed under its trial (kill -9, out of memory) left the live file behind.
        return live.read_text(encoding="utf-8", errors="replace") if live.is_file() else None
    try:
        return handle.artifacts.read_text(artifact)
    except FileNotFoundError:
        raise HpoError(f"the log of trial {trial.number} is not in the artifact folder {handle.artifacts.path} "
                       "(another machine's? give this command the shared artifact folder, or set "
                       "HPO_ARTIFACTS)") from None


def follow(handle: StudyHandle, number: int, write: Callable[[str], None], poll: float = 0.5) -> None:
    """Print the trial's log as it grows, until the trial ends (Ctrl-C stops following)."""
    shown = 0
    while True:
        trial = find_trial(handle.study, number)
        text = log_of(handle, trial) or ""
        if len(text) > shown:
            write(text[shown:])
            shown = len(text)
        if trial.state != TrialState.RUNNING and trial.state != TrialState.WAITING:
            return
        time.sleep(poll)


def render(handle: StudyHandle, trial: FrozenTrial, log_lines: int = 20) -> str:
    """The whole trial: state, reason, parameters, curves, attributes, traceback, files, log's end."""
    out = [_headline(handle, trial)]
    attrs = trial.user_attrs
    if reason := attrs.get("reason"):
        out.append(f"Reason: {reason}")
    if retry := attrs.get("retry_reason"):
        out.append(f"Retry: {retry}")
    if trial.params:
        out += ["", "Parameters", *_indent(table_lines([[k, fmt(v)] for k, v in trial.params.items()]))]
    out += _curves(handle, trial)
    others = {k: v for k, v in attrs.items() if k not in _OWN and not _is_curve(v)}
    if others:
        out += ["", "Attributes", *_indent(table_lines([[k, _short(v)] for k, v in others.items()]))]
    out += _error(trial)
    out += _files(handle, trial)
    text = log_of(handle, trial)
    if text:
        lines = text.rstrip("\n").splitlines()
        head = f"Log (last {log_lines} of {len(lines)} lines; all of it: hpo logs {handle.study.study_name} " \
               f"{trial.number})" if len(lines) > log_lines else "Log"
        out += ["", head, *_indent(lines[-log_lines:])]
    else:
        out += ["", "Log: nothing printed"]
    return "\n".join(out)


def _headline(handle: StudyHandle, trial: FrozenTrial) -> str:
    names = handle.study.metric_names or [handle.spec.metric]
    value = ""
    if trial.values:
        value = " (" + ", ".join(f"{n} {fmt(v)}" for n, v in zip(names, trial.values)) + ")"
    timing = ""
    if trial.datetime_start is not None:
        timing = f", started {trial.datetime_start:%Y-%m-%d %H:%M:%S}"
        if trial.datetime_complete is not None:
            timing += f", {(trial.datetime_complete - trial.datetime_start).total_seconds():.1f} s"
    device = f" on {trial.user_attrs['device']}" if "device" in trial.user_attrs else ""
    return f"Trial {trial.number} of study {handle.study.study_name}: {trial.state.name}{value}{timing}{device}"


def _is_curve(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, (int, float)) for v in value)


def _curves(handle: StudyHandle, trial: FrozenTrial) -> list[str]:
    """Each reported metric per epoch: the study's metric (intermediate values) and the others."""
    curves: dict[str, list[Any]] = {}
    if trial.intermediate_values:
        epochs = sorted(trial.intermediate_values)
        curves[handle.spec.metric] = [trial.intermediate_values[e] for e in epochs]
    curves.update({k: v for k, v in trial.user_attrs.items() if _is_curve(v) and k != "epoch_seconds"})
    if "epoch_seconds" in trial.user_attrs:
        curves["seconds"] = trial.user_attrs["epoch_seconds"]
    if not curves:
        return []
    n = max(len(v) for v in curves.values())
    first = min(trial.intermediate_values) if trial.intermediate_values else 0
    rows = [["epoch", *curves]]
    for i in range(n):
        rows.append([str(first + i), *[fmt(float(v[i])) if i < len(v) else "" for v in curves.values()]])
    return ["", "Curves (per epoch)", *_indent(table_lines(rows))]


def _error(trial: FrozenTrial) -> list[str]:
    error = trial.system_attrs.get(ERROR_ATTR)
    frames = error.get("frames") if isinstance(error, dict) else None
    full = trial.user_attrs.get("traceback")
    out: list[str] = []
    if frames:
        out += ["", "Where in your code", *_indent(str(frames).splitlines())]
    if full:
        out += ["", "Traceback", *_indent(str(full).rstrip().splitlines())]
    return out


def _files(handle: StudyHandle, trial: FrozenTrial) -> list[str]:
    from optuna.artifacts import get_all_artifact_meta

    rows = []
    first = (trial.system_attrs.get("retry_history") or [trial.number])[0]
    rows += [["checkpoint", str(path)] for path in handle.artifacts.checkpoint_files(int(first))]
    if (live := handle.artifacts.log_path(trial.number)).is_file():
        rows.append(["log (live)", str(live)])
    for meta in get_all_artifact_meta(trial, storage=storage_of(handle.study)):
        rows.append([meta.filename, str(handle.artifacts.file_of(meta.artifact_id))])
    return ["", "Files", *_indent(table_lines(rows))] if rows else []


def _indent(lines: list[str]) -> list[str]:
    return ["  " + line for line in lines]


def _short(value: Any) -> str:
    text = fmt(value) if isinstance(value, float) else str(value)
    return text if len(text) <= 100 else text[:97] + "..."
