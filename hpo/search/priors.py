"""Priors: a belief per parameter steers the first trials and fades as results come in.

After piBO and PriorBand (NePS): the first trial of a study takes every prior's value (the user's,
or hpo's built-in belief about its own parameters: a sound configuration, not a random draw). Each
later trial draws a parameter from a distribution around its prior with a probability that falls
with the trials already proposed, w / (w + k) (w: 2, 5 or 12 for low, medium or high confidence),
and from the study's sampler otherwise, so the sampler takes over as it learns. A prior that is
wrong is found out: once at least three trials led by priors and three others have finished and
the prior-led ones rank worse, the probability falls to a quarter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import FrozenTrial, TrialState

from hpo._private import storage_of, trial_id
from hpo.search.draws import sampled_index, trial_sampler_seed
from hpo.spec.params import BUILTIN_PRIORS
from hpo.spec.schema import ParamSpec, Prior, StudySpec

WEIGHT = {"low": 2.0, "medium": 5.0, "high": 12.0}  # w in the probability w / (w + k) of drawing from the prior
SPREAD = {"low": 0.25, "medium": 0.12, "high": 0.05}  # standard deviation, as a share of the (log) range
KEEP = {"low": 0.5, "medium": 0.7, "high": 0.9}  # a categorical prior: the chance of its choice
WRONG = 0.25  # the probability's factor once the prior-led trials rank worse than the others
PRIOR_ATTR = "hpo:prior"  # trial system attr: some parameter of this trial was drawn from its prior
_STREAM = 0x9E1  # the priors' own random stream of a trial, apart from the sampler's


def study_priors(spec: StudySpec) -> dict[str, Prior]:
    """Every tuned parameter's prior: the spec's own, else hpo's built-in belief when the
    parameter's range or choices allow it (none where the spec says `prior: null`)."""
    out: dict[str, Prior] = {}
    for p in spec.space:
        if not p.tuned or p.no_prior:
            continue
        if p.prior is not None:
            out[p.name] = p.prior
            continue
        value = next((v for v in BUILTIN_PRIORS.get(p.name, ()) if _fits(p, v)), None)
        if value is not None:
            out[p.name] = Prior(value, "low")
    return out


def _fits(p: ParamSpec, value: Any) -> bool:
    if p.kind == "categorical":
        return value in p.choices
    assert p.low is not None and p.high is not None
    return (p.kind != "int" or isinstance(value, int)) and p.low <= value <= p.high


@dataclass
class _Plan:
    """Which parameters of one trial come from their priors, and the random stream they draw from."""

    names: dict[str, str]  # name -> "value" (the prior's own) or "draw" (around it)
    rng: np.random.Generator
    marked: bool = False


class PriorGuided(optuna.samplers.BaseSampler):
    """Wraps the study's sampler: a parameter planned from its prior is drawn here, the others by
    the sampler (its relative proposals lose the parameters drawn here)."""

    def __init__(self, inner: optuna.samplers.BaseSampler, priors: Mapping[str, Prior], seed: int) -> None:
        self.inner, self.priors, self.seed = inner, dict(priors), seed
        self.plans: dict[int, _Plan] = {}

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        k = sampled_index(study, trial)
        rng = np.random.default_rng([*trial_sampler_seed(self.seed, k), _STREAM])
        damp: float | None = None if k else 1.0  # read from the study only when a draw could fall under it
        names: dict[str, str] = {}
        for name, prior in self.priors.items():
            w = WEIGHT[prior.confidence]
            if k == 0:
                names[name] = "value"
                continue
            u = rng.random()
            if u < w / (w + k) and damp is None:
                damp = _damping(study)
            if damp is not None and u < damp * w / (w + k):
                names[name] = "draw"
        self.plans[trial.number] = _Plan(names, rng)
        self.inner.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        plan = self.plans.get(trial.number)
        mine = set(plan.names) if plan is not None else set()
        return {k: v for k, v in self.inner.sample_relative(study, trial, search_space).items() if k not in mine}

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        plan = self.plans.get(trial.number)
        if plan is None or param_name not in plan.names:
            return self.inner.sample_independent(study, trial, param_name, param_distribution)
        if not plan.marked:  # what tells prior-led trials from the others, for any worker's _damping
            storage_of(study).set_trial_system_attr(trial_id(trial), PRIOR_ATTR, True)
            plan.marked = True
        prior = self.priors[param_name]
        if plan.names[param_name] == "value":
            return prior.value
        return draw(prior, param_distribution, plan.rng)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        self.plans.pop(trial.number, None)
        self.inner.after_trial(study, trial, state, values)


def draw(prior: Prior, dist: BaseDistribution, rng: np.random.Generator) -> Any:
    """One value around `prior` within `dist`: a normal in the (log) range for numbers, the prior's
    choice or another for a categorical."""
    if isinstance(dist, CategoricalDistribution):
        others = [c for c in dist.choices if c != prior.value]
        if not others or rng.random() < KEEP[prior.confidence]:
            return prior.value
        return others[int(rng.integers(len(others)))]
    assert isinstance(dist, (FloatDistribution, IntDistribution))
    log = dist.log
    to = math.log if log else float
    low, high, centre = to(dist.low), to(dist.high), to(prior.value)
    sd = SPREAD[prior.confidence] * (high - low)
    x = centre
    for _ in range(20):  # a draw outside the range is drawn again (a truncated normal)
        x = float(rng.normal(centre, sd))
        if low <= x <= high:
            break
    x = min(max(x, low), high)
    value = math.exp(x) if log else x
    if dist.step is not None:
        value = dist.low + round((value - dist.low) / dist.step) * dist.step
    value = min(max(value, dist.low), dist.high)
    return int(round(value)) if isinstance(dist, IntDistribution) else float(value)


def _damping(study: optuna.Study) -> float:
    """WRONG when the finished prior-led trials rank worse than the others (pruned ones last),
    1.0 otherwise or until there are three of each."""
    finished = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))]
    led = [t for t in finished if t.system_attrs.get(PRIOR_ATTR)]
    if len(led) < 3 or len(finished) - len(led) < 3:
        return 1.0
    sign = 1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else -1.0

    def score(t: FrozenTrial) -> float:
        return sign * t.values[0] if t.state == TrialState.COMPLETE and t.values else -math.inf

    order = sorted(finished, key=score, reverse=True)  # best first
    rank = {t.number: i for i, t in enumerate(order)}
    mean_led = np.mean([rank[t.number] for t in led])
    mean_rest = np.mean([rank[t.number] for t in finished if not t.system_attrs.get(PRIOR_ATTR)])
    return WRONG if mean_led > mean_rest else 1.0
