"""Samplers and pruners by name: the spec's choice checked against Optuna's own classes (an
option each takes, of the type its constructor declares) and built. Here, in the spec package,
so that a study file's sampler and pruner are refused before anything runs, without the spec
package importing the search package (hpo.search.samplers wraps what is built here).

The one module of the spec package that imports optuna (when a spec is checked or a sampler
built, not when it is imported)."""

from __future__ import annotations

import difflib
import inspect
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hpo.errors import SpecError

if TYPE_CHECKING:
    import optuna

    from hpo.spec.schema import StudySpec


def _sampler_classes() -> dict[str, Callable[..., optuna.samplers.BaseSampler]]:
    import optuna

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
NO_PRIORS = ("grid", "qmc")  # a grid enumerates its points and QMC its sequence: no belief reorders them
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


def build_sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    """The spec's Optuna sampler, seeded with the study seed (hpo.search.samplers reseeds it per
    trial and adds the priors); `priors:` is hpo's own option, taken out here."""
    name, kwargs = spec.sampler.name, dict(spec.sampler.kwargs)
    kwargs.pop("priors", None)
    fixed: dict[str, Any] = {"seed": spec.seed}
    if name == "grid":
        fixed["search_space"] = grid_space(spec)
    sampler: optuna.samplers.BaseSampler = _construct(_sampler_classes()[name], "sampler", kwargs, fixed)
    return sampler


def uses_priors(spec: StudySpec) -> bool:
    """`sampler: {priors: false}` turns them off; grid and QMC samplers take none."""
    use = spec.sampler.kwargs.get("priors", True)
    if not isinstance(use, bool):
        raise SpecError(f"sampler.priors: must be true or false, not {use!r}")
    return use and spec.sampler.name not in NO_PRIORS


def build_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    pruner: optuna.pruners.BasePruner = _make_pruner(spec)
    return pruner


def _make_pruner(spec: StudySpec) -> Any:
    import optuna

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
    build_sampler(spec)
    uses_priors(spec)
    build_pruner(spec)


