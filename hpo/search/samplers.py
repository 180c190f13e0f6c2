"""The study's sampler and pruner as hpo runs them: Optuna's, built from the spec (hpo.spec.strategy),
each trial's proposals seeded from the study seed and its place among the sampled trials, and
steered by the priors."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo._private import reseed_sampler
from hpo.search.draws import sampled_index, trial_sampler_seed
from hpo.storage.ledger import History, ledger_of
from hpo.search.priors import PriorGuided, study_priors
from hpo.spec.strategy import build_pruner, build_sampler, grid_size, uses_priors

if TYPE_CHECKING:
    from hpo.spec.schema import StudySpec


def make_sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    """The spec's sampler (hpo.spec.strategy), steered by its priors (hpo.search.priors) and
    drawing each trial's proposals from the study seed and the trial's number (TrialSeeded)."""
    sampler = build_sampler(spec)
    if uses_priors(spec) and (priors := study_priors(spec)):
        sampler = PriorGuided(sampler, priors, spec.seed)
    name = spec.sampler.name
    return TrialSeeded(sampler, spec.seed, spec.direction if spec.multi_objective and name == "tpe" else None,
                       bounded=name == "tpe")


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    return build_pruner(spec)


class TrialSeeded(optuna.samplers.BaseSampler):
    """An Optuna sampler whose random streams are reseeded for every trial from the study seed and
    the trial's place among the sampled trials (sampled_index). Seeded once per process, samplers in
    parallel workers or in a resumed run replay the same draws (optuna#3056, #4412) and propose
    configurations already tried; seeded per trial, what a trial gets depends only on the seed, its
    place and the trials before it, so a study stopped and resumed (its interrupted trial retried)
    proposes what an uninterrupted one would.

    `direction` is for TPE with several objectives, when hpo prunes: TPE ranks pruned trials by
    their last intermediate value in `study.direction`, which a multi-objective study refuses
    (Optuna expects no pruned trials there, optuna#3450). hpo's pruned trials were stopped on the
    `prune_on` metric, so that metric's direction ranks them.

    `bounded` (TPE): the inner sampler reads a bounded history of the study (hpo.storage.ledger), so a
    trial's sampling costs the same at 100,000 trials as at 1,000."""

    def __init__(self, inner: optuna.samplers.BaseSampler, seed: int, direction: str | None = None,
                 bounded: bool = False) -> None:
        self.inner, self.seed, self.direction, self.bounded = inner, seed, direction, bounded
        self._history: tuple[int, list[FrozenTrial]] | None = None  # a trial's number, the trials it samples from

    def _view(self, study: optuna.Study, trial: FrozenTrial | None = None) -> Any:
        """The study as the inner sampler reads it: with one objective, the trials of the ledger's
        bounded history (hpo.storage.ledger), read once as the trial starts; TPE only (a grid must
        see every trial it visited)."""
        if self.direction is not None:
            from hpo.runtime.pruning import DirectionView

            return DirectionView(study, self.direction)
        if trial is None or not self.bounded:
            return study
        if self._history is None or self._history[0] != trial.number:
            self._history = (trial.number, ledger_of(study).read().history())
        return History(study, self._history[1])

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        return self.inner.infer_relative_search_space(self._view(study, trial), trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, Any]) -> dict[str, Any]:
        return self.inner.sample_relative(self._view(study, trial), trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: Any) -> Any:
        return self.inner.sample_independent(self._view(study, trial), trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        reseed_sampler(self.inner, trial_sampler_seed(self.seed, sampled_index(study, trial)))
        self._history = None
        self.inner.before_trial(self._view(study, trial), trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        # Optuna's grid sampler stops the study once every point was tried, which Optuna allows
        # only inside study.optimize; hpo ends trials with study.tell, and its budget already stops
        # a grid at its size (effective_n_trials).
        self.inner.after_trial(cast(optuna.Study, _NoStop(self._view(study))), trial, state, values)
        self._history = None

    def reseed_rng(self) -> None:
        """Optuna asks for this before threads share a sampler; each trial is reseeded anyway."""


class _NoStop:
    """A study whose `stop()` does nothing; everything else is the study's own."""

    def __init__(self, study: Any) -> None:
        self._study = study

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def stop(self) -> None:
        pass


def effective_n_trials(spec: StudySpec) -> int:
    """The study's total: a grid has no more distinct trials than points."""
    if spec.sampler.name == "grid":
        return min(spec.budget.total, grid_size(spec))
    return spec.budget.total
