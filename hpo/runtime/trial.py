"""The trial runtime: `hpo.Trial`, the handle every training function gets, and the one place
where a one-at-a-time trial is run and ended.

The user's `train(trial)` and hpo's own loop (hpo.training.builtin) are called the same way and get the
same handle: `params`, `device`, `epochs`, `start_epoch`, `report()`, `save_checkpoint()`,
`load_checkpoint()`, `check()`. Every ending (complete, pruned, diverged, time limits, out of
memory, an exception, Ctrl-C) is decided by `TrialRunner` with hpo.runtime.endings, so it leaves the same
state, reason and attributes whoever wrote the loop.
"""

from __future__ import annotations

import math
import numbers
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

import optuna
import torch
from optuna.exceptions import UpdateFinishedTrialError

from hpo._private import trial_id
from hpo.errors import TrialError
from hpo.data import seeding
from hpo.runtime import stopping
from hpo.runtime.checkpoints import Envelope, unsafe_part
from hpo.runtime.endings import (
    ERROR_ATTR,
    CheckpointPolicy,
    Deadlines,
    Diverged,
    End,
    Ending,
    Stop,
    error_record,
    is_oom,
)
from hpo.runtime.listener import Listener
from hpo.runtime.output import TrialOutput
from hpo.runtime.tensorboard import CurveWriter, folder
from hpo.runtime.measure import count_parameters, latency_ms
from hpo.runtime.pruning import (
    REFRESH,
    Peers,
    Pruning,
    comparable,
    decides_from_values,
    dominates,
)
from hpo.spec.schema import StudySpec
from hpo.spec.space import sample
from hpo.spec.user_code import UserCodeError
from hpo.storage.artifacts import Artifacts
from hpo.storage.backends import report_all, set_user_attrs
from hpo.storage.retry import claim

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


def original_number(trial: optuna.Trial) -> int:
    """The number of the first attempt of this trial: retries share its seed and checkpoint."""
    if not trial.params:  # a retry is created with its parameters; a fresh trial has none yet
        return trial.number
    attrs = trial.storage.get_trial_system_attrs(trial_id(trial))
    history = attrs.get("retry_history") or []
    return int(history[0]) if history else trial.number


def trial_seed(study_seed: int, number: int) -> int:
    return (study_seed * 1_000_003 + number) % (2**63)


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

    def __init__(self, ctx: TrialContext, params: dict[str, Any], number: int,
                 optuna_trial: optuna.Trial | None, envelope: Envelope | None = None,
                 inherited: dict[int, float] | None = None) -> None:
        self.params = params
        self.device = ctx.device
        self.epochs = ctx.spec.budget.epochs
        # The study's number for this trial, as hpo's lines, `hpo trials` and the dashboard show it;
        # a retry is a new trial that keeps its first attempt's seed and checkpoint.
        self.number = optuna_trial.number if optuna_trial is not None else number
        self.first_number = number  # the first attempt's number (this one's, unless a retry)
        self.seed = trial_seed(ctx.spec.seed, number)
        self.start_epoch = envelope.epoch if envelope else 0
        self._ctx = ctx
        self._trial = optuna_trial
        self._state: Any = envelope.state if envelope else None
        self._curves: dict[str, list[float]] = envelope.curves if envelope else {}
        self._epoch_seconds: list[float] = envelope.epoch_seconds if envelope else []
        self._reported = frozenset(inherited or ())  # epochs an earlier attempt reported (inherited by this retry)
        self._values: dict[int, float] = dict(inherited or {})  # every intermediate value, written or not yet
        self._pending: list[tuple[int, float]] = []  # reports not written yet (at most REFRESH s old)
        # Optuna's should_prune() refuses a study of several objectives: hpo prunes those itself,
        # on the `prune_on` metric's curve.
        self._pruning = (Pruning(optuna_trial, ctx.spec.direction) if optuna_trial is not None and (
            decides_from_values(optuna_trial.study.pruner) or ctx.spec.multi_objective) else None)
        self._measured: dict[str, float] = {}  # n_params, latency_ms: trial.measure()
        self._last: int | None = None
        self._value: float | None = None
        self._attrs: dict[str, Any] = {}
        self._returned: dict[str, Any] = {}
        self._started = self._last_report = self._flushed = time.monotonic()
        self._last_checkpoint = self._started
        self.checkpointed_epoch = self.start_epoch
        self._deadlines = Deadlines.start(ctx.spec.budget.trial_timeout, ctx.study_deadline)
        self._tensorboard = (CurveWriter(folder(ctx.artifacts.path, ctx.spec.name, number))
                             if ctx.spec.execution.tensorboard and optuna_trial is not None else None)

    def __repr__(self) -> str:
        first = f", first_number={self.first_number}" if self.first_number != self.number else ""
        return f"hpo.Trial(number={self.number}{first}, params={self.params!r}, start_epoch={self.start_epoch})"

    # ---- the API -----------------------------------------------------------------------------

    def report(self, epoch: int, **metrics: Any) -> None:
        """Record this epoch's metrics. The study's metric goes to the pruner and the sampler, the
        others are kept per epoch as attributes. Raises hpo.TrialPruned when the pruner says stop,
        and ends the trial when a metric is NaN or infinite or a time limit has passed."""
        trial = self._training("report")
        stopping.raise_if_requested()
        metric = self._ctx.spec.metric
        values = self._check_report(epoch, metrics)
        now = time.monotonic()
        self._epoch_seconds.append(now - self._last_report)
        if self._tensorboard is not None:
            self._tensorboard.add(epoch, values, now - self._last_report)
        self._last_report = now
        for name, value in values.items():
            self._curves.setdefault(name, []).append(value)
        self._last = epoch
        for name, value in values.items():
            if not math.isfinite(value):
                raise Diverged(name, value, epoch)
        self._value = value = values[metric]
        if epoch not in self._reported:
            # Written together, at most REFRESH s late (sooner before a checkpoint or the trial's end):
            # one commit per epoch is the largest storage cost of a small model's trial.
            self._values[epoch] = value
            self._pending.append((epoch, value))
            if self._pruning is None or now - self._flushed >= REFRESH:
                self._flush_reports()
        self._ctx.listener.epoch_done(trial.number, epoch, value)
        # After the last epoch the work is done: no time limit or pruner throws a result away.
        if epoch + 1 < self.epochs:
            self._deadlines.check(epoch)
            pruned = (self._pruning.should_prune(self._values, self._flush_reports, self._peers())
                      if self._pruning is not None else trial.should_prune())
            if pruned:
                raise TrialPruned(Ending.pruned(self._ctx.spec.pruner.name, epoch).reason)

    def _peers(self) -> Peers | None:
        """With several objectives, the trials this one is pruned against: see pruning.comparable."""
        spec = self._ctx.spec
        known = {o.name: (o.direction, self._measured[o.name]) for o in spec.goals
                 if o.name in self._measured and o.name != spec.metric}
        return comparable(known) if spec.multi_objective and known else None

    def save_checkpoint(self, state: Any) -> None:
        """Keep `state` (tensors, numbers, text, and lists/dicts of them: e.g. state_dict()s) so a
        retried or resumed trial continues after the last reported epoch. Written when the
        checkpoint policy says it is due (`--checkpoint-interval`); the last one saved is the
        trial's final state, kept for the test function when the trial may be the best. `state`
        may also be a function returning it, called only when it is written."""
        self._training("save_checkpoint")
        stopping.raise_if_requested()
        done = self._last + 1 if self._last is not None else self.start_epoch
        self._state = state
        if not callable(state):
            self._checked(state)
        if done < self.epochs and self._ctx.policy.due(self._last_checkpoint):
            self._flush_reports()  # a retry resumes here and inherits the reports: none may be missing
            t0 = time.monotonic()
            envelope = Envelope(done, self._checked(state() if callable(state) else state), self._curves,
                                self._epoch_seconds, seeding.capture())
            self._ctx.artifacts.save_checkpoint(self.first_number, envelope.to_dict())
            self._last_checkpoint = time.monotonic()
            self._ctx.policy.cost = self._last_checkpoint - t0
            self.checkpointed_epoch = done
        if done < self.epochs:
            self._deadlines.check(done)

    def _flush_reports(self) -> None:
        if self._pending and self._trial is not None:
            report_all([(self._trial, v, e) for e, v in self._pending])
        self._pending = []
        self._flushed = time.monotonic()

    def _checked(self, state: Any) -> Any:
        if (problem := unsafe_part(state)) is not None:
            raise UserCodeError(f"{self._ctx.who}: save_checkpoint(): {problem}; a checkpoint holds tensors, "
                                "numbers, text and lists/dicts of them (e.g. model.state_dict())")
        return state

    def _final_state(self) -> Any:
        return self._checked(self._state()) if callable(self._state) else self._state

    def load_checkpoint(self) -> Any:
        """None on a fresh trial; on a retry or resume, the last state saved. For a test function,
        the best trial's final state."""
        return self._state

    def check(self, epoch: int | None = None) -> None:
        """Stop here if the trial's or the study's time is up (hpo's own loop calls it every batch;
        call it inside long epochs to be stopped sooner than at the next report)."""
        stopping.raise_if_requested()
        self._deadlines.check(self._epoch_in_flight() if epoch is None else epoch)

    def measure(self, model: torch.nn.Module, example: Any = None) -> None:
        """Record the model's parameter count and, when the study has a latency_ms objective or
        constraint and `example` (a batch of inputs) is given, its inference latency on the trial's
        device: the values of those objectives. Call it once the model is built (with several
        objectives the pruner then judges the trial among models no larger) and, for latency,
        with an example after training."""
        self._measured["n_params"] = self._attrs["n_params"] = count_parameters(model)
        if example is not None and "latency_ms" in self._ctx.spec.measures:
            if not isinstance(example, torch.Tensor):
                raise UserCodeError(f"{self._ctx.who}: measure(model, example): example must be a tensor of "
                                    f"inputs, not {type(example).__name__}")
            ms = latency_ms(model, example, self._ctx.spec.latency_batch_size, self.device)
            self._measured["latency_ms"] = self._attrs["latency_ms"] = round(ms, 6)

    def set_attr(self, key: str, value: Any) -> None:
        """A user attribute for this trial, written with the runtime's own when the trial ends."""
        self._attrs[key] = value

    # ---- runtime side ------------------------------------------------------------------------

    def _epoch_in_flight(self) -> int:
        return self._last + 1 if self._last is not None else self.start_epoch

    def _training(self, what: str) -> optuna.Trial:
        if self._trial is None:
            raise UserCodeError(f"{self._ctx.who}: {what}() is for training; a test function returns its scores")
        return self._trial

    def _check_report(self, epoch: Any, metrics: dict[str, Any]) -> dict[str, float]:
        who, metric = self._ctx.who, self._ctx.spec.metric
        if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral):
            raise UserCodeError(f"{who}: report(): epoch must be an integer, not {type(epoch).__name__}")
        epoch = int(epoch)
        if self._last is not None and epoch <= self._last:
            raise UserCodeError(f"{who}: report(epoch={epoch}) after epoch {self._last}: each epoch is reported "
                                "once, in increasing order")
        if epoch < self.start_epoch:
            raise UserCodeError(f"{who}: report(epoch={epoch}): this attempt resumes at trial.start_epoch="
                                f"{self.start_epoch}; loop over range(trial.start_epoch, trial.epochs)")
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
            number = _as_number(value)
            if number is None:
                raise UserCodeError(f"{who}: report(): {name} must be a number, not {type(value).__name__}")
            out[name] = number
        return out

    def _final_value(self, returned: Any) -> float:
        """The trial's value: the study's metric in what the function returned, else its last report."""
        metric = self._ctx.spec.metric
        if isinstance(returned, Mapping):
            if metric in returned:
                returned = returned[metric]
            else:
                returned = None
        if returned is not None:
            number = _as_number(returned)
            if number is None:
                raise UserCodeError(f"{self._ctx.who}: returned a {type(returned).__name__}; return nothing, the "
                                    f"value of {metric}, or a dict of metrics")
            if not math.isfinite(number):
                raise Diverged(metric, number, self._epoch_in_flight())
            return number
        if self._value is None:
            raise UserCodeError(f"{self._ctx.who}: finished without reporting {metric!r}; call "
                                f"trial.report(epoch, {metric}=...) every epoch")
        return self._value

    def _objective_values(self, returned: Any) -> list[float]:
        """The trial's values, one per objective: from what the function returned (a dict of
        metrics), else what hpo measured, else the metric's last report."""
        goals = self._ctx.spec.goals
        if returned is not None and not isinstance(returned, Mapping):
            if len(goals) > 1:
                raise UserCodeError(f"{self._ctx.who}: returned a {type(returned).__name__}; with several "
                                    "objectives return nothing or a dict of metrics")
            returned = {goals[0].name: returned}
        self._returned = dict(returned or {})
        return [self._final(o.name) for o in goals]

    def _constraint_values(self) -> dict[str, float]:
        """Each constraint's excess over its bound (<= 0: satisfied), as Optuna's set_constraint takes it."""
        return {c.key: c.excess(self._final(c.metric)) for c in self._ctx.spec.constraints}

    def _final(self, name: str) -> float:
        who = self._ctx.who
        if name in self._returned:
            number = _as_number(self._returned[name])
            if number is None:
                raise UserCodeError(f"{who}: returned {name}={self._returned[name]!r}; metrics must be numbers")
        elif name in self._measured:
            number = self._measured[name]
        elif name == "train_seconds":
            number = self._attrs["train_seconds"] = round(sum(self._epoch_seconds), 4)
        elif name in self._curves:
            number = self._curves[name][-1]
        elif name == "latency_ms":
            raise UserCodeError(f"{who}: latency_ms is an objective or constraint: call trial.measure(model, "
                                "example_batch) after training, or return it")
        elif name == "n_params":
            raise UserCodeError(f"{who}: n_params is an objective or constraint: call trial.measure(model) or "
                                "return it")
        else:
            raise UserCodeError(f"{who}: finished without reporting {name!r}, an objective or constraint of the "
                                f"study; report it (trial.report(epoch, {name}=...)) or return it in a dict")
        if not math.isfinite(number):
            raise Diverged(name, number, self._epoch_in_flight())
        return number

    def _attributes(self, reason: str | None) -> dict[str, Any]:
        return trial_attributes(self._ctx.spec.metric, self._curves, self._epoch_seconds, self.device,
                                self.start_epoch, self._attrs, reason)


def trial_attributes(metric: str, curves: Mapping[str, list[float]], epoch_seconds: list[float], device: Any,
                     resumed_from: int, extra: Mapping[str, Any], reason: str | None) -> dict[str, Any]:
    """What a user reads on a trial's page (one at a time or fused), written once, at the end, in one
    commit: every reported metric but the study's own (that is the trial's learning curve) per epoch,
    seconds per epoch, the device, and why it was stopped early if it was."""
    attrs: dict[str, Any] = {name: [round(v, 6) for v in values] for name, values in curves.items() if name != metric}
    attrs["epoch_seconds"] = [round(v, 4) for v in epoch_seconds]
    attrs["device"] = str(device)
    if resumed_from:
        attrs["resumed_from_epoch"] = resumed_from
    attrs.update(extra)
    if reason:
        attrs["reason"] = reason
    return attrs


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, torch.Tensor):
        return float(value.detach()) if value.numel() == 1 else None
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, "item") and getattr(value, "size", None) == 1:  # a NumPy scalar
        return float(value.item())
    return None


@dataclass
class TrialRunner:
    """The Optuna objective of every one-at-a-time trial: sample the parameters, run the training
    function with an hpo.Trial, and end the trial as hpo.runtime.endings decides."""

    ctx: TrialContext
    train_fn: Callable[[Trial], Any]
    # Called first thing in every trial: the trial now exists in the storage (the worker
    # releases its budget lock here).
    on_start: Callable[[], None] = lambda: None
    current: Trial | None = None
    # Set when the trial in flight was finished by another worker while this one was stopped
    # (frozen past the grace period, cut off): its number, for the worker to drop it and go on.
    taken_over: int | None = None
    output: TrialOutput | None = None  # the log of the trial in flight

    def __call__(self, ot: optuna.Trial) -> float | list[float]:
        with TrialOutput(self.ctx.artifacts, ot, self.ctx.label_output) as self.output:
            try:
                return self._run(ot)
            except UpdateFinishedTrialError:
                # Another worker failed this trial as stale and queued its retry: nothing more may be
                # written to it. Optuna's tell() then refuses too; the worker drops it and goes on.
                self.taken_over, self.current = ot.number, None
                raise

    def _run(self, ot: optuna.Trial) -> float | list[float]:
        self.on_start()
        claim(ot.storage, trial_id(ot))  # a kill -9 is seen at once
        ctx = self.ctx
        number = original_number(ot)  # before sample(), which fills ot.params
        params = sample(ot, ctx.spec)
        envelope = Envelope.from_dict(ctx.artifacts.load_checkpoint(number))
        # A retry inherited its first attempt's reports; the epochs it trains again are not re-sent.
        inherited = dict(ot.storage.get_trial(trial_id(ot)).intermediate_values) if number != ot.number else {}
        trial = self.current = Trial(ctx, params, number, ot, envelope, inherited)
        seeding.seed_all(trial.seed)
        if envelope is not None and envelope.rng is not None:
            seeding.restore(envelope.rng)  # the streams as they were when the checkpoint was saved
        trial.set_attr("threads", torch.get_num_threads())  # the worker's share of its host when it started
        ctx.listener.trial_started(ot.number, params, trial.start_epoch, None if number == ot.number else number)
        try:
            returned = self.train_fn(trial)
            stopping.raise_if_requested()  # the code swallowed the stop (except BaseException): obey it now
            if ctx.spec.plain:
                value: float | list[float] = trial._final_value(returned)
                constraints: dict[str, float] = {}
            else:
                value, constraints = trial._objective_values(returned), trial._constraint_values()
        except Stop as e:
            self._end(trial, e.ending)
        except optuna.TrialPruned as e:
            reason = str(e) if isinstance(e, TrialPruned) else f"pruned by {ctx.who}: {e}".rstrip(": ")
            self._end(trial, Ending(End.PRUNED, reason))
        except UpdateFinishedTrialError:
            raise
        except UserCodeError as e:
            self._record_end(trial, Ending(End.ERROR, str(e)))
            raise  # a mistake in the code, not in these parameters: every trial would fail the same way
        except SystemExit as e:
            if why := stopping.requested():  # a framework that exits on Ctrl-C (Lightning): the stop, obeyed
                self._record_end(trial, _interrupted(trial, why))
                raise KeyboardInterrupt from None
            epoch = trial._epoch_in_flight()
            self._record_end(trial, Ending(End.ERROR, f"{ctx.who}: called sys.exit({e.code!r}) in epoch {epoch}"))
            raise UserCodeError(f"{ctx.who}: called sys.exit({e.code!r}) in epoch {epoch}; a training function "
                                "returns (or raises) instead of exiting") from None
        except KeyboardInterrupt as e:
            if why := stopping.requested():  # a stop (Ctrl-C, SIGTERM, hpo stop): the worker queues the trial
                self._record_end(trial, _interrupted(trial, why))
                raise
            self._fail(trial, e, Ending(End.ERROR, "KeyboardInterrupt raised by the training code (no stop was "
                                                   "requested)"))
        except Exception as e:
            if _is_storage_error(e):
                raise  # the worker's problem (retry or stop), not a verdict on the trial
            self._fail(trial, e, Ending.out_of_memory(ctx.device, _sizes(params)) if is_oom(e) else Ending.error(e))
        self._complete(trial, ot, value, constraints)
        return value

    def _complete(self, trial: Trial, ot: optuna.Trial, value: float | list[float],
                  constraints: dict[str, float]) -> None:
        trial._flush_reports()
        if trial._tensorboard is not None:
            trial._tensorboard.close()
        set_user_attrs(ot, trial._attributes(None))
        for key, excess in constraints.items():
            ot.set_constraint(key, excess)
        feasible = all(v <= 0 for v in constraints.values())
        if trial._state is not None and feasible and improves(ot.study, value):
            # Only a trial that may be the best keeps its final state (the test function's input).
            self.ctx.artifacts.upload(ot, "model.pt", trial._final_state())
        self.ctx.artifacts.remove_checkpoint(trial.first_number)
        self.current = None

    def _fail(self, trial: Trial, e: BaseException, ending: Ending) -> NoReturn:
        """An exception in the training code: the trial fails with its reason, its traceback and
        the record that tells a bug (the same error trial after trial) from bad parameters."""
        if ending.end is End.ERROR:
            text = "".join(traceback.format_exception(e))
            trial.set_attr("traceback", text[-4000:])
            if self.output is not None:
                self.output.note(text)
        assert trial._trial is not None
        trial._trial.storage.set_trial_system_attr(trial_id(trial._trial), ERROR_ATTR, error_record(e))
        self._end(trial, ending)

    def _record_end(self, trial: Trial, ending: Ending) -> None:
        """Write why the trial ended, with its curves; drop its checkpoint unless it comes back."""
        assert trial._trial is not None
        if self.output is not None:
            self.output.footnote(f"[hpo] trial {trial.number}: {ending.reason or ending.end.value}")
        trial._flush_reports()
        if trial._tensorboard is not None:
            trial._tensorboard.close()
        set_user_attrs(trial._trial, trial._attributes(ending.reason))
        if not ending.end.requeued:
            self.ctx.artifacts.remove_checkpoint(trial.first_number)
            self.current = None

    def _end(self, trial: Trial, ending: Ending) -> NoReturn:
        """Record why the trial ended and raise what makes Optuna give it the ending's state."""
        self._record_end(trial, ending)
        if ending.end.requeued:
            raise Stop(ending)  # the worker queues the trial to resume from its checkpoint
        if ending.end.state == optuna.trial.TrialState.PRUNED:
            raise optuna.TrialPruned(ending.reason)
        raise TrialError(ending.reason or ending.end.value)


def _interrupted(trial: Trial, why: str) -> Ending:
    return Ending(End.INTERRUPTED, f"interrupted ({why}) in epoch {trial._epoch_in_flight()}; queued to resume "
                                   f"from epoch {trial.checkpointed_epoch}")


def _sizes(params: Mapping[str, Any]) -> str:
    """The parameters that size a model, for an out-of-memory reason."""
    keys = [k for k in ("batch_size", "width", "depth") if k in params] or list(params)[:6]
    return ", ".join(f"{k}={params[k]}" for k in keys)


def improves(study: optuna.Study, value: float | list[float]) -> bool:
    """Whether `value` beats every completed trial so far (ties included), so its final state must be
    kept for the test scoring; the others' are not saved. With several objectives: whether no trial
    on the Pareto front dominates it."""
    if isinstance(value, list):
        if len(value) > 1:
            return not any(dominates(t.values, value, study.directions) for t in study.best_trials)
        value = value[0]
    try:
        best = study.best_value
    except ValueError:  # no completed trial yet
        return True
    return value >= best if study.direction == optuna.study.StudyDirection.MAXIMIZE else value <= best


def _is_storage_error(e: BaseException) -> bool:
    """Database errors are the worker's problem (retry or stop), not a verdict on the trial."""
    try:
        from sqlalchemy.exc import SQLAlchemyError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(e, SQLAlchemyError)
