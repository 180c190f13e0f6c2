"""The storage `hpo proxy` serves: a study's trial budget is checked where its trials are created.

A worker on a database holds a named lock (BudgetLock) from "is there budget left?" until its new
trial exists. A worker behind the gRPC proxy has no database connection to take that lock on, so
two such workers could both see the last slot free and both start a trial. Every fresh trial is
created by the proxy, so the proxy checks there: under a lock of its own, and the database's lock
too, for other proxies or workers that reach the database directly. A refused worker sees
NO_BUDGET_LEFT in the error and stops as if it had found the budget spent itself.

Every worker reads the study several times a trial (the sampler, the pruner, the budget), and the
proxy answers each read from the database: with 64 workers those reads, not the trials, made the
proxy the bottleneck. Reads of one study that arrive while one is running wait for the next one,
which serves them all (BatchedReads): as many reads as the database can do one after another,
each started after the request it answers arrived, so a worker still reads its own writes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Container
from typing import Any

from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from hpo.search.budget import BudgetSpent, count_budget
from hpo.search.records import SPEC_ATTR
from hpo.search.samplers import effective_n_trials
from hpo.spec.loading import spec_from_mapping
from hpo.storage.budget_lock import BudgetLock


class BudgetedStorage:
    """Everything passes through to `backend` but the creation of a fresh trial past the budget.

    Trials created from a template (a heartbeat retry, an enqueued trial) are queued work, not
    new slots, and pass; so do trials of a study hpo did not create (it has no stored budget)."""

    def __init__(self, backend: BaseStorage) -> None:
        self._backend = backend
        self._lock = threading.Lock()  # the servicer runs requests on a thread pool
        self._db_locks: dict[int, BudgetLock] = {}
        self._reads = BatchedReads()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        import copy

        trials = self._reads.read(study_id, lambda: self._backend.get_all_trials(study_id, deepcopy=False))
        if states is not None:
            trials = [t for t in trials if t.state in states]
        return copy.deepcopy(trials) if deepcopy else list(trials)

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        if template_trial is not None:
            return self._backend.create_new_trial(study_id, template_trial)
        with self._lock:
            with self._db_locks.setdefault(study_id, BudgetLock(self._backend, study_id)):
                total = self._total(study_id)
                if total is not None:
                    status = count_budget(self._backend.get_all_trials(study_id, deepcopy=False), total)
                    if status.remaining <= 0:
                        raise BudgetSpent()
                return self._backend.create_new_trial(study_id)

    def _total(self, study_id: int) -> int | None:
        stored = self._backend.get_study_user_attrs(study_id).get(SPEC_ATTR)
        if stored is None:
            return None
        return effective_n_trials(spec_from_mapping(stored, f"study {study_id}"))


class BatchedReads:
    """One read at a time per key; a caller gets the result of a read that started after it
    arrived (never an older one), shared with every caller that arrived before that read began."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._started: dict[Any, int] = {}  # reads begun, per key
        self._running: set[Any] = set()
        self._done: dict[Any, tuple[int, Any, BaseException | None]] = {}  # the last read: number, result, error
        self.waiting: dict[Any, int] = {}  # callers waiting for a read, per key (what a test can watch)

    def read(self, key: Any, fn: Callable[[], Any]) -> Any:
        with self._cond:
            # The read that serves this call: the next to start (one running now began too early).
            wanted = self._started.get(key, 0) + 1
            while True:
                number, result, error = self._done.get(key, (0, None, None))
                if number >= wanted:
                    if error is not None:
                        raise error
                    return result
                if key not in self._running:
                    break
                self.waiting[key] = self.waiting.get(key, 0) + 1
                self._cond.wait()
                self.waiting[key] -= 1
            self._started[key] = number = self._started.get(key, 0) + 1
            self._running.add(key)
        result, error = None, None
        try:
            result = fn()
        except BaseException as e:
            error = e
        with self._cond:
            self._running.discard(key)
            self._done[key] = (number, result, error)
            self._cond.notify_all()
        if error is not None:
            raise error
        return result
