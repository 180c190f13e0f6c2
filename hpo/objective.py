"""The Optuna objective: params -> model -> training loop -> per-epoch reports and pruning.

Every way a trial can end is decided here, and each leaves a reason a user can read in the
trial's attributes: pruned (by the pruner, diverged, or over its time limit), failed (out of
memory, or an unexpected error), or complete with its final weights saved.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import optuna
import torch

from hpo.artifacts import Artifacts
from hpo.data import DataCache
from hpo.errors import TrialError
from hpo.model import build_model, count_parameters
from hpo.params import Params
from hpo.space import suggest
from hpo.spec import StudySpec
from hpo.storage import set_user_attrs
from hpo.train import Diverged, EpochResult, StudyTimeout, TimeLimit, Trainer, metric_value


class Listener:
    """Progress hooks for a front end (the CLI's progress bar); the default does nothing."""

    def trial_started(self, number: int, params: Params, resumed_epoch: int) -> None: ...

    def epoch_done(self, number: int, result: EpochResult, value: float) -> None: ...

    def trial_finished(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None: ...


def original_number(trial: optuna.Trial) -> int:
    """The number of the first attempt of this trial: retries share its seed and checkpoint."""
    if not trial.params:  # a retry is created with its parameters; a fresh trial has none yet
        return trial.number
    attrs = trial.storage.get_trial_system_attrs(trial._trial_id)
    history = attrs.get("retry_history") or []
    return int(history[0]) if history else trial.number


def trial_seed(study_seed: int, number: int) -> int:
    return (study_seed * 1_000_003 + number) % (2**63)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower()
    )


@dataclass
class Objective:
    spec: StudySpec
    data: DataCache
    device: torch.device
    artifacts: Artifacts
    listener: Listener
    # A checkpoint at the end of an epoch once this many seconds passed since the last one: every
    # epoch of real workloads, but tiny epochs do not pay a file write each (0 = every epoch).
    checkpoint_interval: float = 2.0
    checkpointed_epoch: int = 0  # where the trial in flight would resume from
    # Called first thing in every trial: the trial now exists in the storage (the worker
    # releases its budget lock here).
    on_start: Callable[[], None] = lambda: None
    # The study's deadline (time.monotonic()): a trial still running then raises StudyTimeout.
    stop_at: float | None = None

    def __call__(self, trial: optuna.Trial) -> float:
        self.on_start()
        number = original_number(trial)  # before suggest(), which fills trial.params
        params = suggest(trial, self.spec)
        try:
            return self._train(trial, params, number)
        except optuna.TrialPruned:
            self.artifacts.remove_checkpoint(number)
            raise
        except (TrialError, StudyTimeout):
            raise  # StudyTimeout: the checkpoint stays; the worker queues the trial to resume
        except Exception as e:
            if _is_storage_error(e):
                raise  # the worker's problem (retry or stop), not a verdict on the trial
            if is_oom(e):
                reason = (
                    f"out of memory on {self.device} "
                    f"(batch_size={params.batch_size}, width={params.width}, depth={params.depth})"
                )
            else:
                reason = f"{type(e).__name__}: {e}"
                trial.set_user_attr("traceback", traceback.format_exc()[-4000:])
            trial.set_user_attr("reason", reason[:2000])
            self.artifacts.remove_checkpoint(number)  # failed trials are not retried
            raise TrialError(reason) from None
        # KeyboardInterrupt (Ctrl-C, SIGTERM) passes through: the checkpoint stays for the retry.

    _checkpoint_cost: float = 0.0

    def _due(self) -> float:
        """Seconds between checkpoints: the configured interval, stretched so that writing them
        never takes more than ~5% of the time (a big model's state on a fast epoch). An interval
        of 0 asks for every epoch, as documented, and gets it."""
        return checkpoint_due(self.checkpoint_interval, self._checkpoint_cost)

    def _train(self, trial: optuna.Trial, params: Params, number: int) -> float:
        seed = trial_seed(self.spec.seed, number)
        trainers = []
        for k, data in enumerate(self.data.folds(params.scaling)):  # one fold unless cv_folds
            torch.manual_seed(fold_seed(seed, k))
            model = build_model(self.spec.model, params, data.input_shape, data.n_outputs)
            trainers.append(Trainer(model, params, data, self.spec.budget.epochs, self.device, fold_seed(seed, k)))
        torch.manual_seed(seed)
        checkpoint = self.artifacts.load_checkpoint(number)
        if checkpoint is not None and "folds" in checkpoint:  # (a fused run's checkpoint restarts)
            for t, state in zip(trainers, checkpoint["folds"]):
                t.load_state_dict(state)
            trial.set_user_attr("resumed_from_epoch", trainers[0].epoch)
            # Epochs after the checkpoint that the first attempt reported are trained again; the
            # retry inherited their values, which Optuna keeps (it warns on a second report).
            reported = set(trial.storage.get_trial(trial._trial_id).intermediate_values)
        else:
            reported = set()
        self.checkpointed_epoch = trainers[0].epoch
        self.listener.trial_started(trial.number, params, trainers[0].epoch)
        limit = self.spec.budget.trial_timeout
        for t in trainers:
            t.deadline = time.monotonic() + limit if limit else None
            t.stop_at = self.stop_at
        epochs = self.spec.budget.epochs
        value = float("nan")
        last_checkpoint = time.monotonic()
        reason = None
        try:
            while trainers[0].epoch < epochs:
                results = [t.run_epoch() for t in trainers]
                # Cross-validation: the mean over folds is what is reported and pruned on.
                value = sum(metric_value(self.spec.metric, r.val) for r in results) / len(results)
                epoch = results[0].epoch
                if epoch not in reported:
                    trial.report(value, epoch)
                if trainers[0].epoch < epochs and time.monotonic() - last_checkpoint >= self._due():
                    t0 = time.monotonic()
                    self.artifacts.save_checkpoint(
                        number, {"epoch": trainers[0].epoch, "folds": [t.state_dict() for t in trainers]}
                    )
                    last_checkpoint = time.monotonic()
                    self._checkpoint_cost = last_checkpoint - t0
                    self.checkpointed_epoch = trainers[0].epoch
                self.listener.epoch_done(trial.number, results[0], value)
                # Pruning after the last epoch would save nothing and throw a finished result away.
                if trainers[0].epoch < epochs and trial.should_prune():
                    reason = f"pruned by the {self.spec.pruner.name} rule at epoch {epoch}"
                    raise optuna.TrialPruned(f"pruned at epoch {epoch}")
        except Diverged as e:
            reason = f"diverged: {e}"
            raise optuna.TrialPruned(reason) from None
        except TimeLimit:
            reason = f"trial_timeout: stopped after {limit:g} s in epoch {trainers[0].epoch}"
            raise optuna.TrialPruned("trial_timeout") from None
        finally:
            _record(trial, trainers, self.device, reason)
        if improves(trial.study, value):  # only a model that may be the best is worth keeping
            state = {"models": [t.model.state_dict() for t in trainers], "params": params.to_dict()}
            self.artifacts.upload(trial, "model.pt", state)
        self.artifacts.remove_checkpoint(number)
        return value


def checkpoint_due(interval: float, cost: float) -> float:
    """Seconds to wait between checkpoints that take `cost` seconds to write (0: every epoch)."""
    return 0.0 if interval == 0 else max(interval, 20 * cost)


def improves(study: optuna.Study, value: float) -> bool:
    """Whether `value` beats every completed trial so far (ties included), so its weights must be
    kept for the final test scoring; the others' weights are not saved."""
    try:
        best = study.best_value
    except ValueError:  # no completed trial yet
        return True
    return value >= best if study.direction == optuna.study.StudyDirection.MAXIMIZE else value <= best


def fold_seed(seed: int, fold: int) -> int:
    return seed if fold == 0 else (seed * 1009 + fold) % (2**63)


def record_attrs(
    train_losses: list[float], epoch_seconds: list[float], device: torch.device, n_params: int, reason: str | None
) -> dict[str, object]:
    """Curves and facts a user looks at on a trial's page (one at a time or fused), written once,
    at the end, in one commit, with the reason it was stopped early if it was."""
    attrs: dict[str, object] = {
        "train_loss": [round(v, 6) for v in train_losses],
        "epoch_seconds": [round(v, 4) for v in epoch_seconds],
        "device": str(device),
        "n_params": n_params,
    }
    if reason:
        attrs["reason"] = reason
    return attrs


def _record(trial: optuna.Trial, trainers: list[Trainer], device: torch.device, reason: str | None) -> None:
    n = len(trainers)
    losses = [sum(vals) / n for vals in zip(*(t.train_losses for t in trainers))]
    seconds = [sum(vals) for vals in zip(*(t.epoch_seconds for t in trainers))]
    attrs = record_attrs(losses, seconds, device, count_parameters(trainers[0].model), reason)
    if n > 1:
        attrs["cv_folds"] = n
    set_user_attrs(trial, attrs)


def _is_storage_error(e: BaseException) -> bool:
    """Database errors are the worker's problem (retry or stop), not a verdict on the trial."""
    try:
        from sqlalchemy.exc import SQLAlchemyError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(e, SQLAlchemyError)

