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
from hpo.train import Diverged, EpochResult, TimeLimit, Trainer, metric_value


class Listener:
    """Progress hooks for a front end (the CLI's progress bar); the default does nothing."""

    def trial_started(self, number: int, params: Params, resumed_epoch: int) -> None: ...

    def epoch_done(self, number: int, result: EpochResult, value: float) -> None: ...

    def trial_finished(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None: ...


def original_number(trial: optuna.Trial) -> int:
    """The number of the first attempt of this trial: retries share its seed and checkpoint."""
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
    checkpoint_every: int = 1
    # Called first thing in every trial: the trial now exists in the storage (the worker
    # releases its budget lock here).
    on_start: Callable[[], None] = lambda: None

    def __call__(self, trial: optuna.Trial) -> float:
        self.on_start()
        params = suggest(trial, self.spec)
        number = original_number(trial)
        try:
            return self._train(trial, params, number)
        except optuna.TrialPruned:
            self.artifacts.remove_checkpoint(number)
            raise
        except TrialError:
            raise
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

    def _train(self, trial: optuna.Trial, params: Params, number: int) -> float:
        seed = trial_seed(self.spec.seed, number)
        torch.manual_seed(seed)
        data = self.data.get(params.scaling)
        model = build_model(self.spec.model, params, data.input_shape, data.n_outputs)
        trainer = Trainer(model, params, data, self.spec.budget.epochs, self.device, seed)
        checkpoint = self.artifacts.load_checkpoint(number)
        if checkpoint is not None:
            trainer.load_state_dict(checkpoint)
            trial.set_user_attr("resumed_from_epoch", trainer.epoch)
        self.listener.trial_started(trial.number, params, trainer.epoch)
        limit = self.spec.budget.trial_timeout
        trainer.deadline = time.monotonic() + limit if limit else None
        value = float("nan")

        def on_epoch(r: EpochResult) -> None:
            nonlocal value
            value = metric_value(self.spec.metric, r.val)
            trial.report(value, r.epoch)
            if trainer.epoch % self.checkpoint_every == 0 and trainer.epoch < trainer.epochs:
                self.artifacts.save_checkpoint(number, trainer.state_dict())
            self.listener.epoch_done(trial.number, r, value)
            if trial.should_prune():
                trial.set_user_attr(
                    "reason", f"pruned by the {self.spec.pruner.name} rule at epoch {r.epoch}"
                )
                raise optuna.TrialPruned(f"pruned at epoch {r.epoch}")

        try:
            trainer.fit(on_epoch)
        except Diverged as e:
            trial.set_user_attr("reason", f"diverged: {e}")
            raise optuna.TrialPruned(f"diverged: {e}") from None
        except TimeLimit:
            trial.set_user_attr(
                "reason", f"trial_timeout: stopped after {limit:g} s in epoch {trainer.epoch}"
            )
            raise optuna.TrialPruned("trial_timeout") from None
        finally:
            _record(trial, trainer, self.device)
        state = {"model": trainer.model.state_dict(), "params": params.to_dict()}
        self.artifacts.upload(trial, "model.pt", state)
        self.artifacts.remove_checkpoint(number)
        return value


def _record(trial: optuna.Trial, trainer: Trainer, device: torch.device) -> None:
    """Curves and facts a user looks at on the trial's page; written once, at the end."""
    trial.set_user_attr("train_loss", [round(v, 6) for v in trainer.train_losses])
    trial.set_user_attr("epoch_seconds", [round(v, 4) for v in trainer.epoch_seconds])
    trial.set_user_attr("device", str(device))
    trial.set_user_attr("n_params", count_parameters(trainer.model))


def _is_storage_error(e: BaseException) -> bool:
    """Database errors are the worker's problem (retry or stop), not a verdict on the trial."""
    try:
        from sqlalchemy.exc import SQLAlchemyError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(e, SQLAlchemyError)

