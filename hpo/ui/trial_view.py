"""One trial as a person reads it: `hpo show` (everything the study holds about it) and `hpo logs`
(what its code printed, live while it runs). No torch, and on a SQL database no optuna: the trial
is read alone (hpo.search.reading), so a study of 100,000 trials costs what one trial costs."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from hpo.errors import HpoError
from hpo.search.records import StudyView, TrialRecord
from hpo.storage.keys import ERROR_ATTR, LOG_FILENAME
from hpo.ui.text import fmt, table_lines

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

    from hpo.search.study import StudyHandle

# Attributes shown in their own section, not among "Attributes".
_OWN = {"reason", "traceback", "retry_reason", "epoch_seconds"}


class TrialSource(Protocol):
    """Where trials are read from: the database's tables (hpo.search.reading.SqlTrials) or an
    Optuna study (OptunaTrials), which read the same trial the same way."""

    view: StudyView

    def trial(self, number: int) -> TrialRecord: ...


class OptunaTrials:
    """Trials through Optuna's storage API (a Redis journal, a gRPC proxy)."""

    def __init__(self, handle: StudyHandle) -> None:
        self.study = handle.study
        self.view = StudyView(handle.study.study_name, handle.spec.metric, list(handle.study.metric_names or []),
                              handle.artifacts)

    def trial(self, number: int) -> TrialRecord:
        """Trial `number`, read alone (a study of 100,000 trials is not loaded to show one)."""
        from hpo._private import storage_of, study_id

        storage = storage_of(self.study)
        try:
            found = storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study_id(self.study), number))
        except KeyError:
            n = storage.get_n_trials(study_id(self.study))
            where = f"trials 0-{n - 1}" if n else "no trials yet"
            raise HpoError(f"study {self.study.study_name} has no trial {number} ({where})") from None
        return record_of(found, storage)


def record_of(trial: FrozenTrial, storage: Any) -> TrialRecord:
    from optuna.artifacts import get_all_artifact_meta

    from hpo._private import ARTIFACT_ATTR_PREFIX

    metas = get_all_artifact_meta(trial, storage=storage)
    return TrialRecord(number=trial.number, state=trial.state.name, values=trial.values, start=trial.datetime_start,
                       complete=trial.datetime_complete, params=dict(trial.params),
                       reported=dict(trial.intermediate_values), user_attrs=dict(trial.user_attrs),
                       system_attrs={k: v for k, v in trial.system_attrs.items()
                                     if not k.startswith(ARTIFACT_ATTR_PREFIX)},
                       artifacts=tuple((m.filename, m.artifact_id) for m in metas))


def log_of(source: TrialSource, trial: TrialRecord) -> str | None:
    """What the trial's code printed: the live file while it runs, then the trial's log.txt."""
    folder = source.view.folder
    live = folder.log_path(trial.number)
    if trial.state == "RUNNING" and live.is_file():
        try:
            return live.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:  # it ended between the two calls: its artifact holds it
            trial = source.trial(trial.number)
    ids = [aid for name, aid in trial.artifacts if name == LOG_FILENAME]
    if not ids:
        # A process killed under its trial (kill -9, out of memory) left the live file behind.
        return live.read_text(encoding="utf-8", errors="replace") if live.is_file() else None
    try:
        return folder.read_text(ids[-1])
    except FileNotFoundError:
        raise HpoError(f"the log of trial {trial.number} is not in the artifact folder {folder.path} "
                       "(another machine's? give this command the shared artifact folder, or set "
                       "HPO_ARTIFACTS)") from None


def follow(source: TrialSource, number: int, write: Callable[[str], None], poll: float = 0.5) -> None:
    """Print the trial's log as it grows, until the trial ends (Ctrl-C stops following)."""
    shown = 0
    while True:
        trial = source.trial(number)
        text = log_of(source, trial) or ""
        if len(text) > shown:
            write(text[shown:])
            shown = len(text)
        if trial.state not in ("RUNNING", "WAITING"):
            return
        time.sleep(poll)


def render(source: TrialSource, trial: TrialRecord, log_lines: int = 20) -> str:
    """The whole trial: state, reason, parameters, curves, attributes, traceback, files, log's end."""
    view = source.view
    out = [_headline(view, trial)]
    attrs = trial.user_attrs
    if reason := attrs.get("reason"):
        out.append(f"Reason: {reason}")
    if retry := attrs.get("retry_reason"):
        out.append(f"Retry: {retry}")
    if trial.params:
        out += ["", "Parameters", *_indent(table_lines([[k, fmt(v)] for k, v in trial.params.items()]))]
    out += _lineage(source, trial)
    out += _curves(view, trial)
    others = {k: v for k, v in sorted(attrs.items())
              if k not in _OWN and not _is_curve(v) and not k.startswith("pbt_")}
    if others:
        out += ["", "Attributes", *_indent(table_lines([[k, _short(v)] for k, v in others.items()]))]
    out += _error(trial)
    out += _files(view, trial)
    text = log_of(source, trial)
    if text:
        lines = text.rstrip("\n").splitlines()
        head = f"Log (last {log_lines} of {len(lines)} lines; all of it: hpo logs {view.name} " \
               f"{trial.number})" if len(lines) > log_lines else "Log"
        out += ["", head, *_indent(lines[-log_lines:])]
    else:
        out += ["", "Log: nothing printed"]
    return "\n".join(out)


def _headline(view: StudyView, trial: TrialRecord) -> str:
    names = view.metric_names or [view.metric]
    value = ""
    if trial.values:
        value = " (" + ", ".join(f"{n} {fmt(v)}" for n, v in zip(names, trial.values)) + ")"
    timing = ""
    if trial.start is not None:
        timing = f", started {trial.start:%Y-%m-%d %H:%M:%S}"
        if trial.complete is not None:
            timing += f", {(trial.complete - trial.start).total_seconds():.1f} s"
    device = f" on {trial.user_attrs['device']}" if "device" in trial.user_attrs else ""
    return f"Trial {trial.number} of study {view.name}: {trial.state}{value}{timing}{device}"


def _lineage(source: TrialSource, trial: TrialRecord) -> list[str]:
    """A population member's segment (search.strategy pbt): the segments its model went through,
    each with its parameters: the schedule that trained it."""
    if "pbt_member" not in trial.user_attrs:
        return []
    chain = [trial]
    while (parent := chain[-1].user_attrs.get("pbt_parent")) is not None and len(chain) < 10_000:
        try:
            chain.append(source.trial(int(parent)))
        except HpoError:
            break
    chain.reverse()
    names = sorted({k for t in chain for k in t.params})
    rows = [["epochs", "trial", "member", "how", *names, source.view.metric]]
    for t in chain:
        u = t.user_attrs
        first, last = (u.get("pbt_epochs") or [0, 0])[:2]
        how = str(u.get("pbt_action", ""))
        if u.get("pbt_donor") is not None:
            how += f" from member {u['pbt_donor']}"
        value = fmt(t.values[0]) if t.values else t.state
        rows.append([f"{first}-{last - 1}", str(t.number), str(u.get("pbt_member")), how,
                     *[fmt(t.params[n]) if n in t.params else "" for n in names], value])
    u = trial.user_attrs
    head = (f"Lineage (member {u['pbt_member']}, generation {u.get('pbt_generation')}: the segments its model "
            "trained in, first to last)")
    return ["", head, *_indent(table_lines(rows))]


def _is_curve(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, (int, float)) for v in value)


def _curves(view: StudyView, trial: TrialRecord) -> list[str]:
    """Each reported metric per epoch: the study's metric (intermediate values) and the others.
    Curves end at the trial's last epoch (a resumed trial or a member's segment carries the
    epochs before it in its other curves)."""
    curves: dict[str, list[Any]] = {}
    if trial.reported:
        curves[view.metric] = [trial.reported[e] for e in sorted(trial.reported)]
    curves.update({k: v for k, v in sorted(trial.user_attrs.items())
                   if _is_curve(v) and k != "epoch_seconds" and not k.startswith("pbt_")})
    if "epoch_seconds" in trial.user_attrs:
        curves["seconds"] = trial.user_attrs["epoch_seconds"]
    if not curves:
        return []
    n = max(len(v) for v in curves.values())
    end = max(trial.reported) + 1 if trial.reported else n
    rows = [["epoch", *curves]]
    for epoch in range(end - n, end):
        rows.append([str(epoch), *[fmt(float(v[epoch - end + len(v)])) if end - epoch <= len(v) else ""
                                   for v in curves.values()]])
    return ["", "Curves (per epoch)", *_indent(table_lines(rows))]


def _error(trial: TrialRecord) -> list[str]:
    error = trial.system_attrs.get(ERROR_ATTR)
    frames = error.get("frames") if isinstance(error, dict) else None
    full = trial.user_attrs.get("traceback")
    out: list[str] = []
    if frames:
        out += ["", "Where in your code", *_indent(str(frames).splitlines())]
    if full:
        out += ["", "Traceback", *_indent(str(full).rstrip().splitlines())]
    return out


def _files(view: StudyView, trial: TrialRecord) -> list[str]:
    rows = []
    first = (trial.system_attrs.get("retry_history") or [trial.number])[0]
    rows += [["checkpoint", str(path)] for path in view.folder.checkpoint_files(int(first))]
    if view.folder.uid is not None and (live := view.folder.log_path(trial.number)).is_file():
        rows.append(["log (live)", str(live)])
    rows += [[name, str(view.folder.file_of(aid))] for name, aid in trial.artifacts]
    return ["", "Files", *_indent(table_lines(rows))] if rows else []


def _indent(lines: list[str]) -> list[str]:
    return ["  " + line for line in lines]


def _short(value: Any) -> str:
    text = fmt(value) if isinstance(value, float) else str(value)
    return text if len(text) <= 100 else text[:97] + "..."
