"""The search space: spec entries -> `trial.suggest_*` calls -> resolved `Params`.

Parameters are visited in catalogue order, so a conditional one (momentum, betas, step_gamma)
is suggested only after the value it depends on is known, and not at all when it does not apply:
Optuna then never records, samples or plots a parameter that had no effect.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from hpo.spec import params as P
from hpo.spec.schema import ParamSpec, StudySpec

if TYPE_CHECKING:
    import optuna


def _suggest_one(trial: optuna.Trial, p: ParamSpec) -> Any:
    if p.kind == "categorical":
        return trial.suggest_categorical(p.name, list(p.choices))
    if p.kind == "int":
        assert p.low is not None and p.high is not None
        return trial.suggest_int(p.name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
    assert p.low is not None and p.high is not None
    return trial.suggest_float(p.name, float(p.low), float(p.high), step=p.step, log=p.log)


def sample(trial: optuna.Trial, spec: StudySpec) -> dict[str, Any]:
    """Every value of this trial, by name: sampled where tuned and applicable, else fixed (and,
    for hpo's own loop, the catalogue's defaults). What `hpo.Trial.params` holds."""
    return _resolve(spec, lambda p: _suggest_one(trial, p))


def suggest(trial: optuna.Trial, spec: StudySpec) -> P.Params:
    """Ask the trial for every tuned parameter that applies; fill the rest from spec/defaults."""
    return P.Params.from_mapping(sample(trial, spec))


def resolve(spec: StudySpec, sampled: Mapping[str, Any]) -> P.Params:
    """Rebuild a trial's Params from its recorded `params` (e.g. to reload the best model)."""
    return P.Params.from_mapping(resolve_values(spec, sampled))


def resolve_values(spec: StudySpec, sampled: Mapping[str, Any]) -> dict[str, Any]:
    """Rebuild every value of a trial from its recorded `params`."""
    return _resolve(spec, lambda p: sampled[p.name] if p.name in sampled else P.DEFAULTS.get(p.name))


def _resolve(spec: StudySpec, pick: Callable[[ParamSpec], Any]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if spec.train is None:  # hpo's own loop: every catalogue value, in catalogue order
        by_name = {p.name: p for p in spec.space}
        for info in P.CATALOGUE:
            p = by_name.get(info.name)
            if p is None or not P.applies(info, values) or not p.applies(values):
                values[info.name] = P.DEFAULTS[info.name]
            elif p.kind == "fixed":
                values[info.name] = p.value
            else:
                values[info.name] = pick(p)
    for p in spec.space:  # the user's own parameters, in the file's order
        if p.name in values or not p.applies(values):
            continue
        values[p.name] = p.value if p.kind == "fixed" else pick(p)
    return values
