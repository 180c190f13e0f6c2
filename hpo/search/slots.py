"""Taking a trial slot within the study's budget: the one call every worker makes to start trials.

Under the study's budget lock (hpo.storage.budget_lock.BudgetLock), held until the new trials exist,
so that workers never overshoot the budget: bring the worker's ledger of the study up to date
(hpo.storage.ledger: it looks only at the trials new or unfinished since), stop on the run's failures
(hpo.search.failures), count what is left (hpo.search.budget), fail trials whose heartbeat
stopped (they come back as retries, which are taken first), then create the trials.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import optuna
from optuna.storages import BaseStorage

from hpo._private import ask_new, storage_of, study_id
from hpo.errors import StorageError
from hpo.runtime import stopping
from hpo.runtime.lifecycle import end_stale
from hpo.runtime.stopping import STOP_ATTR
from hpo.search.budget import is_budget_spent, ledger_budget
from hpo.search.failures import FailureStop, verdict_of
from hpo.search.pbt import DONE, Decision, create, next_segment
from hpo.spec.schema import StudySpec
from hpo.storage.ledger import ledger_of
from hpo.search.study import stop_requests
from hpo.storage.budget_lock import BudgetLock
from hpo.storage.urls import mask


@dataclass
class Taken:
    """What `TrialSlots.take` started, and why it started no more (empty: it may be asked again)."""

    trials: list[optuna.Trial] = field(default_factory=list)
    stopped: str = ""  # for a person
    failure: FailureStop | None = None  # the run's failures stop it
    budget_reached: bool = False  # every trial of the budget is running or done
    busy: bool = False  # every member of a population is training or done: the next segment waits on one


class TrialSlots:
    """The study's trial slots, as one worker takes them."""

    def __init__(self, study: optuna.Study, total: int, since: float, failure_limit: int,
                 warn: Callable[[str], None] = lambda text: None, spec: StudySpec | None = None) -> None:
        self.study, self.total, self.since, self.failure_limit = study, total, since, failure_limit
        self.population = spec if spec is not None and spec.search.segmented else None  # its segments are decided here
        self.warn = warn  # what a person must hear (a trial past its retry cap)
        self.lock = BudgetLock(storage_of(study), study_id(study))
        self.stops = stop_requests(study)  # `hpo stop` asked after this worker started stops it

    def take(self, want: int = 1, may_start: Callable[[], bool] = lambda: True,
             started: Callable[[optuna.Trial], None] = lambda trial: None) -> Taken:
        """Create up to `want` trials while `may_start()` (this worker's own limits) allows.
        `started(trial)` runs under the lock for each (a fused worker samples there, so each new
        trial's sampling sees the ones before it)."""
        with self.lock:
            if stop_requests(self.study) != self.stops:
                # Read under the lock `hpo stop` takes to ask: no trial starts after it counted the running ones.
                stopping.request(stopping.BY_COMMAND)
                return Taken(stopped="stopped by hpo stop")
            ledger = ledger_of(self.study).read(since=self.since)  # the trials new or unfinished since the last take
            if (failure := verdict_of(ledger.ended(), ledger.retried, self.failure_limit)) is not None:
                return Taken(stopped=failure.reason, failure=failure)
            status = ledger_budget(ledger, self.total)
            left = max(0, status.remaining) + status.waiting  # ask() takes a queued trial first
            if status.running:  # a dead worker's trial is one of them: they come back as retries, taken first
                end_stale(self.study, self.warn)
            taken = Taken()
            waiting = status.waiting
            while len(taken.trials) < want and may_start():
                if waiting <= 0 and self.population is not None:  # its members' epochs are its budget
                    decision = next_segment(self.study, self.population)
                    if decision == DONE:
                        taken.stopped, taken.budget_reached = "every member of the population has trained", True
                        break
                    if not isinstance(decision, Decision):
                        taken.stopped, taken.busy = "every member of the population is training or done", True
                        break
                    create(self.study, decision)  # a WAITING trial with its lineage: the ask below takes it
                    waiting, left = waiting + 1, max(left, 1)
                if left <= 0 or (trial := self._ask(fresh=waiting <= 0)) is None:
                    taken.stopped, taken.budget_reached = f"study budget of {self.total} trials reached", True
                    break
                left, waiting = left - 1, waiting - 1
                taken.trials.append(trial)
                started(trial)
            return taken

    def _ask(self, fresh: bool) -> optuna.Trial | None:
        """A queued trial first (a retry, an enqueued one); `fresh`: none is queued (the ledger
        says so, read under the lock), so a new one without Optuna's pass over every trial."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "heartbeat is meant for optimize": the lifecycle beats
                return ask_new(self.study) if fresh else self.study.ask()
        except Exception as e:
            if not is_budget_spent(e):  # a gRPC proxy gave another worker the last trial
                raise
            return None

    def all_taken(self) -> bool:
        """Every trial of the budget is running or done (read without the lock)."""
        return ledger_budget(ledger_of(self.study).read(since=self.since), self.total).all_taken


def request_stop(storage: BaseStorage, name: str, storage_url: str) -> int:
    """`hpo stop`: every worker of the study stops at its next report and queues its trial; the
    next run or worker resumes. Asked under the lock trials are taken under, so the trials
    running then (how many: returned) are the ones stopped: a worker takes none after it."""
    from optuna.trial import TrialState

    try:
        sid = storage.get_study_id_from_name(name)
    except KeyError:
        raise StorageError(f"no study named {name!r} in {mask(storage_url)}") from None
    with BudgetLock(storage, sid):  # the lock workers take a trial under: none starts one while this counts
        count = storage.get_study_system_attrs(sid).get(STOP_ATTR, 0)
        storage.set_study_system_attr(sid, STOP_ATTR, (count if isinstance(count, int) else 0) + 1)
        return len(storage.get_all_trials(sid, deepcopy=False, states=(TrialState.RUNNING,)))
