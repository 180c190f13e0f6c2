"""The storage `hpo proxy` serves: a study's trial budget is checked where its trials are created.

A worker on a database holds a named lock (BudgetLock) from "is there budget left?" until its new
trial exists. A worker behind the gRPC proxy has no database connection to take that lock on, so
two such workers could both see the last slot free and both start a trial. Every fresh trial is
created by the proxy, so the proxy checks there: under a lock of its own, and the database's lock
too, for other proxies or workers that reach the database directly. A refused worker sees
NO_BUDGET_LEFT in the error and stops as if it had found the budget spent itself.
"""

from __future__ import annotations

import threading
from typing import Any

from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial

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

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        if template_trial is not None:
            return self._backend.create_new_trial(study_id, template_trial)
        with self._lock:
            db_lock = self._db_locks.setdefault(study_id, BudgetLock(self._backend, study_id))
            db_lock.acquire()
            try:
                total = self._total(study_id)
                if total is not None:
                    status = count_budget(self._backend.get_all_trials(study_id, deepcopy=False), total)
                    if status.remaining <= 0:
                        raise BudgetSpent()
                return self._backend.create_new_trial(study_id)
            finally:
                db_lock.release()

    def _total(self, study_id: int) -> int | None:
        stored = self._backend.get_study_user_attrs(study_id).get(SPEC_ATTR)
        if stored is None:
            return None
        return effective_n_trials(spec_from_mapping(stored, f"study {study_id}"))
