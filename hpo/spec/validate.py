"""Validation of study documents: every rule a spec must meet, with file: key: message errors.

Everything is checked before any storage is touched, including that the sampler and pruner can
be built with the given options.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from hpo.errors import SettingError, SpecError
from hpo.spec import params as P
from hpo.spec.schema import (
    CONFIDENCES,
    DATASETS,
    MEASURED,
    METRICS,
    MODELS,
    NAME_RE,
    OWN_TEST_SPLIT,
    PRUNERS,
    SAMPLERS,
    USER_DATA_OPTIONS,
    BudgetSpec,
    Constraint,
    DataSpec,
    ExecutionSpec,
    Objective,
    ParamSpec,
    Prior,
    PrunerSpec,
    SamplerSpec,
    SearchSpec,
    Step,
    SplitSpec,
    StudySpec,
    WarmStart,
    default_pruner,
)
from hpo.spec.user_code import absolute_reference, check_reference

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _did_you_mean(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, bool, int, float))


class Validator:
    """Walks a parsed document, building the spec; the first problem raises a SpecError that names
    the file and the key path."""

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
             "sampler", "pruner", "budget", "execution", "train", "test", "prune_on", "constraints",
             "latency_batch_size", "enqueue", "warm_start", "test_top", "search"],
            required=["name", "space"],
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
        train = self.reference(top, "train")
        test = self.reference(top, "test")
        objectives, metric, direction = self.objectives(top, custom=train is not None)
        seed = self.integer(top.get("seed", 0), "seed", minimum=0)
        model, data = self.model_and_data(top, train, metric, objectives)
        mode = "user" if train is not None else ("factory" if ":" in model else "builtin")
        space = self.space(top["space"], mode)
        budget = self.budget(top.get("budget", {}))
        search = self.search(top.get("search", {}), space, budget, train is None)
        if search.strategy == "schedule":
            budget = self.schedule_budget(top.get("budget", {}), budget, search)
        if search.segmented:
            budget = self.pbt_budget(top.get("budget", {}), budget, search)
            if "pruner" in top and top["pruner"] not in ("none", {"name": "none"}):
                raise self.fail("pruner", "population-based training replaces pruning (a member in the bottom "
                                          "quantile continues from a top member's checkpoint); leave pruner out")
        sampler = SamplerSpec(*self.named_kwargs(top.get("sampler", {"name": "tpe"}), "sampler", SAMPLERS))
        default = {"name": "none"} if search.segmented else default_pruner(budget.epochs)
        pruner = PrunerSpec(*self.named_kwargs(top.get("pruner", default), "pruner", PRUNERS),
                            given="pruner" in top)
        execution = self.execution(top.get("execution", {}))
        known = [*([o.name for o in objectives] or [metric]), *MEASURED]
        if train is None:
            known += [m for m, (_, task) in METRICS.items() if data is not None and task == data.task]
        constraints = self.constraints(top.get("constraints", []), known, custom=train is not None)
        latency_batch = self.integer(top.get("latency_batch_size", 1), "latency_batch_size", minimum=1)
        spec = StudySpec(
            name=name, description=description, metric=metric, direction=direction, seed=seed,
            model=model, data=data, space=space, sampler=sampler, pruner=pruner, budget=budget,
            execution=execution, source=self.source, train=train, test=test, objectives=objectives,
            constraints=constraints, latency_batch_size=latency_batch,
            enqueue=self.enqueue(top.get("enqueue", []), space), warm_start=self.warm_start(top, name),
            test_top=self.integer(top["test_top"], "test_top", minimum=1) if "test_top" in top else None,
            search=search,
        )
        if search.segmented:
            self.check_pbt(spec)
        if spec.budget.n_trials is not None and len(spec.enqueue) > spec.budget.n_trials:
            raise self.fail("enqueue", f"{len(spec.enqueue)} configurations but budget.n_trials is "
                                       f"{spec.budget.n_trials}; they are counted in the budget")
        self.cross_checks(spec)
        if execution.mode == "fused":
            self.check_fusable(spec, "execution.mode")
        return spec

    def model_and_data(self, top: dict[str, Any], train: str | None, metric: str,
                       objectives: tuple[Objective, ...]) -> tuple[str, DataSpec | None]:
        """hpo's own loop needs a model and data whose task fits the metrics; a train function
        brings both."""
        if train is not None:
            for key in ("data", "model"):
                if key in top:
                    raise self.fail(key, f"does not apply with train: ({train} brings its own {key})")
            return "mlp", None
        if "data" not in top:
            raise self.fail("data", "is required (or name your own training function with train:)")
        model = self.model(top.get("model", "mlp"))
        data = self.data(top["data"], metric)
        task = METRICS[metric][1] if metric in METRICS else data.task
        if data.task != task:
            hint = " (set data.task: regression)" if data.dataset in ("csv", "npz") and task == "regression" else ""
            raise self.fail(
                "metric", f"{metric} is a {task} metric but the {data.dataset} data is {data.task}{hint}"
            )
        if metric not in METRICS:
            raise self.fail("metric", f"unknown metric {metric!r} for hpo's own training loop"
                                      f"{_did_you_mean(metric, METRICS)} (expected one of: {', '.join(METRICS)})")
        for i, o in enumerate(objectives):
            if o.name in METRICS and METRICS[o.name][1] != data.task:
                raise self.fail(f"metric[{i}]", f"{o.name} is a {METRICS[o.name][1]} metric but the "
                                                f"{data.dataset} data is {data.task}")
        return model, data

    def reference(self, top: dict[str, Any], key: str) -> str | None:
        """`module:function` or `file.py:function`; a file is made absolute, relative to the spec."""
        if key not in top:
            return None
        if (problem := check_reference(top[key])) is not None:
            raise self.fail(key, problem)
        return absolute_reference(top[key], self.source)

    def objectives(self, top: dict[str, Any], custom: bool) -> tuple[tuple[Objective, ...], str, str]:
        """`metric:` one name, or a list of objectives; with a list, `prune_on` (default: the first
        objective reported per epoch) is the metric pruned on. Returns (objectives, metric, direction):
        no objectives for a single metric, which is then the study's one value, as always."""
        raw = top.get("metric", "val_accuracy")
        if not isinstance(raw, list):
            if "prune_on" in top and top["prune_on"] != raw:
                raise self.fail("prune_on", f"applies to several objectives; with one, {raw!r} is pruned on")
            return (), *self.objective(top, custom)
        if "direction" in top:
            raise self.fail("direction", "give each objective its direction in the metric list, "
                                         "e.g. {name: n_params, direction: minimize}")
        if not raw:
            raise self.fail("metric", "is an empty list; name at least one objective")
        objectives = tuple(self.goal(entry, f"metric[{i}]", custom) for i, entry in enumerate(raw))
        names = [o.name for o in objectives]
        if len(set(names)) != len(names):
            raise self.fail("metric", f"names {next(n for n in names if names.count(n) > 1)} twice")
        if len(objectives) == 1 and objectives[0].per_epoch:
            return (), objectives[0].name, objectives[0].direction  # [val_accuracy] is val_accuracy
        epochly = [o for o in objectives if o.per_epoch]
        prune_on = top.get("prune_on", epochly[0].name if epochly else None)
        if prune_on is None:
            raise self.fail("prune_on", "is required: no objective is reported per epoch (name a validation "
                                        "metric such as val_accuracy to prune on)")
        if not isinstance(prune_on, str) or not _IDENTIFIER.match(prune_on):
            raise self.fail("prune_on", "must be the name of a metric reported every epoch, e.g. val_accuracy")
        if prune_on in MEASURED:
            raise self.fail("prune_on", f"{prune_on} is measured once after training, not reported per epoch; "
                                        "name a validation metric such as val_accuracy")
        match = next((o for o in objectives if o.name == prune_on), None)
        if match is not None:
            return objectives, match.name, match.direction
        if prune_on in METRICS:
            return objectives, prune_on, METRICS[prune_on][0]
        known = [o.name for o in epochly] + ([] if custom else list(METRICS))
        raise self.fail("prune_on", f"unknown metric {prune_on!r}{_did_you_mean(prune_on, known)}; name an "
                                    f"objective reported per epoch ({', '.join(o.name for o in epochly) or 'none'})")

    def goal(self, entry: Any, path: str, custom: bool) -> Objective:
        """One objective: a name, or {name, direction}; known metrics bring their direction."""
        if isinstance(entry, str):
            entry = {"name": entry}
        raw = self.mapping(entry, path, ["name", "direction"], ["name"])
        name, direction = raw["name"], raw.get("direction")
        if direction is not None:
            self.choice(direction, f"{path}.direction", ["maximize", "minimize"])
        natural = METRICS[name][0] if name in METRICS else MEASURED.get(name) if isinstance(name, str) else None
        if natural is not None:
            if direction not in (None, natural):
                raise self.fail(f"{path}.direction", f"{name} can only be {natural}d; remove direction or set it "
                                                     f"to {natural}")
            return Objective(name, natural)
        known = [*METRICS, *MEASURED]
        if not custom:
            raise self.fail(f"{path}", f"unknown objective {name!r}{_did_you_mean(str(name), known)} (expected one "
                                       f"of: {', '.join(known)})")
        if not isinstance(name, str) or not _IDENTIFIER.match(name):
            raise self.fail(f"{path}.name", "must be the name of a metric your train function reports, e.g. val_f1")
        if direction is None:
            raise self.fail(f"{path}.direction", f"is required for the metric {name!r} (maximize or minimize)")
        return Objective(name, direction)

    def constraints(self, value: Any, known: list[str], custom: bool) -> tuple[Constraint, ...]:
        """`[{metric: n_params, max: 1e6}, ...]`: bounds a feasible trial stays within."""
        if not isinstance(value, list):
            raise self.fail("constraints", f"must be a list of {{metric, min or max}}, not {_kind(value)}")
        out = []
        for i, entry in enumerate(value):
            path = f"constraints[{i}]"
            raw = self.mapping(entry, path, ["metric", "min", "max"], ["metric"])
            metric = raw["metric"]
            if not isinstance(metric, str) or not _IDENTIFIER.match(metric) or (not custom and metric not in known):
                raise self.fail(f"{path}.metric", f"unknown metric {metric!r}{_did_you_mean(str(metric), known)} "
                                                  f"(expected one of: {', '.join(dict.fromkeys(known))})")
            if "min" not in raw and "max" not in raw:
                raise self.fail(path, "needs min or max (or both)")
            bounds = {k: self.number(raw[k], f"{path}.{k}") for k in ("min", "max") if k in raw}
            if bounds.get("min", -math.inf) > bounds.get("max", math.inf):
                raise self.fail(f"{path}.min", "must be <= max")
            out.append(Constraint(metric, bounds.get("min"), bounds.get("max")))
        return tuple(out)

    def enqueue(self, value: Any, space: tuple[ParamSpec, ...]) -> tuple[dict[str, Any], ...]:
        """Known configurations to run first: each a mapping of tuned parameters to values they can take."""
        if not isinstance(value, list):
            raise self.fail("enqueue", f"must be a list of configurations (parameter: value), not {_kind(value)}")
        return tuple(self.configuration(entry, f"enqueue[{i}]", space) for i, entry in enumerate(value))

    def configuration(self, entry: Any, path: str, space: tuple[ParamSpec, ...]) -> dict[str, Any]:
        by_name = {p.name: p for p in space}
        raw = self.mapping(entry, path, list(by_name))
        if not raw:
            raise self.fail(path, "is empty; give at least one parameter's value")
        for name, v in raw.items():
            if (problem := value_problem(by_name[name], v)) is not None:
                raise self.fail(f"{path}.{name}", problem)
        for name in raw:  # a parameter its `when:` rules out would be dropped without a word
            for other, allowed in by_name[name].when:
                if other in raw and raw[other] not in allowed:
                    wanted = " or ".join(str(a) for a in allowed)
                    raise self.fail(f"{path}.{name}", f"does not apply when {other}={raw[other]} (only when "
                                                      f"{other} is {wanted}); leave it out")
        return {name: float(v) if by_name[name].kind == "float" else v for name, v in raw.items()}

    def warm_start(self, top: dict[str, Any], name: str) -> WarmStart | None:
        if "warm_start" not in top:
            return None
        raw = self.mapping(top["warm_start"], "warm_start", ["study", "top"], ["study"])
        other = raw["study"]
        if not isinstance(other, str) or not NAME_RE.match(other):
            raise self.fail("warm_start.study", "must be the name of a study in the same storage")
        if other == name:
            raise self.fail("warm_start.study", "names this study itself; name another study")
        return WarmStart(other, self.integer(raw.get("top", 5), "warm_start.top", minimum=1))

    def objective(self, top: dict[str, Any], custom: bool) -> tuple[str, str]:
        """The metric and its direction: known metrics bring theirs; a user's metric needs one."""
        metric = top.get("metric", "val_accuracy")
        if (isinstance(metric, str) and metric in METRICS) or not custom:
            metric = self.choice(metric, "metric", METRICS)
            natural = METRICS[metric][0]
            direction = top.get("direction", natural)
            self.choice(direction, "direction", ["maximize", "minimize"])
            if direction != natural:
                raise self.fail(
                    "direction", f"{metric} can only be {natural}d; remove direction or set it to {natural}"
                )
            return metric, direction
        if not isinstance(metric, str) or not _IDENTIFIER.match(metric):
            raise self.fail("metric", "must be the name of a metric your train function reports, e.g. val_f1")
        if "direction" not in top:
            raise self.fail("direction", f"is required for the metric {metric!r} (maximize or minimize)")
        return metric, self.choice(top["direction"], "direction", ["maximize", "minimize"])

    def model(self, value: Any) -> str:
        if isinstance(value, str) and ":" in value:
            if (problem := check_reference(value)) is not None:
                raise self.fail("model", problem)
            return absolute_reference(value, self.source)
        return self.choice(value, "model", MODELS)

    def execution(self, value: Any) -> ExecutionSpec:
        raw = self.mapping(value, "execution", ["mode", "group_size", "pad", "workers", "tensorboard",
                                                     "processes_per_trial"])
        mode = self.choice(raw.get("mode", "sequential"), "execution.mode", ["sequential", "fused"])
        size = self.integer(raw.get("group_size", 8), "execution.group_size", minimum=2)
        if size > 1024:
            raise self.fail("execution.group_size", "must be <= 1024")
        pad = raw.get("pad", "auto")
        if pad != "auto" and not isinstance(pad, bool):
            raise self.fail("execution.pad", "must be true, false or auto")
        workers = raw.get("workers", "auto")
        if workers != "auto":
            workers = self.integer(workers, "execution.workers", minimum=1)
        tensorboard = raw.get("tensorboard", False)
        if not isinstance(tensorboard, bool):
            raise self.fail("execution.tensorboard", "must be true or false")
        procs = self.integer(raw.get("processes_per_trial", 1), "execution.processes_per_trial", minimum=1)
        if procs > 1 and mode == "fused":
            raise self.fail("execution.processes_per_trial", "fused trials run in one process; use one or the other")
        return ExecutionSpec(mode, size, None if pad == "auto" else pad, None if workers == "auto" else workers,
                             tensorboard, procs)

    def check_fusable(self, spec: StudySpec, where: str) -> None:
        if (why := fusion_problem(spec)) is not None:
            raise self.fail(where, why)

    def data(self, value: Any, metric: str = "val_accuracy") -> DataSpec:
        raw = self.mapping(value, "data", ["dataset", "split", *_all_dataset_options()], ["dataset"])
        if isinstance(raw["dataset"], str) and ":" in raw["dataset"]:
            return self.user_data(raw, metric)
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

    def user_data(self, raw: dict[str, Any], metric: str) -> DataSpec:
        """`dataset: module:function`: the user's Datasets or arrays (hpo.data.user)."""
        if (problem := check_reference(raw["dataset"])) is not None:
            raise self.fail("data.dataset", problem)
        for key in raw:
            if key not in ("dataset", "split", *USER_DATA_OPTIONS):
                raise self.fail(f"data.{key}", "is not an option of a data function "
                                               f"(options: split, {', '.join(USER_DATA_OPTIONS)})")
        natural = METRICS[metric][1] if metric in METRICS else "classification"
        kwargs: dict[str, Any] = {
            "task": self.choice(raw.get("task", natural), "data.task", ["classification", "regression"])}
        if "cv_folds" in raw:
            kwargs["cv_folds"] = self.integer(raw["cv_folds"], "data.cv_folds", minimum=2)
            if kwargs["cv_folds"] > 20:
                raise self.fail("data.cv_folds", "must be <= 20")
        if "max_resident_mb" in raw:
            kwargs["max_resident_mb"] = self.number(raw["max_resident_mb"], "data.max_resident_mb", positive=True)
        if "loader_workers" in raw:
            kwargs["loader_workers"] = self.integer(raw["loader_workers"], "data.loader_workers", minimum=0)
        dataset = absolute_reference(raw["dataset"], self.source)
        return DataSpec(dataset=dataset, split=self.split(raw.get("split"), dataset), **kwargs)

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
        raw = self.mapping(value, "budget", ["n_trials", "epochs", "time", "timeout", "trial_timeout", "max_failures"])
        out: dict[str, Any] = {}
        if raw.get("time") is not None and raw.get("timeout") is not None:
            raise self.fail("budget.time", "give time or timeout (its older name), not both")
        if raw.get("n_trials") is not None:
            out["n_trials"] = self.integer(raw["n_trials"], "budget.n_trials", minimum=1)
        elif raw.get("time") is not None or raw.get("timeout") is not None:
            out["n_trials"] = None  # a time budget alone: as many trials as fit
        if "epochs" in raw:
            out["epochs"] = self.integer(raw["epochs"], "budget.epochs", minimum=1)
        if raw.get("max_failures") is not None:
            out["max_failures"] = self.integer(raw["max_failures"], "budget.max_failures", minimum=0)
        for key in ("time", "timeout", "trial_timeout"):
            if raw.get(key) is not None:
                out["timeout" if key == "time" else key] = self.seconds(raw[key], f"budget.{key}")
        return BudgetSpec(**out)

    def search(self, value: Any, space: tuple[ParamSpec, ...], budget: BudgetSpec, builtin: bool) -> SearchSpec:
        raw = self.mapping(value, "search", ["strategy", "population", "interval", "quantile", "resample",
                                             "explore", "schedule"])
        strategy = self.choice(raw.get("strategy", "sample"), "search.strategy", ["sample", "pbt", "schedule"])
        allowed = {"sample": (), "schedule": ("schedule",),
                   "pbt": ("population", "interval", "quantile", "resample", "explore")}[strategy]
        extra = sorted(set(raw) - {"strategy", *allowed}, key=lambda key: (key != "schedule", key))
        if extra:
            raise self.fail(f"search.{extra[0]}", "is replayed with strategy: schedule" if extra[0] == "schedule"
                            else "is an option of population-based training (strategy: pbt)")
        if strategy == "schedule":
            return SearchSpec("schedule", population=1, schedule=self.schedule(raw.get("schedule"), space))
        if strategy == "sample":
            return SearchSpec()
        population = self.integer(raw.get("population", 8), "search.population", minimum=2)
        interval = self.integer(raw.get("interval", 2), "search.interval", minimum=1)
        if interval >= budget.epochs:
            raise self.fail("search.interval", f"is {interval} epochs but budget.epochs is {budget.epochs}: a member "
                                               "would never be compared; use fewer epochs per segment")
        quantile = self.number(raw.get("quantile", 0.25), "search.quantile")
        if not 0 < quantile <= 0.5:
            raise self.fail("search.quantile", f"must be in (0, 0.5] (the bottom and top fractions), not {quantile}")
        resample = self.number(raw.get("resample", 0.25), "search.resample")
        if not 0 <= resample <= 1:
            raise self.fail("search.resample", f"must be in [0, 1] (a probability), not {resample}")
        explore = None
        if "explore" in raw:
            if not isinstance(raw["explore"], list) or not all(isinstance(n, str) for n in raw["explore"]):
                raise self.fail("search.explore", "must be a list of parameter names")
            tuned = [p.name for p in space if p.tuned]
            for name in raw["explore"]:
                if name not in tuned:
                    raise self.fail("search.explore", f"{name!r} is not a tuned parameter of space"
                                                      f"{_did_you_mean(name, tuned)}")
            explore = tuple(raw["explore"])
        out = SearchSpec("pbt", population, interval, quantile, resample, explore)
        if not out.explored(space, builtin):
            raise self.fail("search.explore", "no parameter to explore: population-based training perturbs "
                                              "numeric parameters of space (name them in search.explore)")
        return out

    def schedule(self, value: Any, space: tuple[ParamSpec, ...]) -> tuple[Step, ...]:
        """A fixed schedule: a list of {epochs: [start, end], params: {...}} from epoch 0, each
        segment starting where the one before ended (`hpo export`'s `schedule` of a PBT study),
        or the path of a file `hpo export` wrote."""
        if isinstance(value, str):
            value = self.exported_schedule(value)
        if not isinstance(value, list) or not value:
            raise self.fail("search.schedule", "must be a list of segments ({epochs: [start, end], params: {...}}) "
                                               "or the path of a file hpo export wrote")
        steps, at = [], 0
        for i, entry in enumerate(value):
            path = f"search.schedule[{i}]"
            if not isinstance(entry, dict) or not isinstance(entry.get("epochs"), list) or len(entry["epochs"]) != 2:
                raise self.fail(path, "must be {epochs: [start, end], params: {...}}")
            start, end = (self.integer(e, f"{path}.epochs", minimum=0) for e in entry["epochs"])
            if start != at or end <= start:
                raise self.fail(f"{path}.epochs", f"must start at epoch {at} (where the segment before ends) and end "
                                                  f"after it, not {[start, end]}")
            params = self.configuration(entry.get("params") or {}, f"{path}.params", space)
            steps.append(Step(start, end, params))
            at = end
        return tuple(steps)

    def exported_schedule(self, text: str) -> Any:
        path = Path(self.resolve_path(text))
        if not path.is_file():
            raise self.fail("search.schedule", f"no file {path}")
        import torch  # only to read an export: a schedule written in the file needs none

        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise self.fail("search.schedule", f"{path} is not a file hpo export wrote ({type(e).__name__})") from None
        if not isinstance(raw, dict) or not raw.get("schedule"):
            raise self.fail("search.schedule", f"{path} holds no schedule (hpo export of a study with "
                                               "search.strategy pbt writes one)")
        return raw["schedule"]

    def schedule_budget(self, raw: Any, budget: BudgetSpec, search: SearchSpec) -> BudgetSpec:
        """A schedule's epochs are the budget's."""
        last = search.schedule[-1].end
        if isinstance(raw, dict) and "epochs" in raw and raw["epochs"] != last:
            raise self.fail("budget.epochs", f"is {raw['epochs']} but the schedule ends at epoch {last}; leave it "
                                             "out")
        return replace(budget, epochs=last)

    def pbt_budget(self, raw: Any, budget: BudgetSpec, search: SearchSpec) -> BudgetSpec:
        """A population's trials are its segments: population x ceil(epochs / interval)."""
        total = search.population * search.segments(budget.epochs)
        if isinstance(raw, dict) and raw.get("n_trials") is not None and raw["n_trials"] != total:
            raise self.fail("budget.n_trials", f"population-based training runs population x segments = "
                                               f"{search.population} x {search.segments(budget.epochs)} = {total} "
                                               "trials; leave n_trials out")
        return replace(budget, n_trials=total)

    def check_pbt(self, spec: StudySpec) -> None:
        if spec.execution.mode == "fused":
            raise self.fail("execution.mode", "population-based training runs members one at a time (sequential)")
        if spec.execution.processes_per_trial > 1:
            raise self.fail("execution.processes_per_trial", "population-based training runs a member in one "
                                                             "process")
        if spec.multi_objective:
            raise self.fail("metric", "population-based training ranks members on one metric")
        if spec.sampler.name == "grid":
            raise self.fail("sampler.name", "population-based training draws its first members from a sampler, "
                                            "not a grid")
        if spec.enqueue or spec.warm_start is not None:
            raise self.fail("enqueue" if spec.enqueue else "warm_start", "population-based training starts its "
                            "members from the sampler; known configurations are not supported with it")

    def seconds(self, value: Any, path: str) -> float:
        """A number of seconds, or a duration as a person writes it: 90s, 10m, 1h30m, 1.5h."""
        if isinstance(value, str):
            parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?\s*",
                                 value)
            if not value.strip() or parts is None or not any(parts.groups()):
                raise self.fail(path, f"must be seconds or a duration such as 90s, 10m or 1h30m, not {value!r}")
            h, m, sec = (float(g) if g else 0.0 for g in parts.groups())
            value = h * 3600 + m * 60 + sec
        return self.number(value, path, positive=True)

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

    def space(self, value: Any, mode: str = "builtin") -> tuple[ParamSpec, ...]:
        """`mode`: builtin (the catalogue only), factory (the catalogue plus any name, for a model
        factory) or user (any name, none with a built-in meaning, for a train function)."""
        if value is None or value == {}:
            raise self.fail("space", "is empty; give at least one parameter to tune, e.g. lr")
        if mode == "builtin":
            raw = self.mapping(value, "space", P.BY_NAME)
        else:
            raw = self.mapping(value, "space", list(value) if isinstance(value, dict) else [])
            for key in raw:
                if not _IDENTIFIER.match(key):
                    raise self.fail(f"space.{key}", "a parameter name must be a Python identifier")
        # Catalogue order, so built-in conditions always refer to parameters already resolved;
        # then the user's own, in the file's order (their `when` may refer to any before them).
        known = [name for name in P.BY_NAME if name in raw] if mode != "user" else []
        order = known + [name for name in raw if name not in known]
        specs: list[ParamSpec] = []
        for name in order:
            info = P.BY_NAME.get(name) if mode != "user" else None
            specs.append(self.param(name, raw[name], info, specs))
        if not any(p.tuned for p in specs):
            raise self.fail("space", "every parameter is fixed; give at least one a range or choices")
        return tuple(specs)

    def param(self, name: str, value: Any, info: P.ParamInfo | None = None,
              earlier: list[ParamSpec] | None = None) -> ParamSpec:
        path = f"space.{name}"
        if isinstance(value, list):
            value = {"type": "categorical", "choices": value}
        if not isinstance(value, dict):
            if info is not None and (problem := P.check_value(info, value)):
                raise self.fail(path, problem)
            if info is None and not _is_scalar(value):
                raise self.fail(path, "must be a value, a list of choices or a range")
            return ParamSpec(name, "fixed", value=value)
        raw = self.mapping(value, path, ["type", "low", "high", "log", "step", "choices", "when", "prior"])
        spec = self.tuned_param(name, raw, info, path, earlier)
        return self.prior(spec, raw["prior"], f"{path}.prior") if "prior" in raw else spec

    def tuned_param(self, name: str, raw: dict[str, Any], info: P.ParamInfo | None, path: str,
                    earlier: list[ParamSpec] | None) -> ParamSpec:
        when = self.when(raw.get("when"), f"{path}.when", name, earlier or []) if "when" in raw else ()
        if when and info is not None and info.when is not None:
            raise self.fail(f"{path}.when", f"{name} already applies only when {info.when[0]} is one of "
                                            f"{', '.join(map(str, info.when[1]))}")
        kind = raw.get("type")
        if kind is None:
            integer = info.kind is int if info is not None else (
                isinstance(raw.get("low"), int) and isinstance(raw.get("high"), int) and not raw.get("log")
                and not isinstance(raw.get("low"), bool))
            kind = "categorical" if "choices" in raw else ("int" if integer else "float")
        kind = self.choice(kind, f"{path}.type", ["float", "int", "categorical"])
        if kind == "categorical":
            return self.categorical(name, raw, info, path, when)
        return self.numeric_range(name, raw, info, path, kind, when)

    def prior(self, spec: ParamSpec, value: Any, path: str) -> ParamSpec:
        """`prior: 3e-3`, `prior: {value: adam, confidence: high}`, or `prior: null` (no belief, not
        even hpo's built-in one): the value must be one the parameter can take."""
        if value is None:
            return replace(spec, no_prior=True)
        raw = self.mapping(value, path, ["value", "confidence"]) if isinstance(value, dict) else {"value": value}
        if "value" not in raw:
            raise self.fail(f"{path}.value", "is required")
        confidence = self.choice(raw.get("confidence", "medium"), f"{path}.confidence", CONFIDENCES)
        belief = raw["value"]
        if spec.kind == "categorical":
            if belief not in spec.choices:
                raise self.fail(path, f"{belief!r} is not one of the choices ({', '.join(map(str, spec.choices))})")
        else:
            if spec.kind == "int":
                belief = self.integer(belief, f"{path}.value" if "confidence" in raw else path)
            else:
                belief = self.number(belief, f"{path}.value" if "confidence" in raw else path)
            assert spec.low is not None and spec.high is not None
            if not spec.low <= belief <= spec.high:
                raise self.fail(path, f"{belief:g} is outside the range {spec.low:g}..{spec.high:g}")
        return replace(spec, prior=Prior(belief, confidence))

    def categorical(self, name: str, raw: dict[str, Any], info: P.ParamInfo | None, path: str,
                    when: tuple[tuple[str, tuple[Any, ...]], ...]) -> ParamSpec:
        for key in ("low", "high", "log", "step"):
            if key in raw:
                raise self.fail(f"{path}.{key}", "does not apply to a categorical parameter")
        choices = raw.get("choices")
        if not isinstance(choices, list):
            raise self.fail(f"{path}.choices", "is required and must be a list")
        if not choices:
            raise self.fail(f"{path}.choices", "is empty; give at least one value")
        for i, c in enumerate(choices):
            if info is not None and (problem := P.check_value(info, c)):
                raise self.fail(f"{path}.choices[{i}]", problem)
            if info is None and not _is_scalar(c):
                raise self.fail(f"{path}.choices[{i}]", "must be a plain value (number, text, true/false)")
        if len(set(map(repr, choices))) != len(choices):
            raise self.fail(f"{path}.choices", "has duplicate values")
        return ParamSpec(name, "categorical", choices=tuple(choices), when=when)

    def numeric_range(self, name: str, raw: dict[str, Any], info: P.ParamInfo | None, path: str, kind: str,
                      when: tuple[tuple[str, tuple[Any, ...]], ...]) -> ParamSpec:
        if info is not None and info.kind in (str, bool):
            raise self.fail(f"{path}.type", f"{name} takes choices, not a {kind} range")
        if info is not None and kind == "float" and info.kind is int:
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
            if info is not None and (problem := P.check_value(info, int(raw[key]) if kind == "int" else float(raw[key]))):
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
            return ParamSpec(name, "int", low=int(low), high=int(high), log=log, step=step, when=when)
        return ParamSpec(name, "float", low=float(low), high=float(high), log=log, step=step, when=when)

    def when(self, value: Any, path: str, name: str, earlier: list[ParamSpec]) -> tuple[tuple[str, tuple[Any, ...]], ...]:
        """`when: {optimizer: sgd}` or `{optimizer: [sgd, momentum]}`: only parameters listed before
        this one, and only values they can take."""
        if not isinstance(value, dict):
            raise self.fail(path, "must be a mapping, e.g. when: {optimizer: sgd}")
        names = [p.name for p in earlier]
        for key in value:
            if key not in names:
                raise self.fail(f"{path}.{key}", f"is not a parameter listed before {name} in space "
                                                 "(conditions refer to earlier parameters)")
        raw = value
        if not raw:
            raise self.fail(path, "is empty; name the parameter and value(s) this one depends on")
        out = []
        for ctrl, allowed in raw.items():
            values = tuple(allowed) if isinstance(allowed, list) else (allowed,)
            if not values or not all(_is_scalar(v) for v in values):
                raise self.fail(f"{path}.{ctrl}", "must be a value or a list of values")
            possible = next(p for p in earlier if p.name == ctrl).possible_values()
            if possible is not None and not any(v in possible for v in values):
                raise self.fail(f"{path}.{ctrl}", f"{ctrl} never takes {', '.join(map(repr, values))}, "
                                                  f"so {name} would never be used")
            out.append((ctrl, values))
        return tuple(out)

    def cross_checks(self, spec: StudySpec) -> None:
        by_name = {p.name: p for p in spec.space}
        for p in spec.space:
            info = P.BY_NAME.get(p.name) if spec.train is None else None
            if info is None or info.when is None:
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
        if spec.model == "cnn" and spec.data is not None and spec.data.dataset in ("digits", "synthetic", "diabetes", "csv"):
            raise self.fail("model", f"cnn needs image data; {spec.data.dataset} is tabular (use mlp)")
        if spec.budget.n_trials is not None and spec.budget.n_trials > 1_000_000:
            raise self.fail("budget.n_trials", "must be <= 1000000")
        from hpo.spec.strategy import check_strategy  # imported late: it imports optuna

        try:
            check_strategy(spec)
        except SpecError as e:  # raised as "key.path: message"; add the file
            raise SpecError(f"{self.source}: {e}") from None


def value_problem(p: ParamSpec, value: Any) -> str | None:
    """Why `value` is not one `p` can take (a configuration to enqueue), or None."""
    if p.kind == "fixed":
        return None if value == p.value else f"is fixed at {p.value!r} in space"
    if p.kind == "categorical":
        return None if value in p.choices and type(value) in {type(c) for c in p.choices} else (
            f"{value!r} is not one of the choices {list(p.choices)}")
    if p.kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        return f"must be an integer, not {_kind(value)}"
    if not _is_number(value):
        return f"must be a number, not {_kind(value)}"
    assert p.low is not None and p.high is not None
    if not p.low <= value <= p.high:
        return f"{value!r} is outside the range {p.low}..{p.high}"
    if p.step is not None and abs((value - p.low) / p.step - round((value - p.low) / p.step)) > 1e-9:
        return f"{value!r} is not on the range's step of {p.step} from {p.low}"
    return None


def _all_dataset_options() -> list[str]:
    return sorted({o for _, opts, _ in DATASETS.values() for o in opts} | set(USER_DATA_OPTIONS))


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {
        bool: "true/false", int: "an integer", float: "a number", str: "text",
        list: "a list", dict: "a mapping",
    }.get(type(value), type(value).__name__)


def fusion_problem(spec: StudySpec) -> str | None:
    """Why `spec` cannot run fused (fusion stacks MLP weights and vectorises torch.optim's update
    rules), or None."""
    if spec.search.segmented:
        return "population-based training runs members one at a time (sequential)"
    if spec.train is not None:
        return "fused training runs hpo's own MLP loop; a train function cannot be fused"
    if spec.model != "mlp":
        return "fused training supports model: mlp only"
    if spec.builtin_data.is_user:
        return "fused training does not take user data functions yet"
    if not spec.plain:
        return "fused training takes one objective without constraints; run this study one trial at a time"
    if spec.builtin_data.cv_folds:
        return "fused training does not combine with data.cv_folds"
    opt = spec.param("optimizer")
    names = opt.possible_values() if opt else (P.DEFAULTS["optimizer"],)
    if names and "schedulefree_adamw" in names:
        return "schedulefree_adamw cannot be fused; drop it from space.optimizer"
    return None


def with_fusion(spec: StudySpec, group_size: int) -> StudySpec:
    """A copy that runs fused groups of `group_size` (the `fuse` setting), checked as the file's
    execution.mode is."""
    fused = replace(spec, execution=replace(spec.execution, mode="fused", group_size=group_size))
    if (why := fusion_problem(fused)) is not None:
        raise SettingError("fuse", why)
    if spec.execution.processes_per_trial > 1:
        raise SettingError("fuse", "fused trials run in one process; execution.processes_per_trial is "
                                   f"{spec.execution.processes_per_trial}")
    return fused


def with_processes(spec: StudySpec, processes: int) -> StudySpec:
    """A copy whose trials each run on `processes` processes (the `procs_per_trial` setting)."""
    if processes > 1 and spec.execution.mode == "fused":
        raise SettingError("procs_per_trial", "fused trials run in one process; use one or the other")
    if processes > 1 and spec.search.segmented:
        raise SettingError("procs_per_trial", "population-based training runs a member in one process")
    return replace(spec, execution=replace(spec.execution, processes_per_trial=processes))
