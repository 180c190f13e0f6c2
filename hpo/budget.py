"""The study's total budget, shared by every worker, and the trials that come back as retries.

Every worker counts finished, running, queued and unretried failed trials in the storage before
it starts another, so re-running a spec resumes and any number of workers stop at the same total.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from dataclasses import dataclass

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState


@dataclass(frozen=True)
class BudgetStatus:
    total: int
    finished: int  # COMPLETE + PRUNED
    failed: int  # FAIL and not queued for a retry
    running: int
    waiting: int  # queued retries (or enqueued trials)

    @property
    def remaining(self) -> int:
        return self.total - self.finished - self.failed - self.running - self.waiting


def retried_numbers(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of trials that live on in a retry (they do not count against the budget)."""
    out: set[int] = set()
    for t in trials:
        out.update(int(n) for n in t.system_attrs.get("retry_history", ()))
    return out


def budget_status(study: optuna.Study, total: int) -> BudgetStatus:
    return count_budget(study.get_trials(deepcopy=False), total)


def count_budget(trials: list[FrozenTrial], total: int) -> BudgetStatus:
    counts = Counter(t.state for t in trials)
    retried = retried_numbers(trials)
    failed = sum(1 for t in trials if t.state == TrialState.FAIL and t.number not in retried)
    return BudgetStatus(
        total=total,
        finished=counts[TrialState.COMPLETE] + counts[TrialState.PRUNED],
        failed=failed,
        running=counts[TrialState.RUNNING],
        waiting=counts[TrialState.WAITING],
    )


# A gRPC proxy refuses to create a trial past the budget (hpo.proxy); the worker sees this text in
# the error that comes back and stops as it would have had it seen the budget spent itself.
NO_BUDGET_LEFT = "hpo: no trial budget left in this study"


class BudgetSpent(RuntimeError):
    def __init__(self) -> None:
        super().__init__(NO_BUDGET_LEFT)


def is_budget_spent(error: BaseException) -> bool:
    return NO_BUDGET_LEFT in str(error)


def _heartbeat_enabled(study: optuna.Study) -> bool:
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(study._storage)


def wait_for_running(study: optuna.Study) -> bool:
    """With the budget used up but trials still RUNNING (elsewhere, or a dead worker's that will
    go stale and come back as a retry), wait a moment and say so, rather than leave one behind.
    Without heartbeats a dead worker's trial can never be told apart, so there is no waiting."""
    if not _heartbeat_enabled(study):
        return False
    if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    time.sleep(min(2.0, max(0.2, study._storage.get_heartbeat_interval() / 4)))  # type: ignore[attr-defined]
    return True


def requeue(study: optuna.Study, trial_id: int) -> FrozenTrial | None:
    """Queue a retry of an interrupted trial, the way a heartbeat-stale trial is retried."""
    trial = study._storage.get_trial(trial_id)
    if trial.state != TrialState.FAIL:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)(study, trial)
    return trial
