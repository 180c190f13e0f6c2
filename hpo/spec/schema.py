"""A study as frozen, typed dataclasses (StudySpec and its parts) and the names they may take.

Reading a file (hpo/spec/loading.py) and every rule a spec must meet (hpo/spec/validate.py) run
before any storage is touched.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

METRICS: dict[str, tuple[str, str]] = {
    # metric -> (direction it is optimised in, task it belongs to)
    "val_accuracy": ("maximize", "classification"),
    "val_loss": ("minimize", "classification"),
    "val_mse": ("minimize", "regression"),
}
# Objectives hpo measures once a trial has trained (not per epoch) -> the direction they go.
MEASURED: dict[str, str] = {"n_params": "minimize", "latency_ms": "minimize", "train_seconds": "minimize"}
MODELS = ("mlp", "cnn")
SAMPLERS = ("tpe", "random", "cmaes", "gp", "qmc", "grid", "nsga2", "nsga3")
PRUNERS = ("median", "percentile", "hyperband", "successive_halving", "patient", "none")
# hpo's pruner when a study names none, chosen on the development problems of the benchmark suite
# and checked on the held-out ones (benchmarks/time_to_quality.py; figures in benchmarks/RESULTS.md).
DEFAULT_PRUNER = "median"


def default_pruner(epochs: int) -> dict[str, Any]:
    """The default pruner for a study of `epochs` epochs, as a study file would write it: Optuna's
    median rule after 5 trials, each trial judged from a quarter of its epochs on (a slow starter
    gets that long before it is compared)."""
    return {"name": DEFAULT_PRUNER, "n_startup_trials": 5, "n_warmup_steps": max(1, epochs // 4)}


# dataset -> (task, or None when data.task says; options it accepts; options it requires)
DATASETS: dict[str, tuple[str | None, tuple[str, ...], tuple[str, ...]]] = {
    "digits": ("classification", ("cv_folds",), ()),
    "synthetic": ("classification", ("n_samples", "n_features", "n_classes", "n_informative", "cv_folds"), ()),
    "diabetes": ("regression", ("cv_folds",), ()),
    "fashion_mnist": ("classification", ("path", "n_train", "cv_folds"), ()),
    "csv": (None, ("path", "label", "task", "categorical", "cv_folds"), ("path", "label")),
    "npz": (None, ("path", "task", "cv_folds"), ("path",)),
}
# A user's data function (`dataset: module:function`): what hpo needs to know that the data cannot say.
USER_DATA_OPTIONS = ("task", "cv_folds", "max_resident_mb", "loader_workers")
OWN_TEST_SPLIT = ("fashion_mnist",)  # these bring a test split; the spec splits only train/val
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


CONFIDENCES = ("low", "medium", "high")


@dataclass(frozen=True)
class Prior:
    """A user's belief about one parameter: the value they expect to work, and how sure they are.
    The first trial takes it; later trials draw around it less and less as results come in
    (hpo.search.priors)."""

    value: Any
    confidence: str = "medium"

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "confidence": self.confidence}


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
    # Sampled only where every named parameter took one of the listed values (`when:` in the spec).
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    prior: Prior | None = None  # the user's belief (`prior:`); None: hpo's built-in one, if it has one
    no_prior: bool = False  # `prior: null`: no belief, not even hpo's built-in one

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

    def applies(self, values: Mapping[str, Any]) -> bool:
        """Whether its `when` conditions hold for the values chosen so far."""
        return all(name in values and values[name] in allowed for name, allowed in self.when)

    def to_dict(self) -> Any:
        if self.kind == "fixed":
            return self.value
        out: dict[str, Any]
        if self.kind == "categorical":
            out = {"type": "categorical", "choices": list(self.choices)}
        else:
            out = {"type": self.kind, "low": self.low, "high": self.high}
            if self.log:
                out["log"] = True
            if self.step is not None:
                out["step"] = self.step
        if self.when:
            out["when"] = {name: list(values) for name, values in self.when}
        if self.prior is not None or self.no_prior:
            out["prior"] = self.prior.to_dict() if self.prior is not None else None
        return out


@dataclass(frozen=True)
class SplitSpec:
    train: float = 0.7
    val: float = 0.15
    test: float = 0.15


@dataclass(frozen=True)
class DataSpec:
    dataset: str  # a name above, or the user's `module:function` (hpo.data.user)
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
    # User data: held on the device while it takes at most this many MiB, else streamed through a
    # DataLoader (None: a quarter of the GPU's memory, or 2 GiB on a CPU).
    max_resident_mb: float | None = None
    loader_workers: int | None = None  # DataLoader worker processes when streamed (None: up to 4)

    @property
    def is_user(self) -> bool:
        return ":" in self.dataset

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dataset": self.dataset}
        if self.dataset in OWN_TEST_SPLIT:
            out["split"] = {"train": self.split.train, "val": self.split.val}
        else:
            out["split"] = {"train": self.split.train, "val": self.split.val, "test": self.split.test}
        for key in (USER_DATA_OPTIONS if self.is_user else DATASETS[self.dataset][1]):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


@dataclass(frozen=True)
class SamplerSpec:
    name: str = "tpe"
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PrunerSpec:
    name: str = DEFAULT_PRUNER
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    # The study file named it (false: hpo's default). A study resumed from a file that names none
    # keeps the pruner it was made with, whatever hpo's default is now.
    given: bool = field(default=True, compare=False)


# hpo's own parameters a trained model can take new values of: the optimizer's and the loop's, not
# the model's structure or the update rule (their checkpoint would not load).
RETUNABLE = ("lr", "weight_decay", "momentum", "beta1", "beta2", "dropout", "batch_size", "step_gamma")


@dataclass(frozen=True)
class Step:
    """One segment of a fixed schedule: epochs [start, end) trained with `params`."""

    start: int
    end: int
    params: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"epochs": [self.start, self.end], "params": dict(self.params)}


@dataclass(frozen=True)
class SearchSpec:
    """How the study searches: `sample` (a sampler proposes each trial, a pruner stops the poor
    ones: Optuna's way), `pbt` (population-based training, hpo.search.pbt: members train in
    segments of `interval` epochs; after each, a member in the bottom `quantile` continues from a
    top member's checkpoint with its parameters perturbed x0.8/x1.2, or redrawn with probability
    `resample`), or `schedule` (one member trains a fixed schedule: a PBT member's, replayed)."""

    strategy: str = "sample"
    population: int = 8
    interval: int = 2
    quantile: float = 0.25
    resample: float = 0.25
    # The parameters a member's exploit may change (None: hpo's own loop's training parameters, or
    # a user's floats): structure (width, depth, optimizer) stays, or the checkpoint would not load.
    explore: tuple[str, ...] | None = None
    schedule: tuple[Step, ...] = ()  # strategy schedule: the segments, in order, from epoch 0

    @property
    def pbt(self) -> bool:
        return self.strategy == "pbt"

    @property
    def segmented(self) -> bool:
        """Trials are segments of a member's training (pbt, schedule): hpo.search.pbt decides them."""
        return self.strategy in ("pbt", "schedule")

    def explored(self, space: tuple[ParamSpec, ...], builtin: bool) -> tuple[str, ...]:
        """The tuned parameters an exploit changes."""
        tuned = [p for p in space if p.tuned]
        if self.explore is not None:
            return tuple(p.name for p in tuned if p.name in self.explore)
        if builtin:
            return tuple(p.name for p in tuned if p.name in RETUNABLE)
        return tuple(p.name for p in tuned if p.kind == "float")

    def segments(self, epochs: int) -> int:
        """Segments each member trains: `epochs` in steps of `interval`, or the schedule's."""
        return len(self.schedule) if self.schedule else -(-epochs // self.interval)

    def to_dict(self) -> dict[str, Any]:
        if self.strategy == "schedule":
            return {"strategy": "schedule", "schedule": [step.to_dict() for step in self.schedule]}
        out: dict[str, Any] = {"strategy": self.strategy, "population": self.population, "interval": self.interval,
                               "quantile": self.quantile, "resample": self.resample}
        if self.explore is not None:
            out["explore"] = list(self.explore)
        return out


UNLIMITED_TRIALS = 1_000_000  # a study with a time budget and no n_trials: as many as fit


@dataclass(frozen=True)
class BudgetSpec:
    # Results (complete and pruned trials) the study runs to; None: no count, the time budget
    # alone ends a run (what pruning saves then becomes more trials).
    n_trials: int | None = 20
    epochs: int = 10
    timeout: float | None = None  # seconds each run of the study gets (`time:` in a study file)
    trial_timeout: float | None = None  # seconds for one trial
    # Failed trials a run tolerates before it stops (they do not count against n_trials, which
    # counts results). None: max(10, n_trials // 10), 20 without a trial count.
    max_failures: int | None = None

    @property
    def failure_limit(self) -> int:
        return self.max_failures if self.max_failures is not None else max(10, (self.n_trials or 200) // 10)

    @property
    def total(self) -> int:
        return self.n_trials if self.n_trials is not None else UNLIMITED_TRIALS

    def describe(self) -> str:
        """"30 trials x 25 epochs", "trials for 10m x 25 epochs", "30 trials or 10m x 25 epochs"."""
        if self.n_trials is None:
            count = f"trials for {duration(self.timeout)}" if self.timeout else "trials"
        else:
            count = f"{self.n_trials} trials" + (f" or {duration(self.timeout)}" if self.timeout else "")
        return f"{count} x {self.epochs} epochs"


def duration(seconds: float | None) -> str:
    """Seconds as a person writes them: 90 -> 1m30s, 3600 -> 1h, 12.5 -> 12.5s."""
    if seconds is None:
        return "-"
    if seconds < 59.95:  # at most 3 significant digits, never an exponent ("4.2e-05s")
        digits = 2 if seconds < 10 else 1
        return f"{seconds:.{digits}f}".rstrip("0").rstrip(".") + "s"
    whole = int(round(seconds))
    h, rest = divmod(whole, 3600)
    m, s = divmod(rest, 60)
    return "".join(f"{v}{u}" for v, u in ((h, "h"), (m, "m"), (s, "s")) if v)


@dataclass(frozen=True)
class ExecutionSpec:
    """How trials run, not what they search: one at a time, or K fused into one batched model."""

    mode: str = "sequential"  # or "fused"
    group_size: int = 8
    # Fused only: trials of other widths and depths share a group, padded to its largest
    # (hpo.training.fused); off, only trials of the same width and depth share one. None ("auto"): pad
    # on a GPU, where a small MLP is launch-bound and padding is nearly free, not on a CPU,
    # where the padded arithmetic is real.
    pad: bool | None = None
    # Worker processes of one `hpo run` (its slots). None ("auto"): one per CPU core, each on one
    # thread (small models leave a second intra-op thread idle), or one per listed GPU.
    workers: int | None = None
    # Each trial's reported curves also as TensorBoard event files, under
    # <artifacts>/tensorboard/<study>/trial-<N> (the `tensorboard` extra).
    tensorboard: bool = False
    # Processes per trial (distributed data-parallel inside a trial, hpo.runtime.ranks): rank 0
    # owns the Optuna trial; on a CPU the worker's threads are split between the ranks, with GPUs
    # each rank gets one of the worker's.
    processes_per_trial: int = 1

    def pads(self, device_type: str) -> bool:
        return self.pad if self.pad is not None else device_type == "cuda"


@dataclass(frozen=True)
class Objective:
    """One of the values a trial is judged on: a validation metric, or one hpo measures (MEASURED)."""

    name: str
    direction: str

    @property
    def per_epoch(self) -> bool:
        return self.name not in MEASURED


@dataclass(frozen=True)
class Constraint:
    """A bound on a metric; a trial outside it is infeasible (Optuna's set_constraint: value <= 0)."""

    metric: str
    min: float | None = None
    max: float | None = None

    @property
    def key(self) -> str:
        return f"{self.metric}{'>=' + format(self.min, 'g') if self.min is not None else ''}" \
               f"{'<=' + format(self.max, 'g') if self.max is not None else ''}"

    def excess(self, value: float) -> float:
        """How far `value` is outside the bound (<= 0 inside it), as Optuna's constraints count."""
        over = value - self.max if self.max is not None else -math.inf
        under = self.min - value if self.min is not None else -math.inf
        return max(over, under)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"metric": self.metric}
        if self.min is not None:
            out["min"] = self.min
        if self.max is not None:
            out["max"] = self.max
        return out


@dataclass(frozen=True)
class WarmStart:
    """Start from another study's best configurations (enqueued once, counted in the budget)."""

    study: str
    top: int = 5


@dataclass(frozen=True)
class StudySpec:
    name: str
    metric: str  # the metric reported every epoch and pruned on (`prune_on` with several objectives)
    direction: str  # its direction
    data: DataSpec | None  # None when a `train` function brings its own data
    space: tuple[ParamSpec, ...]
    seed: int = 0
    model: str = "mlp"  # mlp, cnn, or the user's factory `module:function`
    description: str = ""
    train: str | None = None  # the user's training function, `module:function` or `file.py:function`
    test: str | None = None  # the user's test-scoring function, called once on the best trial
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    pruner: PrunerSpec = field(default_factory=PrunerSpec)
    budget: BudgetSpec = field(default_factory=BudgetSpec)
    execution: ExecutionSpec = field(default_factory=ExecutionSpec)
    search: SearchSpec = field(default_factory=SearchSpec)
    # Several objectives (`metric:` as a list); empty: the one objective is `metric` itself.
    objectives: tuple[Objective, ...] = ()
    constraints: tuple[Constraint, ...] = ()
    latency_batch_size: int = 1  # samples per timed forward pass for latency_ms
    enqueue: tuple[Mapping[str, Any], ...] = ()  # known configurations, run first, once
    warm_start: WarmStart | None = None
    test_top: int | None = None  # several objectives: test-score the front's first K (None: all of it)
    source: str = field(default="<spec>", compare=False)

    @property
    def goals(self) -> tuple[Objective, ...]:
        """What a trial's value(s) are, in order: the study's objectives."""
        return self.objectives or (Objective(self.metric, self.direction),)

    @property
    def plain(self) -> bool:
        """One objective, the per-epoch metric, no constraints: the trial's value is its metric."""
        return self.goals == (Objective(self.metric, self.direction),) and not self.constraints

    @property
    def multi_objective(self) -> bool:
        return len(self.goals) > 1

    @property
    def measures(self) -> tuple[str, ...]:
        """What hpo measures once a trial has trained: objectives and constrained metrics in MEASURED."""
        names = [o.name for o in self.goals] + [c.metric for c in self.constraints]
        return tuple(n for n in MEASURED if n in names)

    @property
    def task(self) -> str:
        if self.metric in METRICS:
            return METRICS[self.metric][1]
        return self.data.task if self.data is not None else "custom"

    @property
    def builtin_data(self) -> DataSpec:
        """The data of a study trained by hpo's own loop (every spec without `train`)."""
        assert self.data is not None, "a study with a train function has no data section"
        return self.data

    def param(self, name: str) -> ParamSpec | None:
        return next((p for p in self.space if p.name == name), None)

    def with_budget(self, **changes: Any) -> StudySpec:
        """A copy with budget fields replaced (CLI overrides such as --n-trials)."""
        values = {k: getattr(self.budget, k) for k in BudgetSpec.__dataclass_fields__}
        values.update({k: v for k, v in changes.items() if v is not None})
        return replace(self, budget=BudgetSpec(**values))

    @staticmethod
    def stored_metric(stored: dict[str, Any]) -> str:
        """The per-epoch metric of a spec in its stored form (to_dict), read without checking the
        whole spec (which builds its sampler: the read-only commands do not import optuna)."""
        return str(stored["prune_on"] if isinstance(stored.get("metric"), list) else stored.get("metric", "value"))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form, stored in the study so a worker needs no file."""
        out: dict[str, Any] = {"name": self.name, "description": self.description}
        if self.objectives:
            out["metric"] = [{"name": o.name, "direction": o.direction} for o in self.objectives]
            out["prune_on"] = self.metric
        else:
            out |= {"metric": self.metric, "direction": self.direction}
        out["seed"] = self.seed
        if self.constraints:
            out["constraints"] = [c.to_dict() for c in self.constraints]
        if "latency_ms" in self.measures:
            out["latency_batch_size"] = self.latency_batch_size
        if self.train is not None:
            out["train"] = self.train
        else:
            out["model"] = self.model
            out["data"] = self.builtin_data.to_dict()
        if self.test is not None:
            out["test"] = self.test
        if self.enqueue:
            out["enqueue"] = [dict(e) for e in self.enqueue]
        if self.warm_start is not None:
            out["warm_start"] = {"study": self.warm_start.study, "top": self.warm_start.top}
        if self.test_top is not None:
            out["test_top"] = self.test_top
        if self.search.segmented:
            out["search"] = self.search.to_dict()
        return out | {
            "space": {p.name: p.to_dict() for p in self.space},
            "sampler": {"name": self.sampler.name, **self.sampler.kwargs},
            "pruner": {"name": self.pruner.name, **self.pruner.kwargs},
            "budget": {
                "n_trials": self.budget.n_trials,
                "epochs": self.budget.epochs,
                "timeout": self.budget.timeout,
                "trial_timeout": self.budget.trial_timeout,
            } | ({} if self.budget.max_failures is None else {"max_failures": self.budget.max_failures}),
            "execution": {"mode": self.execution.mode, "group_size": self.execution.group_size,
                          "pad": "auto" if self.execution.pad is None else self.execution.pad,
                          "workers": "auto" if self.execution.workers is None else self.execution.workers,
                          **({"tensorboard": True} if self.execution.tensorboard else {}),
                          **({"processes_per_trial": self.execution.processes_per_trial}
                             if self.execution.processes_per_trial > 1 else {})},
        }

    def search_definition(self) -> dict[str, Any]:
        """What makes two specs the same study: everything but the budget and the prose."""
        d = self.to_dict()
        for key in ("budget", "description", "execution", "enqueue", "warm_start", "test_top"):
            d.pop(key, None)
        for entry in d["space"].values():  # a prior steers which trials come next, not what is searched
            if isinstance(entry, dict):
                entry.pop("prior", None)
        return d
