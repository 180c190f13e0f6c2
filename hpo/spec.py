"""Study files: YAML -> frozen, validated dataclasses.

Every check a spec needs happens here, before any storage is touched, and every error names the
file and the key path (`studies/x.yaml: space.lr.low: must be > 0 when log is true`) so a user can
fix it without reading code.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from hpo import params as P
from hpo.errors import SpecError

MAX_SPEC_BYTES = 1 << 20  # a study file is a page of YAML; anything larger is a mistake or an attack

METRICS: dict[str, tuple[str, str]] = {
    # metric -> (direction it is optimised in, task it belongs to)
    "val_accuracy": ("maximize", "classification"),
    "val_loss": ("minimize", "classification"),
    "val_mse": ("minimize", "regression"),
}
MODELS = ("mlp", "cnn")
SAMPLERS = ("tpe", "random", "cmaes", "gp", "qmc", "grid")
PRUNERS = ("median", "percentile", "hyperband", "successive_halving", "patient", "none")
# dataset -> (task, or None when data.task says; options it accepts; options it requires)
DATASETS: dict[str, tuple[str | None, tuple[str, ...], tuple[str, ...]]] = {
    "digits": ("classification", ("cv_folds",), ()),
    "synthetic": ("classification", ("n_samples", "n_features", "n_classes", "n_informative", "cv_folds"), ()),
    "diabetes": ("regression", ("cv_folds",), ()),
    "fashion_mnist": ("classification", ("path", "n_train", "cv_folds"), ()),
    "csv": (None, ("path", "label", "task", "categorical", "cv_folds"), ("path", "label")),
    "npz": (None, ("path", "task", "cv_folds"), ("path",)),
}
OWN_TEST_SPLIT = ("fashion_mnist",)  # these bring a test split; the spec splits only train/val
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


@dataclass(frozen=True)
class ParamSpec:
    """One entry of `space`: a fixed value, a numeric range, or a list of choices."""

    name: str
    kind: Literal["fixed", "float", "int", "categorical"]
    value: Any = None
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    @property
    def tuned(self) -> bool:
        return self.kind != "fixed"

    def possible_values(self) -> tuple[Any, ...] | None:
        """The finite set this parameter can take, or None for a continuous range."""
        if self.kind == "fixed":
            return (self.value,)
        if self.kind == "categorical":
            return self.choices
        if self.step is not None and self.low is not None and self.high is not None:
            n = int(round((self.high - self.low) / self.step))
            values = [self.low + i * self.step for i in range(n + 1)]
            return tuple(int(v) if self.kind == "int" else float(v) for v in values)
        if self.kind == "int" and self.low is not None and self.high is not None and not self.log:
            return tuple(range(int(self.low), int(self.high) + 1))
        return None

    def to_dict(self) -> Any:
        if self.kind == "fixed":
            return self.value
        if self.kind == "categorical":
            return {"type": "categorical", "choices": list(self.choices)}
        out: dict[str, Any] = {"type": self.kind, "low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out


@dataclass(frozen=True)
class SplitSpec:
    train: float = 0.7
    val: float = 0.15
    test: float = 0.15


@dataclass(frozen=True)
class DataSpec:
    dataset: str
    split: SplitSpec = field(default_factory=SplitSpec)
    n_samples: int = 2000
    n_features: int = 20
    n_classes: int = 4
    n_informative: int = 10
    path: str | None = None  # csv/npz file, or the Fashion-MNIST folder (absolute once loaded)
    label: str | None = None  # csv: the label column
    task: str = "classification"  # csv/npz: classification or regression
    categorical: str = "onehot"  # csv: text columns are one-hot encoded, or refused
    cv_folds: int | None = None  # k-fold cross-validation over train + val
    n_train: int | None = None  # fashion_mnist: a stratified subsample of the training set

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dataset": self.dataset}
        if self.dataset in OWN_TEST_SPLIT:
            out["split"] = {"train": self.split.train, "val": self.split.val}
        else:
            out["split"] = {"train": self.split.train, "val": self.split.val, "test": self.split.test}
        for key in DATASETS[self.dataset][1]:
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


@dataclass(frozen=True)
class SamplerSpec:
    name: str = "tpe"
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PrunerSpec:
    name: str = "median"
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BudgetSpec:
    n_trials: int = 20
    epochs: int = 10
    timeout: float | None = None  # seconds for the whole study run
    trial_timeout: float | None = None  # seconds for one trial


@dataclass(frozen=True)
class ExecutionSpec:
    """How trials run, not what they search: one at a time, or K fused into one batched model."""

    mode: str = "sequential"  # or "fused"
    group_size: int = 8


@dataclass(frozen=True)
class StudySpec:
    name: str
    metric: str
    direction: str
    data: DataSpec
    space: tuple[ParamSpec, ...]
    seed: int = 0
    model: str = "mlp"
    description: str = ""
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    pruner: PrunerSpec = field(default_factory=PrunerSpec)
    budget: BudgetSpec = field(default_factory=BudgetSpec)
    execution: ExecutionSpec = field(default_factory=ExecutionSpec)
    source: str = field(default="<spec>", compare=False)

    @property
    def task(self) -> str:
        return METRICS[self.metric][1]

    def param(self, name: str) -> ParamSpec | None:
        return next((p for p in self.space if p.name == name), None)

    def with_budget(self, **changes: Any) -> StudySpec:
        """A copy with budget fields replaced (CLI overrides such as --n-trials)."""
        values = {k: getattr(self.budget, k) for k in BudgetSpec.__dataclass_fields__}
        values.update({k: v for k, v in changes.items() if v is not None})
        return replace(self, budget=BudgetSpec(**values))

    def fused(self, group_size: int) -> StudySpec:
        """A copy that runs fused groups of `group_size` (the CLI's --fuse K), checked like the file."""
        spec = replace(self, execution=ExecutionSpec("fused", group_size))
        _Validator(self.source).check_fusable(spec, "--fuse")
        return spec

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form, stored in the study so a worker needs no file."""
        return {
            "name": self.name,
            "description": self.description,
            "metric": self.metric,
            "direction": self.direction,
            "seed": self.seed,
            "model": self.model,
            "data": self.data.to_dict(),
            "space": {p.name: p.to_dict() for p in self.space},
            "sampler": {"name": self.sampler.name, **self.sampler.kwargs},
            "pruner": {"name": self.pruner.name, **self.pruner.kwargs},
            "budget": {
                "n_trials": self.budget.n_trials,
                "epochs": self.budget.epochs,
                "timeout": self.budget.timeout,
                "trial_timeout": self.budget.trial_timeout,
            },
            "execution": {"mode": self.execution.mode, "group_size": self.execution.group_size},
        }

    def search_definition(self) -> dict[str, Any]:
        """What makes two specs the same study: everything but the budget and the prose."""
        d = self.to_dict()
        for key in ("budget", "description", "execution"):
            d.pop(key)
        return d


# --------------------------------------------------------------------------------------------
# YAML reading


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-5` as a float and refuses duplicate keys.

    PyYAML follows YAML 1.1, where a float needs a dot, so `lr: 1e-5` would silently become a
    string; a duplicated key would silently keep the last value.
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
        try:
            duplicate = key in seen
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "mapping keys must be plain values", key_node.start_mark
            ) from None
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "YAML"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(f"{source}: {where}: {problem}") from None
    except RecursionError:
        raise SpecError(f"{source}: the document is nested too deeply") from None


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a study file."""
    path = Path(path)
    source = str(path)
    try:
        if path.is_dir():
            raise SpecError(f"{source}: is a directory, not a study file")
        size = path.stat().st_size
        if size > MAX_SPEC_BYTES:
            raise SpecError(f"{source}: file is {size} bytes; a study file must be under 1 MiB")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SpecError(f"{source}: no such file") from None
    except PermissionError:
        raise SpecError(f"{source}: permission denied") from None
    if b"\0" in raw:
        raise SpecError(f"{source}: is a binary file, not YAML")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"{source}: is not UTF-8 text (bad byte at offset {e.start})") from None
    return spec_from_mapping(parse_yaml(text, source), source)


def spec_from_mapping(doc: Any, source: str) -> StudySpec:
    """Validate an already-parsed document (a file, or a spec stored in a study)."""
    return _Validator(source).study(doc)


# --------------------------------------------------------------------------------------------
# Validation


def _did_you_mean(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, bool, int, float))


class _Validator:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, message: str) -> SpecError:
        text = f"{self.source}: {path}: {message}" if path else f"{self.source}: {message}"
        # Keys come from the user's file: escape control characters so the error stays one line.
        return SpecError(text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text)

    def mapping(
        self, value: Any, path: str, allowed: Iterable[str], required: Iterable[str] = ()
    ) -> dict[str, Any]:
        what = path or "the document"
        if value is None and not path:
            raise self.fail("", "is empty; a study file needs at least name, data and space")
        if not isinstance(value, dict):
            raise self.fail(path, f"{what} must be a mapping (key: value), not {_kind(value)}")
        allowed = list(allowed)
        for key in value:
            if not isinstance(key, str):
                raise self.fail(path, f"keys must be text, not {_kind(key)} {key!r}")
            if key not in allowed:
                where = f"{path}.{key}" if path else key
                raise self.fail(where, f"unknown key{_did_you_mean(key, allowed)}")
        for key in required:
            if key not in value:
                where = f"{path}.{key}" if path else key
                raise self.fail(where, "is required")
        return value

    def integer(self, value: Any, path: str, minimum: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(path, f"must be an integer, not {_kind(value)}")
        if minimum is not None and value < minimum:
            raise self.fail(path, f"must be >= {minimum}")
        return value

    def number(self, value: Any, path: str, positive: bool = False) -> float:
        if not _is_number(value):
            raise self.fail(path, f"must be a number, not {_kind(value)}")
        if positive and value <= 0:
            raise self.fail(path, "must be > 0")
        return float(value)

    def choice(self, value: Any, path: str, options: Iterable[str]) -> str:
        options = list(options)
        if not isinstance(value, str) or value not in options:
            hint = _did_you_mean(value, options) if isinstance(value, str) else ""
            raise self.fail(path, f"unknown value {value!r}{hint} (expected one of: {', '.join(options)})")
        return value

    # ---- sections ----------------------------------------------------------------------

    def study(self, doc: Any) -> StudySpec:
        top = self.mapping(
            doc,
            "",
            ["name", "description", "metric", "direction", "seed", "model", "data", "space",
             "sampler", "pruner", "budget", "execution"],
            required=["name", "data", "space"],
        )
        name = top["name"]
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise self.fail(
                "name",
                "must be 1-100 letters, digits, '_', '.' or '-', starting with a letter or digit",
            )
        description = top.get("description", "")
        if not isinstance(description, str):
            raise self.fail("description", "must be text")
        metric = self.choice(top.get("metric", "val_accuracy"), "metric", METRICS)
        natural, task = METRICS[metric]
        direction = top.get("direction", natural)
        self.choice(direction, "direction", ["maximize", "minimize"])
        if direction != natural:
            raise self.fail(
                "direction", f"{metric} can only be {natural}d; remove direction or set it to {natural}"
            )
        seed = self.integer(top.get("seed", 0), "seed", minimum=0)
        model = self.choice(top.get("model", "mlp"), "model", MODELS)
        data = self.data(top["data"])
        if data.task != task:
            hint = " (set data.task: regression)" if data.dataset in ("csv", "npz") and task == "regression" else ""
            raise self.fail(
                "metric", f"{metric} is a {task} metric but the {data.dataset} data is {data.task}{hint}"
            )
        space = self.space(top["space"])
        budget = self.budget(top.get("budget", {}))
        sampler = SamplerSpec(*self.named_kwargs(top.get("sampler", {"name": "tpe"}), "sampler", SAMPLERS))
        pruner = PrunerSpec(*self.named_kwargs(top.get("pruner", {"name": "median"}), "pruner", PRUNERS))
        execution = self.execution(top.get("execution", {}))
        spec = StudySpec(
            name=name, description=description, metric=metric, direction=direction, seed=seed,
            model=model, data=data, space=space, sampler=sampler, pruner=pruner, budget=budget,
            execution=execution, source=self.source,
        )
        self.cross_checks(spec)
        if execution.mode == "fused":
            self.check_fusable(spec, "execution.mode")
        return spec

    def execution(self, value: Any) -> ExecutionSpec:
        raw = self.mapping(value, "execution", ["mode", "group_size"])
        mode = self.choice(raw.get("mode", "sequential"), "execution.mode", ["sequential", "fused"])
        size = self.integer(raw.get("group_size", 8), "execution.group_size", minimum=2)
        if size > 1024:
            raise self.fail("execution.group_size", "must be <= 1024")
        return ExecutionSpec(mode, size)

    def check_fusable(self, spec: StudySpec, where: str) -> None:
        """Fusion stacks MLP weights and vectorises torch.optim's update rules; say what cannot."""
        if spec.model != "mlp":
            raise self.fail(where, "fused training supports model: mlp only")
        if spec.data.cv_folds:
            raise self.fail(where, "fused training does not combine with data.cv_folds")
        opt = spec.param("optimizer")
        names = opt.possible_values() if opt else (P.DEFAULTS["optimizer"],)
        if names and "schedulefree_adamw" in names:
            raise self.fail(where, "schedulefree_adamw cannot be fused; drop it from space.optimizer")

    def data(self, value: Any) -> DataSpec:
        raw = self.mapping(value, "data", ["dataset", "split", *_all_dataset_options()], ["dataset"])
        dataset = self.choice(raw["dataset"], "data.dataset", DATASETS)
        task, options, required = DATASETS[dataset]
        for key in raw:
            if key not in ("dataset", "split") and key not in options:
                raise self.fail(f"data.{key}", f"is not an option of dataset {dataset}")
        for key in required:
            if key not in raw:
                raise self.fail(f"data.{key}", f"is required for dataset {dataset}")
        split = self.split(raw.get("split"), dataset)
        kwargs: dict[str, Any] = {}
        for key in ("n_samples", "n_features", "n_classes", "n_informative", "cv_folds", "n_train"):
            if key in raw:
                kwargs[key] = self.integer(raw[key], f"data.{key}", minimum=2)
        if "n_features" in kwargs and "n_informative" not in kwargs:
            kwargs["n_informative"] = min(DataSpec.n_informative, kwargs["n_features"])
        if "path" in raw:
            if not isinstance(raw["path"], str) or not raw["path"].strip():
                raise self.fail("data.path", "must be a file path")
            kwargs["path"] = self.resolve_path(raw["path"])
        if "label" in raw:
            if not isinstance(raw["label"], str) or not raw["label"]:
                raise self.fail("data.label", "must be a column name")
            kwargs["label"] = raw["label"]
        kwargs["task"] = task or self.choice(raw.get("task", "classification"), "data.task",
                                             ["classification", "regression"])
        if "categorical" in raw:
            kwargs["categorical"] = self.choice(raw["categorical"], "data.categorical", ["onehot", "refuse"])
        if kwargs.get("cv_folds", 0) > 20:
            raise self.fail("data.cv_folds", "must be <= 20")
        spec = DataSpec(dataset=dataset, split=split, **kwargs)
        if dataset == "synthetic":
            if spec.n_informative > spec.n_features:
                raise self.fail("data.n_informative", f"must be <= n_features ({spec.n_features})")
            if spec.n_classes > 2**spec.n_informative:
                raise self.fail("data.n_classes", "too many classes for n_informative features")
            if spec.n_samples > 5_000_000:
                raise self.fail("data.n_samples", "must be <= 5000000")
            smallest = min(split.val, split.test) * spec.n_samples
            if smallest < spec.n_classes:
                raise self.fail("data.n_samples", "too few samples for a stratified split of every class")
        return spec

    def split(self, value: Any, dataset: str) -> SplitSpec:
        if value is None:
            return SplitSpec(0.9, 0.1, 0.0) if dataset in OWN_TEST_SPLIT else SplitSpec()
        if dataset in OWN_TEST_SPLIT:
            s = self.mapping(value, "data.split", ["train", "val", "test"], ["train", "val"])
            if "test" in s:
                raise self.fail("data.split.test", f"{dataset} has its own test split; give only train and val")
            fr = {k: self.number(s[k], f"data.split.{k}", positive=True) for k in ("train", "val")}
            fr["test"] = 0.0
        else:
            s = self.mapping(value, "data.split", ["train", "val", "test"], ["train", "val", "test"])
            fr = {k: self.number(s[k], f"data.split.{k}", positive=True) for k in ("train", "val", "test")}
        if abs(sum(fr.values()) - 1.0) > 1e-6:
            raise self.fail("data.split", f"fractions must add up to 1 (they add up to {sum(fr.values()):g})")
        return SplitSpec(**fr)

    def resolve_path(self, text: str) -> str:
        """Relative to the study file's folder, so a spec runs from any working directory."""
        path = Path(text).expanduser()
        if not path.is_absolute() and Path(self.source).is_file():
            path = Path(self.source).resolve().parent / path
        return str(path)

    def budget(self, value: Any) -> BudgetSpec:
        raw = self.mapping(value, "budget", ["n_trials", "epochs", "timeout", "trial_timeout"])
        out: dict[str, Any] = {}
        if "n_trials" in raw:
            out["n_trials"] = self.integer(raw["n_trials"], "budget.n_trials", minimum=1)
        if "epochs" in raw:
            out["epochs"] = self.integer(raw["epochs"], "budget.epochs", minimum=1)
        for key in ("timeout", "trial_timeout"):
            if raw.get(key) is not None:
                out[key] = self.number(raw[key], f"budget.{key}", positive=True)
        return BudgetSpec(**out)

    def named_kwargs(self, value: Any, path: str, names: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
        if isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, dict):
            raise self.fail(path, f"must be a name or a mapping with a name, not {_kind(value)}")
        if "name" not in value:
            raise self.fail(f"{path}.name", "is required")
        name = self.choice(value["name"], f"{path}.name", names)
        kwargs = {k: v for k, v in value.items() if k != "name"}
        for key, v in kwargs.items():
            if not isinstance(key, str):
                raise self.fail(path, f"keys must be text, not {_kind(key)}")
            if not _is_scalar(v):
                raise self.fail(f"{path}.{key}", "must be a plain value (number, text, true/false)")
        return name, kwargs

    def space(self, value: Any) -> tuple[ParamSpec, ...]:
        if value is None or value == {}:
            raise self.fail("space", "is empty; give at least one parameter to tune, e.g. lr")
        raw = self.mapping(value, "space", P.BY_NAME)
        # Catalogue order, so conditions always refer to parameters already resolved.
        specs = tuple(self.param(name, raw[name]) for name in P.BY_NAME if name in raw)
        if not any(p.tuned for p in specs):
            raise self.fail("space", "every parameter is fixed; give at least one a range or choices")
        return specs

    def param(self, name: str, value: Any) -> ParamSpec:
        info = P.BY_NAME[name]
        path = f"space.{name}"
        if isinstance(value, list):
            value = {"type": "categorical", "choices": value}
        if not isinstance(value, dict):
            if problem := P.check_value(info, value):
                raise self.fail(path, problem)
            return ParamSpec(name, "fixed", value=value)
        raw = self.mapping(value, path, ["type", "low", "high", "log", "step", "choices"])
        kind = raw.get("type")
        if kind is None:
            kind = "categorical" if "choices" in raw else ("int" if info.kind is int else "float")
        kind = self.choice(kind, f"{path}.type", ["float", "int", "categorical"])
        if kind == "categorical":
            for key in ("low", "high", "log", "step"):
                if key in raw:
                    raise self.fail(f"{path}.{key}", "does not apply to a categorical parameter")
            choices = raw.get("choices")
            if not isinstance(choices, list):
                raise self.fail(f"{path}.choices", "is required and must be a list")
            if not choices:
                raise self.fail(f"{path}.choices", "is empty; give at least one value")
            for i, c in enumerate(choices):
                if problem := P.check_value(info, c):
                    raise self.fail(f"{path}.choices[{i}]", problem)
            if len(set(map(repr, choices))) != len(choices):
                raise self.fail(f"{path}.choices", "has duplicate values")
            return ParamSpec(name, "categorical", choices=tuple(choices))
        if info.kind in (str, bool):
            raise self.fail(f"{path}.type", f"{name} takes choices, not a {kind} range")
        if kind == "float" and info.kind is int:
            raise self.fail(f"{path}.type", f"{name} is an integer; use type: int")
        if "choices" in raw:
            raise self.fail(f"{path}.choices", f"does not apply to type {kind}")
        for key in ("low", "high"):
            if key not in raw:
                raise self.fail(f"{path}.{key}", "is required")
            if kind == "int":
                self.integer(raw[key], f"{path}.{key}")
            else:
                self.number(raw[key], f"{path}.{key}")
        low, high = raw["low"], raw["high"]
        if low >= high:
            raise self.fail(f"{path}.low", f"must be < high ({high}); for a constant write {name}: {low}")
        log = raw.get("log", False)
        if not isinstance(log, bool):
            raise self.fail(f"{path}.log", "must be true or false")
        if log and low <= 0:
            raise self.fail(f"{path}.low", "must be > 0 when log is true")
        for key in ("low", "high"):
            if problem := P.check_value(info, int(raw[key]) if kind == "int" else float(raw[key])):
                raise self.fail(f"{path}.{key}", problem)
        step = raw.get("step")
        if step is not None:
            step = self.integer(step, f"{path}.step", 1) if kind == "int" else self.number(step, f"{path}.step", True)
            if log and (kind == "float" or step != 1):
                raise self.fail(f"{path}.step", "cannot be combined with log: true")
            n = (high - low) / step
            if abs(n - round(n)) > 1e-9 * max(1.0, abs(n)):
                raise self.fail(f"{path}.step", f"{step} does not divide the range {low}..{high}")
        if kind == "int":
            return ParamSpec(name, "int", low=int(low), high=int(high), log=log, step=step)
        return ParamSpec(name, "float", low=float(low), high=float(high), log=log, step=step)

    def cross_checks(self, spec: StudySpec) -> None:
        by_name = {p.name: p for p in spec.space}
        for p in spec.space:
            info = P.BY_NAME[p.name]
            if info.when is None:
                continue
            controller, values = info.when
            ctrl = by_name.get(controller)
            possible = ctrl.possible_values() if ctrl else (P.DEFAULTS[controller],)
            if possible is not None and not any(v in values for v in possible):
                raise self.fail(
                    f"space.{p.name}",
                    f"is never used: it applies only when {controller} is one of "
                    f"{', '.join(map(str, values))}",
                )
        if spec.model == "cnn" and spec.data.dataset in ("digits", "synthetic", "diabetes", "csv"):
            raise self.fail("model", f"cnn needs image data; {spec.data.dataset} is tabular (use mlp)")
        if spec.budget.n_trials > 1_000_000:
            raise self.fail("budget.n_trials", "must be <= 1000000")
        from hpo.samplers import check_strategy  # imported late: it imports optuna

        try:
            check_strategy(spec)
        except SpecError as e:  # raised as "key.path: message"; add the file
            raise SpecError(f"{self.source}: {e}") from None


def _all_dataset_options() -> list[str]:
    return sorted({o for _, opts, _ in DATASETS.values() for o in opts})


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {
        bool: "true/false", int: "an integer", float: "a number", str: "text",
        list: "a list", dict: "a mapping",
    }.get(type(value), type(value).__name__)
