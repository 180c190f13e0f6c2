"""What a study holds, summarised for a person: counts, the best trial, its test score. No torch:
`hpo studies`, `hpo best` and `hpo trials` stay fast."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial

SPEC_ATTR = "spec"  # user attr: the spec, readable by any Optuna tool
TEST_ATTR = "test"  # user attr: the best model's one test-split score


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:
        return None


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
