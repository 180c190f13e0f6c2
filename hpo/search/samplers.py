"""Samplers and pruners by name, built from the spec with Optuna's own classes."""

from __future__ import annotations

import difflib
import inspect
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo._private import reseed_sampler
from hpo.errors import SpecError

if TYPE_CHECKING:
    from hpo.spec.schema import StudySpec


def _sampler_classes() -> dict[str, Callable[..., optuna.samplers.BaseSampler]]:
    s = optuna.samplers
    return {
        "tpe": s.TPESampler,
        "random": s.RandomSampler,
        "cmaes": s.CmaEsSampler,
        "gp": s.GPSampler,
        "qmc": s.QMCSampler,
        "grid": s.GridSampler,
        "nsga2": s.NSGAIISampler,
        "nsga3": s.NSGAIIISampler,
    }


# Samplers that handle several objectives, and those whose search uses constraints (the others
# still mark an infeasible trial, which is then never best: Optuna's best_trials skips it).
MULTI_OBJECTIVE = ("tpe", "nsga2", "nsga3", "gp", "random", "qmc", "grid")
USE_CONSTRAINTS = ("tpe", "nsga2", "nsga3", "gp")


def grid_space(spec: StudySpec) -> dict[str, list[Any]]:
    """The grid of every tuned parameter; continuous ranges have no grid."""
    grid: dict[str, list[Any]] = {}
    for p in spec.space:
        if not p.tuned:
            continue
        values = p.possible_values()
        if values is None:
            raise SpecError(f"space.{p.name}: grid search needs choices or a step for this range")
        grid[p.name] = list(values)
    return grid


def grid_size(spec: StudySpec) -> int:
    n = 1
    for values in grid_space(spec).values():
        n *= len(values)
    return n


_KINDS = {"int": int, "float": float, "bool": bool, "str": str, "None": type(None)}


def _check_type(path: str, annotation: Any, value: Any) -> None:
    """Optuna stores most options without checking them; a wrong type would only fail later,
    inside a running study. Check against the constructor's annotation now."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    names = [part.strip().strip("'\"") for part in str(text).split("|")]
    kinds = [_KINDS[n] for n in names if n in _KINDS]
    if not kinds or kinds == [type(None)]:  # a callable or an object: not expressible in YAML
        raise SpecError(f"{path}: cannot be set from a study file")
    if isinstance(value, bool) and bool not in kinds:
        ok = False
    elif isinstance(value, int) and not isinstance(value, bool):
        ok = int in kinds or float in kinds
    else:
        ok = any(isinstance(value, k) for k in kinds)  # a bool here has bool among the kinds
    if not ok:
        wanted = " or ".join(n for n in names if n in _KINDS).replace("None", "null")
        raise SpecError(f"{path}: must be {wanted}, not {value!r}")


def _construct(
    cls: Callable[..., Any], path: str, kwargs: dict[str, Any], fixed: dict[str, Any]
) -> Any:
    params = inspect.signature(cls).parameters
    accepted = [k for k in params if k not in ("self", "args", "kwargs")]
    for key, value in kwargs.items():
        if key in fixed:
            raise SpecError(f"{path}.{key}: is set by hpo (seed comes from the top-level seed)")
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise SpecError(f"{path}.{key}: unknown option{hint}")
        _check_type(f"{path}.{key}", params[key].annotation, value)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental-feature warnings are not the user's fault
            return cls(**fixed, **kwargs)
    except (TypeError, ValueError) as e:
        raise SpecError(f"{path}: {e}") from None
    except ImportError as e:
        raise SpecError(f"{path}: needs a package that is not installed ({e})") from None


def make_sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    """The spec's sampler, drawing each trial's proposals from the study seed and the trial's
    number (TrialSeeded)."""
    name, kwargs = spec.sampler.name, dict(spec.sampler.kwargs)
    fixed: dict[str, Any] = {"seed": spec.seed}
    if name == "grid":
        fixed["search_space"] = grid_space(spec)
    sampler: optuna.samplers.BaseSampler = _construct(_sampler_classes()[name], "sampler", kwargs, fixed)
    return TrialSeeded(sampler, spec.seed, spec.direction if spec.multi_objective and name == "tpe" else None)


def trial_sampler_seed(seed: int, index: int) -> list[int]:
    """The entropy of the proposals of a study's `index`-th sampled trial."""
    return [int(x) for x in np.random.SeedSequence([seed, index]).generate_state(2)]


def sampled_index(study: optuna.Study, trial: FrozenTrial) -> int:
    """How many trials before `trial` drew from the sampler: its place among the sampled ones.
    Unique across every process of a study, as trial numbers are (worker indices and process
    start-ups are not), and unchanged by the retries and queued configurations an interruption or
    the user adds, which carry their parameters with them (hpo marks each: one read of the study,
    not of every trial)."""
    from hpo.storage.retry import queued_before

    return trial.number - queued_before(study, trial.number)


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
    `prune_on` metric, so that metric's direction ranks them."""

    def __init__(self, inner: optuna.samplers.BaseSampler, seed: int, direction: str | None = None) -> None:
        self.inner, self.seed, self.direction = inner, seed, direction

    def _view(self, study: optuna.Study) -> Any:
        if self.direction is None:
            return study
        from hpo.runtime.pruning import DirectionView

        return DirectionView(study, self.direction)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        return self.inner.infer_relative_search_space(self._view(study), trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, Any]) -> dict[str, Any]:
        return self.inner.sample_relative(self._view(study), trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: Any) -> Any:
        return self.inner.sample_independent(self._view(study), trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        reseed_sampler(self.inner, trial_sampler_seed(self.seed, sampled_index(study, trial)))
        self.inner.before_trial(self._view(study), trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        # Optuna's grid sampler stops the study once every point was tried, which Optuna allows
        # only inside study.optimize; hpo ends trials with study.tell, and its budget already stops
        # a grid at its size (effective_n_trials).
        self.inner.after_trial(cast(optuna.Study, _NoStop(self._view(study))), trial, state, values)

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


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    pruner: optuna.pruners.BasePruner = _make_pruner(spec)
    return pruner


def _make_pruner(spec: StudySpec) -> Any:
    name, kwargs = spec.pruner.name, dict(spec.pruner.kwargs)
    p = optuna.pruners
    if name == "none":
        return _construct(p.NopPruner, "pruner", kwargs, {})
    if name == "median":
        return _construct(p.MedianPruner, "pruner", kwargs, {})
    if name == "percentile":
        if "percentile" not in kwargs:
            raise SpecError("pruner.percentile: is required for the percentile pruner")
        return _construct(p.PercentilePruner, "pruner", kwargs, {})
    if name == "hyperband":
        kwargs.setdefault("max_resource", spec.budget.epochs)
        return _construct(p.HyperbandPruner, "pruner", kwargs, {})
    if name == "successive_halving":
        return _construct(p.SuccessiveHalvingPruner, "pruner", kwargs, {})
    if name == "patient":
        # Patience on its own never prunes a slow starter; wrap the median rule, as Optuna's docs do.
        outer: dict[str, Any] = {k: kwargs.pop(k) for k in ("patience", "min_delta") if k in kwargs}
        outer.setdefault("patience", 3)
        inner = _construct(p.MedianPruner, "pruner", kwargs, {})
        return _construct(p.PatientPruner, "pruner", outer, {"wrapped_pruner": inner})
    raise SpecError(f"pruner.name: unknown pruner {name!r}")  # spec validation makes this unreachable


def check_strategy(spec: StudySpec) -> None:
    """Build both once so a bad option fails at validation, not after the study exists."""
    if spec.multi_objective and spec.sampler.name not in MULTI_OBJECTIVE:
        raise SpecError(f"sampler.name: {spec.sampler.name} optimizes one objective; with several use one of: "
                        f"{', '.join(MULTI_OBJECTIVE)}")
    if spec.constraints and spec.sampler.name == "cmaes":
        raise SpecError(f"sampler.name: cmaes does not use constraints; use {', '.join(USE_CONSTRAINTS[:-1])} or "
                        f"{USE_CONSTRAINTS[-1]}")
    if spec.multi_objective and spec.pruner.name == "hyperband":
        raise SpecError("pruner.name: hyperband cannot prune a study with several objectives (its brackets are "
                        "single-objective studies); use successive_halving, median or percentile")
    make_sampler(spec)
    make_pruner(spec)


def effective_n_trials(spec: StudySpec) -> int:
    """The study's total: a grid has no more distinct trials than points."""
    if spec.sampler.name == "grid":
        return min(spec.budget.total, grid_size(spec))
    return spec.budget.total
