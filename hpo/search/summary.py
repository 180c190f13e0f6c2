"""What a study holds, summarised for a person from an Optuna study: counts, the best trial (or the
Pareto front of a study with several objectives), test scores (hpo.search.records). No torch; the
read-only commands get the same from SQL where they can (hpo.search.reading)."""

from __future__ import annotations

import contextlib
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from hpo._private import study_names, undecodable_attrs
from hpo.runtime.pruning import dominates
from hpo.search.budget import state_counts
from hpo.search.records import SPEC_ATTR, TEST_ATTR, FrontTrial, StudyRow, Summary


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The best feasible trial of a single-objective study (None with several objectives)."""
    if len(study.directions) > 1:
        return None
    try:
        return study.best_trial
    except ValueError:
        return None


def front(study: optuna.Study) -> list[FrozenTrial]:
    """The best trials: with several objectives the feasible Pareto front (Optuna's best_trials),
    ordered by the first objective, best first; else the one best trial."""
    if len(study.directions) == 1:
        best = best_trial(study)
        return [best] if best is not None else []
    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    return sorted(study.best_trials, key=lambda t: (-t.values[0] if maximize else t.values[0], t.number))


def ranked(study: optuna.Study) -> list[FrozenTrial]:
    """Completed feasible trials, best first: by value, or with several objectives by how many
    trials dominate each (the front first), then by the first objective."""
    directions = study.directions
    first = -1.0 if directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1.0
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.values is not None and all(c <= 0 for c in t.constraints.values())]

    def dominated_by(t: FrozenTrial) -> int:
        return sum(1 for u in done if dominates(u.values, t.values, directions)) if len(directions) > 1 else 0

    return sorted(done, key=lambda t: (dominated_by(t), first * t.values[0], t.number))


def objective_names(study: optuna.Study, spec: dict[str, Any]) -> list[str]:
    names = study.metric_names
    if names is not None:
        return list(names)
    return [spec.get("metric", "value")] if len(study.directions) == 1 else [
        f"objective {i}" for i in range(len(study.directions))]


def summarize(study: optuna.Study) -> Summary:
    trials = study.get_trials(deepcopy=False)
    counts = state_counts(trials)
    attrs = study.user_attrs
    spec = attrs.get(SPEC_ATTR) or {}
    names = objective_names(study, spec)
    directions = [d.name.lower() for d in study.directions]
    common: dict[str, Any] = {"name": study.study_name, "counts": dict(counts), "test": attrs.get(TEST_ATTR),
              "n_trials_budget": (spec.get("budget") or {}).get("n_trials"),
              "objectives": tuple(zip(names, directions))}
    if len(directions) > 1:
        constrained = [c.get("metric") for c in spec.get("constraints", []) if c.get("metric") not in names]
        tests = {r.get("trial"): r for r in ((attrs.get(TEST_ATTR) or {}).get("front") or [])}
        rows = tuple(FrontTrial(t.number, dict(zip(names, t.values)),
                                {m: t.user_attrs[m] for m in constrained if m in t.user_attrs},
                                dict(t.params), tests.get(t.number)) for t in front(study))
        return Summary(direction=", ".join(directions), metric=", ".join(names), best_number=None,
                       best_value=None, best_params={}, front=rows, **common)
    best = best_trial(study)
    return Summary(
        direction=directions[0],
        metric=names[0],
        best_number=best.number if best else None,
        best_value=best.value if best else None,
        best_params=dict(best.params) if best else {},
        **common,
    )


def study_rows(storage: BaseStorage) -> list[StudyRow]:
    """Every study of a storage, in the order they were made. One whose attributes cannot be
    decoded (written by another tool, a bad migration) is listed with why, and the others as usual."""
    try:
        summaries = optuna.get_all_study_summaries(storage, include_best_trial=True)
    except ValueError:
        return [_row_alone(storage, sid, name) for sid, name in study_names(storage)]
    return [StudyRow(s.study_name, s.n_trials, tuple(d.name.lower() for d in s.directions),
                     s.best_trial.value if s.best_trial is not None and len(s.directions) == 1 else None,
                     s.datetime_start) for s in summaries]


def _row_alone(storage: BaseStorage, sid: int, name: str) -> StudyRow:
    bad = undecodable_attrs(storage, sid)
    if bad:
        return StudyRow(name, problem="; ".join(f"its {kind} attribute {key!r} is not valid JSON" for kind, key, _ in bad))
    directions = storage.get_study_directions(sid)
    trials = storage.get_all_trials(sid, deepcopy=False)
    best = None
    if len(directions) == 1:
        with contextlib.suppress(ValueError):
            best = storage.get_best_trial(sid).value
    starts = [t.datetime_start for t in trials if t.datetime_start is not None]
    return StudyRow(name, len(trials), tuple(d.name.lower() for d in directions), best, min(starts, default=None))
