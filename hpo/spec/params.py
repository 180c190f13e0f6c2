"""The catalogue of tunable hyperparameters and the resolved `Params` of one trial.

One table says, for every parameter, its kind, default, legal values and when it applies. The spec
validator, the sampler glue (space.py) and the model/optimizer builders all read this table, so a
new parameter is added in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

OPTIMIZERS = (
    "sgd",
    "momentum",
    "nesterov",
    "rmsprop",
    "adagrad",
    "adam",
    "adamw",
    "schedulefree_adamw",
)
SGD_FAMILY = ("momentum", "nesterov")  # plain "sgd" has no momentum by definition
ADAM_FAMILY = ("adam", "adamw", "schedulefree_adamw")
SCHEDULERS = ("none", "step", "cosine", "onecycle", "plateau")
NORMS = ("none", "batch", "layer")
INITS = ("default", "kaiming", "xavier")
SCALINGS = ("standard", "minmax", "none")
POOLINGS = ("max", "avg")


@dataclass(frozen=True)
class Params:
    """Every hyperparameter of one trial, resolved: sampled, fixed in the spec, or default."""

    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.0
    depth: int = 2
    width: int = 128
    dropout: float = 0.0
    optimizer: str = "adam"
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.999
    scheduler: str = "none"
    step_gamma: float = 0.3
    norm: str = "none"
    residual: bool = False
    init: str = "default"
    scaling: str = "standard"
    kernel_size: int = 3
    pooling: str = "max"

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Params:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _positive(v: float) -> str | None:
    return None if v > 0 else "must be > 0"


def _non_negative(v: float) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _unit_open(v: float) -> str | None:
    return None if 0 <= v < 1 else "must be in [0, 1)"


def _at_least_one(v: float) -> str | None:
    return None if v >= 1 else "must be >= 1"


def _odd_kernel(v: float) -> str | None:
    return None if v >= 1 and int(v) % 2 == 1 else "must be an odd number >= 1"


@dataclass(frozen=True)
class ParamInfo:
    """How one hyperparameter may be specified and when it is sampled at all."""

    name: str
    kind: type  # float, int, str or bool
    doc: str
    check: Callable[[Any], str | None] | None = None
    choices: tuple[Any, ...] | None = None
    # Sampled only when another parameter takes one of these values, e.g. momentum for SGD.
    when: tuple[str, tuple[Any, ...]] | None = None
    # Ceiling that protects the host: a width of 10^7 would try to allocate terabytes.
    maximum: float | None = None


CATALOGUE: tuple[ParamInfo, ...] = (
    ParamInfo("optimizer", str, "update rule", choices=OPTIMIZERS),
    ParamInfo("lr", float, "learning rate", _positive, maximum=10.0),
    ParamInfo("weight_decay", float, "L2 penalty (decoupled for adamw)", _non_negative),
    ParamInfo(
        "momentum",
        float,
        "SGD momentum",
        _unit_open,
        when=("optimizer", SGD_FAMILY),
    ),
    ParamInfo(
        "beta1", float, "Adam beta1", _unit_open, when=("optimizer", ADAM_FAMILY)
    ),
    ParamInfo(
        "beta2", float, "Adam beta2", _unit_open, when=("optimizer", ADAM_FAMILY)
    ),
    ParamInfo("batch_size", int, "examples per step", _at_least_one, maximum=1 << 20),
    ParamInfo("scheduler", str, "learning-rate schedule", choices=SCHEDULERS),
    ParamInfo(
        "step_gamma",
        float,
        "LR factor at each step of the step schedule",
        lambda v: None if 0 < v < 1 else "must be in (0, 1)",
        when=("scheduler", ("step",)),
    ),
    ParamInfo("depth", int, "hidden layers (MLP) or conv blocks (CNN)", _at_least_one, maximum=64),
    ParamInfo("width", int, "units per layer (MLP) or channels (CNN)", _at_least_one, maximum=16384),
    ParamInfo("dropout", float, "dropout rate", _unit_open),
    ParamInfo("norm", str, "normalisation layer", choices=NORMS),
    ParamInfo("residual", bool, "skip connections between equal-width blocks", choices=(False, True)),
    ParamInfo("init", str, "weight initialisation", choices=INITS),
    ParamInfo("scaling", str, "input scaling, fitted on the train split", choices=SCALINGS),
    ParamInfo("kernel_size", int, "CNN kernel size", _odd_kernel, maximum=15),
    ParamInfo("pooling", str, "CNN pooling", choices=POOLINGS),
)

BY_NAME: dict[str, ParamInfo] = {p.name: p for p in CATALOGUE}
DEFAULTS: dict[str, Any] = Params().to_dict()

# hpo's own belief about these parameters, for a study that gives none (hpo.search.priors): a sound
# configuration for a small network, the first value of each that the study's range or choices
# allow. It is the first trial of a study, and weakly ("low" confidence) steers the next few.
BUILTIN_PRIORS: dict[str, tuple[Any, ...]] = {
    "optimizer": ("adamw", "adam"),
    "lr": (1e-3,),
    "weight_decay": (1e-4,),
    "batch_size": (64, 32, 128),
    "depth": (2,),
    "width": (128, 256, 64),
    "dropout": (0.1, 0.0),
    "scheduler": ("cosine", "none"),
    "momentum": (0.9,),
    "beta1": (0.9,),
    "beta2": (0.999,),
}


def applies(info: ParamInfo, resolved: Mapping[str, Any]) -> bool:
    """Whether `info` is used, given the values already chosen for earlier parameters."""
    return info.when is None or resolved[info.when[0]] in info.when[1]


def check_value(info: ParamInfo, value: Any) -> str | None:
    """Why `value` is not legal for `info`, or None when it is."""
    if info.kind is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if info.kind is str:
        if not isinstance(value, str):
            return f"must be one of {', '.join(map(str, info.choices or ()))}"
    elif info.kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            return "must be an integer"
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        return "must be a number"
    if info.choices is not None and value not in info.choices:
        return f"unknown value {value!r}; expected one of {', '.join(map(str, info.choices))}"
    if info.check is not None and (problem := info.check(value)):
        return problem
    if info.maximum is not None and value > info.maximum:
        return f"must be <= {info.maximum:g}"
    return None
