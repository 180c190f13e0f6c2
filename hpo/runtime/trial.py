"""`hpo.Trial`, the handle every training function gets, and the record the runtime keeps behind it.

The user's `train(trial)` and hpo's own loop (hpo.training.builtin) are called the same way and get the
same handle: `params`, `device`, `epochs`, `start_epoch`, `report()`, `save_checkpoint()`,
`load_checkpoint()`, `check()`. What they report is kept in a `TrialRecord`, which the runtime
(hpo.runtime.runner) reads when the trial ends, so every ending leaves the same state, reason and
attributes whoever wrote the loop.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import optuna
import torch

from hpo.data import seeding
from hpo.runtime import stopping
from hpo.runtime.checkpoints import Envelope, unsafe_part
from hpo.runtime.endings import CheckpointPolicy, Deadlines, Diverged, Ending
from hpo.runtime.lifecycle import trial_attributes
from hpo.runtime.listener import Listener
from hpo.runtime.measure import count_parameters, latency_ms
from hpo.runtime.pruning import REFRESH, Peers, Pruning, comparable, decides_from_values
from hpo.runtime.tensorboard import CurveWriter, folder
from hpo.spec.schema import StudySpec
from hpo.spec.user_code import UserCodeError
from hpo.storage.artifacts import Artifacts
from hpo.storage.resilient import report_all

# Attributes the runtime writes itself: a metric may not take these names.
RESERVED = ("epoch_seconds", "device", "threads", "reason", "traceback", "resumed_from_epoch", "n_params", "latency_ms",
            "train_seconds")


class TrialPruned(optuna.TrialPruned):
    """Raised by `Trial.report()` when the pruner stops the trial. Let it propagate (a training
    function may also raise it itself to stop a trial by its own rule)."""


@dataclass
class TrialContext:
    """What a worker gives every trial it runs."""

    spec: StudySpec
    artifacts: Artifacts
    device: torch.device
    listener: Listener = field(default_factory=Listener)
    policy: CheckpointPolicy = field(default_factory=lambda: CheckpointPolicy(2.0))
    study_deadline: float | None = None  # time.monotonic(): trials still running then are requeued
    who: str = "train"  # names the training code in messages: "train: pkg.mod:train"
    label_output: bool = False  # several workers share the terminal: what a trial prints says its number
    # How another process of a multi-process trial gets the training function (a picklable
    # top-level function: it runs there): see hpo.runtime.ranks.
    resolve: Callable[[StudySpec, torch.device], Callable[[Trial], Any]] | None = None


def trial_seed(study_seed: int, number: int) -> int:
    return (study_seed * 1_000_003 + number) % (2**63)


class TrialRecord:
    """What the runtime keeps of one trial while its code runs: reports (written in batches),
    curves, measurements, attributes, time limits, the last checkpoint. `optuna_trial` is None for
    a test function, which only reads the best trial's final `state`."""

    def __init__(self, ctx: TrialContext, number: int, optuna_trial: optuna.Trial | None,
                 envelope: Envelope | None = None, inherited: dict[int, float] | None = None,
                 state: Any = None, until: int | None = None) -> None:
        self.ctx = ctx
        self.trial = optuna_trial
        # The study's number for this trial, as hpo's lines, `hpo trials` and the dashboard show it;
        # a retry is a new trial that keeps its first attempt's seed and checkpoint.
        self.number = optuna_trial.number if optuna_trial is not None else number
        self.first_number = number
        # A population member's segment (search.strategy pbt) ends before the budget's last epoch.
        self.epochs = until if until is not None else ctx.spec.budget.epochs
        self.start_epoch = envelope.epoch if envelope else 0
        self.state: Any = envelope.state if envelope else state
        self.curves: dict[str, list[float]] = envelope.curves if envelope else {}
        self.epoch_seconds: list[float] = envelope.epoch_seconds if envelope else []
        self.reported = frozenset(inherited or ())  # epochs an earlier attempt reported (inherited by this retry)
        self.values: dict[int, float] = dict(inherited or {})  # every intermediate value, written or not yet
        self.pending: list[tuple[int, float]] = []  # reports not written yet (at most REFRESH s old)
        # Optuna's should_prune() refuses a study of several objectives: hpo prunes those itself,
        # on the `prune_on` metric's curve.
        self.pruning = (Pruning(optuna_trial, ctx.spec.direction) if optuna_trial is not None and (
            decides_from_values(optuna_trial.study.pruner) or ctx.spec.multi_objective) else None)
        self.measured: dict[str, float] = {}  # n_params, latency_ms: trial.measure()
        self.last: int | None = None  # the last epoch reported
        self.attrs: dict[str, Any] = {}
        self.returned: dict[str, Any] = {}
        self.last_report = self.flushed = self.last_checkpoint = time.monotonic()
        self.checkpointed_epoch = self.start_epoch
        self.deadlines = Deadlines.start(ctx.spec.budget.trial_timeout, ctx.study_deadline)
        self.tensorboard = (CurveWriter(folder(ctx.artifacts.path, ctx.spec.name, number))
                            if ctx.spec.execution.tensorboard and optuna_trial is not None else None)

    # ---- what the handle's calls do ------------------------------------------------------------

    def report(self, epoch: Any, metrics: dict[str, Any]) -> None:
        trial = self.training("report")
        stopping.raise_if_requested()
        values = self._check_report(epoch, metrics)
        epoch = int(epoch)
        now = time.monotonic()
        self.epoch_seconds.append(now - self.last_report)
        if self.tensorboard is not None:
            self.tensorboard.add(epoch, values, now - self.last_report)
        self.last_report = now
        for name, v in values.items():
            self.curves.setdefault(name, []).append(v)
        self.last = epoch
        for name, v in values.items():
            if not math.isfinite(v):
                raise Diverged(name, v, epoch)
        value = values[self.ctx.spec.metric]
        if epoch not in self.reported:
            # Written together, at most REFRESH s late (sooner before a checkpoint or the trial's end):
            # one commit per epoch is the largest storage cost of a small model's trial.
            self.values[epoch] = value
            self.pending.append((epoch, value))
            if self.pruning is None or now - self.flushed >= REFRESH:
                self.flush_reports()
        self.ctx.listener.epoch_done(trial.number, epoch, value)
        # After the last epoch the work is done: no time limit or pruner throws a result away.
        if epoch + 1 < self.epochs:
            self.deadlines.check(epoch)
            pruned = (self.pruning.should_prune(self.values, self.flush_reports, self._peers())
                      if self.pruning is not None else trial.should_prune())
            if pruned:
                raise TrialPruned(Ending.pruned(self.ctx.spec.pruner.name, epoch).reason)

    def _peers(self) -> Peers | None:
        """With several objectives, the trials this one is pruned against: see pruning.comparable."""
        spec = self.ctx.spec
        known = {o.name: (o.direction, self.measured[o.name]) for o in spec.goals
                 if o.name in self.measured and o.name != spec.metric}
        return comparable(known) if spec.multi_objective and known else None

    def save_checkpoint(self, state: Any, deadlines: bool = True) -> None:
        """`deadlines=False` (a trial of several processes): time limits are decided at report(),
        where every rank hears the decision before its next collective."""
        self.training("save_checkpoint")
        stopping.raise_if_requested()
        done = self.epoch_in_flight()
        self.state = state
        if not callable(state):
            self._checked(state)
        if done < self.epochs and self.ctx.policy.due(self.last_checkpoint):
            self._write_checkpoint(done)
        if done < self.epochs and deadlines:
            self.deadlines.check(done)

    def keep_segment(self) -> None:
        """A population member's segment is done: its last state is written whole, for the segments
        that continue from it (search.strategy pbt), or refused in one line when it saved none."""
        if self.state is None:
            raise UserCodeError(f"{self.ctx.who}: search.strategy pbt: a member continues from its checkpoint, and "
                                f"this one saved none by epoch {self.epoch_in_flight()}; call "
                                "trial.save_checkpoint(state) every epoch and trial.load_checkpoint() first")
        self._write_checkpoint(self.epoch_in_flight())

    def _write_checkpoint(self, done: int) -> None:
        """The state saved last, written whole with what a retry resumes from (`done` epochs)."""
        self.flush_reports()  # a retry resumes here and inherits the reports: none may be missing
        t0 = time.monotonic()
        envelope = Envelope(done, self.final_state(), self.curves, self.epoch_seconds, seeding.capture())
        self.ctx.artifacts.save_checkpoint(self.first_number, envelope.to_dict())
        self.last_checkpoint = time.monotonic()
        self.ctx.policy.cost = self.last_checkpoint - t0
        self.checkpointed_epoch = done

    def check(self, epoch: int | None) -> None:
        stopping.raise_if_requested()
        self.deadlines.check(self.epoch_in_flight() if epoch is None else epoch)

    def measure(self, model: torch.nn.Module, example: Any, device: torch.device) -> None:
        self.measured["n_params"] = self.attrs["n_params"] = count_parameters(model)
        if example is not None and "latency_ms" in self.ctx.spec.measures:
            if not isinstance(example, torch.Tensor):
                raise UserCodeError(f"{self.ctx.who}: measure(model, example): example must be a tensor of "
                                    f"inputs, not {type(example).__name__}")
            ms = latency_ms(model, example, self.ctx.spec.latency_batch_size, device)
            self.measured["latency_ms"] = self.attrs["latency_ms"] = round(ms, 6)

    def training(self, what: str) -> optuna.Trial:
        if self.trial is None:
            raise UserCodeError(f"{self.ctx.who}: {what}() is for training; a test function returns its scores")
        return self.trial

    # ---- what the runtime reads ------------------------------------------------------------------

    def epoch_in_flight(self) -> int:
        return self.last + 1 if self.last is not None else self.start_epoch

    def flush_reports(self) -> None:
        if self.pending and self.trial is not None:
            report_all([(self.trial, v, e) for e, v in self.pending])
        self.pending = []
        self.flushed = time.monotonic()

    def close(self) -> None:
        """Everything reported is written (the storage, TensorBoard): the trial's code is done."""
        self.flush_reports()
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

    def final_state(self) -> Any:
        return self._checked(self.state()) if callable(self.state) else self.state

    def objective_values(self, returned: Any) -> list[float]:
        """The trial's values, one per objective: from what the function returned (a number, or a
        dict of metrics), else what hpo measured, else the metric's last report."""
        goals, who, metric = self.ctx.spec.goals, self.ctx.who, self.ctx.spec.metric
        if returned is not None and not isinstance(returned, Mapping):
            if len(goals) > 1:
                raise UserCodeError(f"{who}: returned a {type(returned).__name__}; with several objectives return "
                                    "nothing or a dict of metrics")
            if as_number(returned) is None:
                raise UserCodeError(f"{who}: returned a {type(returned).__name__}; return nothing, the value of "
                                    f"{metric}, or a dict of metrics")
            returned = {goals[0].name: returned}
        self.returned = dict(returned or {})
        return [self._final(o.name) for o in goals]

    def constraint_values(self) -> dict[str, float]:
        """Each constraint's excess over its bound (<= 0: satisfied), as Optuna's set_constraint takes it."""
        return {c.key: c.excess(self._final(c.metric)) for c in self.ctx.spec.constraints}

    def attributes(self, reason: str | None) -> dict[str, Any]:
        return trial_attributes(self.ctx.spec.metric, self.curves, self.epoch_seconds, self.ctx.device,
                                self.start_epoch, self.attrs, reason)

    # ---- checks --------------------------------------------------------------------------------

    def _final(self, name: str) -> float:
        who, spec = self.ctx.who, self.ctx.spec
        if name in self.returned:
            number = as_number(self.returned[name])
            if number is None:
                raise UserCodeError(f"{who}: returned {name}={self.returned[name]!r}; metrics must be numbers")
        elif name in self.measured:
            number = self.measured[name]
        elif name == "train_seconds":
            number = self.attrs["train_seconds"] = round(sum(self.epoch_seconds), 4)
        elif name in self.curves:
            number = self.curves[name][-1]
        elif name == "latency_ms":
            raise UserCodeError(f"{who}: latency_ms is an objective or constraint: call trial.measure(model, "
                                "example_batch) after training, or return it")
        elif name == "n_params":
            raise UserCodeError(f"{who}: n_params is an objective or constraint: call trial.measure(model) or "
                                "return it")
        elif spec.plain:
            raise UserCodeError(f"{who}: finished without reporting {name!r}; call "
                                f"trial.report(epoch, {name}=...) every epoch")
        else:
            raise UserCodeError(f"{who}: finished without reporting {name!r}, an objective or constraint of the "
                                f"study; report it (trial.report(epoch, {name}=...)) or return it in a dict")
        if not math.isfinite(number):
            raise Diverged(name, number, self.epoch_in_flight())
        return number

    def _checked(self, state: Any) -> Any:
        if (problem := unsafe_part(state)) is not None:
            raise UserCodeError(f"{self.ctx.who}: save_checkpoint(): {problem}; a checkpoint holds tensors, "
                                "numbers, text and lists/dicts of them (e.g. model.state_dict())")
        return state

    def _check_report(self, epoch: Any, metrics: dict[str, Any]) -> dict[str, float]:
        who, metric = self.ctx.who, self.ctx.spec.metric
        if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral):
            raise UserCodeError(f"{who}: report(): epoch must be an integer, not {type(epoch).__name__}")
        epoch = int(epoch)
        if self.last is not None and epoch <= self.last:
            raise UserCodeError(f"{who}: report(epoch={epoch}) after epoch {self.last}: each epoch is reported "
                                "once, in increasing order")
        if epoch < self.start_epoch:
            raise UserCodeError(f"{who}: report(epoch={epoch}): this attempt resumes at trial.start_epoch="
                                f"{self.start_epoch}; loop over range(trial.start_epoch, trial.epochs)")
        if epoch >= self.epochs and self.epochs < self.ctx.spec.budget.epochs:
            raise UserCodeError(f"{who}: report(epoch={epoch}): this segment of a population member trains epochs "
                                f"{self.start_epoch}..{self.epochs - 1}; loop over range(trial.start_epoch, "
                                "trial.epochs)")
        if epoch >= self.epochs:
            raise UserCodeError(f"{who}: report(epoch={epoch}): budget.epochs is {self.epochs}, so epochs run "
                                f"0..{self.epochs - 1}")
        if metric not in metrics:
            got = ", ".join(metrics) or "nothing"
            raise UserCodeError(f"{who}: report() needs the study's metric {metric!r} (got {got})")
        out: dict[str, float] = {}
        for name, value in metrics.items():
            if name in RESERVED:
                raise UserCodeError(f"{who}: report(): {name!r} is a name hpo uses itself; rename the metric")
            number = as_number(value)
            if number is None:
                raise UserCodeError(f"{who}: report(): {name} must be a number, not {type(value).__name__}")
            out[name] = number
        return out


class Trial:
    """One trial, as a training function sees it.

    ```
    def train(trial: hpo.Trial) -> None:
        model = Net(trial.params["channels"]).to(trial.device)
        state = trial.load_checkpoint()          # None, or what the last attempt saved
        for epoch in range(trial.start_epoch, trial.epochs):
            ...
            trial.report(epoch, val_accuracy=acc)   # raises hpo.TrialPruned when pruned
            trial.save_checkpoint({"model": model.state_dict()})
    ```
    """

    rank = 0  # with execution.processes_per_trial > 1: this process's place among the trial's
    world_size = 1

    def __init__(self, record: TrialRecord, params: dict[str, Any], link: Link | None = None) -> None:
        self.params = params
        self.device = record.ctx.device
        self.epochs = record.epochs
        self.number = record.number
        self.first_number = record.first_number  # the first attempt's number (this one's, unless a retry)
        self.seed = trial_seed(record.ctx.spec.seed, record.first_number)
        self.start_epoch = record.start_epoch
        self._record = record
        self._link = link
        if link is not None:
            self.world_size = link.world_size

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that owns the Optuna trial (what it reports is recorded)."""
        return self.rank == 0

    def __repr__(self) -> str:
        first = f", first_number={self.first_number}" if self.first_number != self.number else ""
        return f"hpo.Trial(number={self.number}{first}, params={self.params!r}, start_epoch={self.start_epoch})"

    def report(self, epoch: int, **metrics: Any) -> None:
        """Record this epoch's metrics. The study's metric goes to the pruner and the sampler, the
        others are kept per epoch as attributes. Raises hpo.TrialPruned when the pruner says stop,
        and ends the trial when a metric is NaN or infinite or a time limit has passed.

        In a trial of several processes call it on every rank at the same epochs: rank 0's values
        are recorded, and its decision (go on, pruned, stopped) is raised on every rank there."""
        self._guarded(lambda: self._record.report(epoch, metrics), at_report=True)

    def save_checkpoint(self, state: Any) -> None:
        """Keep `state` (tensors, numbers, text, and lists/dicts of them: e.g. state_dict()s) so a
        retried or resumed trial continues after the last reported epoch. Written when the
        checkpoint policy says it is due (`--checkpoint-interval`); the last one saved is the
        trial's final state, kept for the test function when the trial may be the best. `state`
        may also be a function returning it, called only when it is written. In a trial of several
        processes, rank 0's is kept (the other ranks' calls do nothing)."""
        self._guarded(lambda: self._record.save_checkpoint(state, deadlines=self._link is None))

    def load_checkpoint(self) -> Any:
        """None on a fresh trial; on a retry or resume, the last state saved. For a test function,
        the best trial's final state."""
        return self._record.state

    def check(self, epoch: int | None = None) -> None:
        """Stop here if the trial's or the study's time is up (hpo's own loop calls it every batch;
        call it inside long epochs to be stopped sooner than at the next report). In a trial of
        several processes stops and time limits are decided at report(), on every rank at once."""
        if self._link is not None:
            self._link.raise_if_failed()
            return
        self._record.check(epoch)

    def _guarded(self, call: Callable[[], None], at_report: bool = False) -> None:
        """A call that may end the trial on rank 0: the other ranks hear of its decision at their
        report() of the same epoch (`at_report`: going on is a decision too), or of a failed
        save_checkpoint() (time limits are decided at report() only) at their own
        save_checkpoint() or next report()."""
        if self._link is None:
            call()
            return
        self._link.raise_if_failed()
        try:
            call()
        except BaseException as e:
            self._link.decided(e, at_report)
            raise
        self._link.decided(None, at_report)

    def measure(self, model: torch.nn.Module, example: Any = None) -> None:
        """Record the model's parameter count and, when the study has a latency_ms objective or
        constraint and `example` (a batch of inputs) is given, its inference latency on the trial's
        device: the values of those objectives. Call it once the model is built (with several
        objectives the pruner then judges the trial among models no larger) and, for latency,
        with an example after training."""
        self._record.measure(model, example, self.device)

    def set_attr(self, key: str, value: Any) -> None:
        """A user attribute for this trial, written with the runtime's own when the trial ends."""
        self._record.attrs[key] = value


class Link(Protocol):
    """Rank 0's side of a trial of several processes (hpo.runtime.ranks.RankGroup), as the handle
    uses it."""

    world_size: int

    def raise_if_failed(self) -> None: ...

    def decided(self, error: BaseException | None, at_report: bool = True) -> None: ...


def as_number(value: Any) -> float | None:
    """A metric as a float: Python and NumPy numbers, one-element tensors; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, torch.Tensor):
        return float(value.detach()) if value.numel() == 1 else None
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, "item") and getattr(value, "size", None) == 1:  # a NumPy scalar
        return float(value.item())
    return None
