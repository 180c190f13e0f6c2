"""Taking a trial slot within the study's budget: the one call every worker makes to start trials.

Under the study's budget lock (hpo.storage.budget_lock.BudgetLock), held until the new trials exist,
so that workers never overshoot the budget: read the trials once, stop on the run's failures
(hpo.search.failures), count what is left (hpo.search.budget), fail trials whose heartbeat
stopped (they come back as retries, which are taken first), then create the trials.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import optuna

from hpo._private import storage_of, study_id
from hpo.search.budget import count_budget, is_budget_spent
from hpo.search.failures import FailureStop, verdict
from hpo.storage.budget_lock import BudgetLock


@dataclass
class Taken:
    """What `TrialSlots.take` started, and why it started no more (empty: it may be asked again)."""

    trials: list[optuna.Trial] = field(default_factory=list)
    stopped: str = ""  # for a person
    failure: FailureStop | None = None  # the run's failures stop it
    budget_reached: bool = False  # every trial of the budget is running or done


class TrialSlots:
    """The study's trial slots, as one worker takes them."""

    def __init__(self, study: optuna.Study, total: int, since: float, failure_limit: int) -> None:
        self.study, self.total, self.since, self.failure_limit = study, total, since, failure_limit
        self.lock = BudgetLock(storage_of(study), study_id(study))

    def take(self, want: int = 1, may_start: Callable[[], bool] = lambda: True,
             started: Callable[[optuna.Trial], None] = lambda trial: None) -> Taken:
        """Create up to `want` trials while `may_start()` (this worker's own limits) allows.
        `started(trial)` runs under the lock for each (a fused worker samples there, so each new
        trial's sampling sees the ones before it)."""
        self.lock.acquire()
        try:
            trials = self.study.get_trials(deepcopy=False)
            if (failure := verdict(trials, self.since, self.failure_limit)) is not None:
                return Taken(stopped=failure.reason, failure=failure)
            status = count_budget(trials, self.total)
            left = max(0, status.remaining) + status.waiting  # ask() takes a queued trial first
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # experimental
                optuna.storages.fail_stale_trials(self.study)
            taken = Taken()
            while len(taken.trials) < want and may_start():
                if left <= 0 or (trial := self._ask()) is None:
                    taken.stopped, taken.budget_reached = f"study budget of {self.total} trials reached", True
                    break
                left -= 1
                taken.trials.append(trial)
                started(trial)
            return taken
        finally:
            self.lock.release()

    def _ask(self) -> optuna.Trial | None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "heartbeat is meant for optimize": the lifecycle beats
                return self.study.ask()
        except Exception as e:
            if not is_budget_spent(e):  # a gRPC proxy gave another worker the last trial
                raise
            return None

    def all_taken(self) -> bool:
        """Every trial of the budget is running or done (read without the lock)."""
        return count_budget(self.study.get_trials(deepcopy=False), self.total).all_taken
