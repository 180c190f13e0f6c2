"""What a study holds, as a person reads it: its summary (counts, the best trial or the Pareto
front, test scores) and one row per study. Plain data, no optuna: the read-only commands fill
these from SQL (hpo.search.reading) or from an Optuna study (hpo.search.summary)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from hpo.storage.keys import ArtifactFolder

SPEC_ATTR = "spec"  # user attr: the spec, readable by any Optuna tool
TEST_ATTR = "test"  # user attr: the best model's one test-split score ({"front": [...]} for several objectives)


def stored_spec(user_attrs: dict[str, Any], name: str) -> dict[str, Any]:
    """The spec a study holds, or the one line said of a study hpo did not create."""
    from hpo.errors import StorageError

    stored = user_attrs.get(SPEC_ATTR)
    if stored is None:
        raise StorageError(f"study {name!r} was not created by hpo (it has no stored spec)")
    return dict(stored)


@dataclass(frozen=True)
class FrontTrial:
    """One trial of the front, as `hpo best` shows it."""

    number: int
    values: dict[str, float]  # objective -> value
    measured: dict[str, float]  # constrained metrics that are not objectives (e.g. latency_ms)
    params: dict[str, Any]
    test: dict[str, Any] | None


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
    objectives: tuple[tuple[str, str], ...] = ()  # (name, direction) of each objective
    front: tuple[FrontTrial, ...] = ()  # several objectives: the Pareto front

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1


@dataclass(frozen=True)
class StudyRow:
    """One study as `hpo studies` lists it; `problem` says why it cannot be read (the rest is empty)."""

    name: str
    trials: int = 0
    directions: tuple[str, ...] = ()
    best: float | None = None
    created: datetime | None = None
    problem: str | None = None


@dataclass(frozen=True)
class TrialRecord:
    """One trial whole, as `hpo show` reads it: from SQL (hpo.search.reading.trial_record) or
    from an Optuna FrozenTrial (hpo.ui.trial_view.record_of)."""

    number: int
    state: str  # Optuna's TrialState name
    values: list[float] | None
    start: datetime | None
    complete: datetime | None
    params: dict[str, Any]
    reported: dict[int, float]  # step -> the study's metric, as trial.report gave it
    user_attrs: dict[str, Any]
    system_attrs: dict[str, Any]  # without Optuna's artifact records (see `artifacts`)
    artifacts: tuple[tuple[str, str], ...]  # (filename, artifact id) uploaded to the trial, oldest first


@dataclass(frozen=True)
class StudyView:
    """What showing a study's trials needs of the study."""

    name: str
    metric: str  # the metric reported each epoch
    metric_names: list[str]  # the objectives' names, where the study set them
    folder: ArtifactFolder
