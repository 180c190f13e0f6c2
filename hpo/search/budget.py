"""The study's total budget, shared by every worker, and the trials that come back as retries.

The budget counts results: every worker counts complete, pruned, running and queued trials in the
storage before it starts another, so re-running a spec resumes, any number of workers stop at the
same total, and a re-run after failures produces the results still missing (failures are bounded
on their own: hpo.search.failures).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo._private import backend_of, heartbeat_enabled, storage_of
from hpo.storage.ledger import Ledger
from hpo.storage.retry import OWNER_ATTR, is_local_and_alive, resumed_by, retried_by


@dataclass(frozen=True)
class BudgetStatus:
    total: int
    finished: int  # COMPLETE + PRUNED
    failed: int  # FAIL and not queued for a retry: shown, not counted against the total
    running: int
    waiting: int  # queued retries (or enqueued trials)

    @property
    def remaining(self) -> int:
        return self.total - self.finished - self.running - self.waiting

    @property
    def all_taken(self) -> bool:
        """Every trial of the budget is running or done: none left to start, none queued."""
        return self.remaining <= 0 and self.waiting == 0


def retried_numbers(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of trials that live on in a retry (they do not count against the budget)."""
    return {n for t in trials for n in retried_by(t)}


def resumed_numbers(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of failed trials that were stopped under them (interrupted, a dead worker, a full
    disk) and live on in a retry that resumes them: not failures of their parameters."""
    return {n for t in trials if (n := resumed_by(t)) is not None}


def state_counts(trials: list[FrozenTrial]) -> dict[str, int]:
    """Trials by state as a person reads them: a failed trial that a retry resumes is RESUMED."""
    resumed = resumed_numbers(trials)
    return dict(Counter("RESUMED" if t.state == TrialState.FAIL and t.number in resumed else t.state.name
                        for t in trials))


def budget_status(study: optuna.Study, total: int) -> BudgetStatus:
    return count_budget(study.get_trials(deepcopy=False), total)


def ledger_budget(ledger: Ledger, total: int) -> BudgetStatus:
    """count_budget from a worker's ledger of the study (it looks only at the trials new or
    unfinished since its last read)."""
    finished, failed, running, waiting = ledger.counts()
    return BudgetStatus(total=total, finished=finished, failed=failed, running=running, waiting=waiting)


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


# A gRPC proxy refuses to create a trial past the budget (hpo.search.proxy); the worker sees this text in
# the error that comes back and stops as it would have had it seen the budget spent itself.
NO_BUDGET_LEFT = "hpo: no trial budget left in this study"


class BudgetSpent(RuntimeError):
    def __init__(self) -> None:
        super().__init__(NO_BUDGET_LEFT)


def is_budget_spent(error: BaseException) -> bool:
    return NO_BUDGET_LEFT in str(error)


def _heartbeat_enabled(study: optuna.Study) -> bool:
    return heartbeat_enabled(storage_of(study))


def wait_for_running(study: optuna.Study, say: Callable[[str], None] | None = None) -> bool:
    """With the budget used up but trials still RUNNING (elsewhere, or a dead worker's that will
    go stale and come back as a retry), wait a moment and say so, rather than leave one behind.
    Without heartbeats a dead worker's trial can never be told apart, so there is no waiting."""
    if not _heartbeat_enabled(study):
        return False
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if not running:
        return False
    numbers = tuple(t.number for t in running)
    if say is not None and _last_wait.get(id(study)) != numbers:
        _last_wait[id(study)] = numbers
        backend = backend_of(storage_of(study))  # Optuna wraps RDB storage in a cache
        grace = getattr(backend, "grace_period", None) or 2 * backend.get_heartbeat_interval()
        say(f"waiting for trial{'s' if len(numbers) > 1 else ''} {', '.join(map(str, numbers))}: running in "
            f"another worker, or its worker died and it is retried after {grace} s without a heartbeat")
    from hpo.runtime.lifecycle import (  # the ending of a trial, owned by the lifecycle
        end_orphans,
        end_stale,
    )

    end_stale(study, say or (lambda text: None))
    if end_orphans(study, say=say or (lambda text: None)):
        return True  # a killed process's trials are queued: take one now
    # Trials of live processes on this machine (a run's own workers) end within an epoch or so:
    # look often, or the run would sit idle after its last trial. Others: the heartbeat's pace.
    local = all(is_local_and_alive(t.system_attrs.get(OWNER_ATTR)) for t in running)
    time.sleep(0.1 if local else min(2.0, max(0.2, backend_of(storage_of(study)).get_heartbeat_interval() / 4)))
    return True


_last_wait: dict[int, tuple[int, ...]] = {}  # what was last said while waiting, per study
