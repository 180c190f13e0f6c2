"""Pruning decisions that cost no storage round trip per epoch, for both trial paths.

Optuna's Trial.should_prune() re-reads the trial and every unfinished trial of the study at each
epoch. The pruners that look only at intermediate values (median, percentile, threshold, none)
need just the trial's own values, which the runtime holds, and the study's trials as they stood
a moment ago: one read of the study serves every decision for up to REFRESH seconds (a fused
round's members, or one trial's next epochs). Other pruners (successive halving, hyperband,
Wilcoxon) keep state in the trial's system attributes, so they go through Optuna as before.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from hpo._private import trial_id

REFRESH = 1.0  # seconds a read of the study serves pruning decisions (and reports wait to be written)

_FROM_VALUES = (optuna.pruners.MedianPruner, optuna.pruners.PercentilePruner, optuna.pruners.ThresholdPruner,
                optuna.pruners.NopPruner)


def decides_from_values(pruner: optuna.pruners.BasePruner) -> bool:
    """True for the pruners that read only intermediate values (their own subclasses excepted)."""
    return type(pruner) in _FROM_VALUES


class Snapshot:
    """The study as read once, for the pruner: it answers get_trials() and direction itself."""

    def __init__(self, study: optuna.Study) -> None:
        self._study = study
        self._trials = study.get_trials(deepcopy=False)
        self.taken = time.monotonic()
        self.direction = study.direction

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[FrozenTrial]:
        trials = [t for t in self._trials if states is None or t.state in states]
        return copy.deepcopy(trials) if deepcopy else trials

    @property
    def trials(self) -> list[FrozenTrial]:
        return self.get_trials()

    def frozen(self, tid: int) -> FrozenTrial:
        return next(t for t in self._trials if trial_id(t) == tid)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


class Pruning:
    """One trial's pruning decisions, from the values it reported and a snapshot of the study."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial
        self.snapshot: Snapshot | None = None

    def should_prune(self, values: dict[int, float]) -> bool:
        """`values`: every intermediate value of this trial (inherited ones included), the last
        one just reported; written to the storage or not yet."""
        study = self.trial.study
        if self.snapshot is None or time.monotonic() - self.snapshot.taken >= REFRESH:
            self.snapshot = Snapshot(study)
        t = self.trial
        frozen = FrozenTrial(number=t.number, state=optuna.trial.TrialState.RUNNING, value=None,
                             datetime_start=t.datetime_start, datetime_complete=None, params=t.params,
                             distributions=t.distributions, user_attrs={}, system_attrs={},
                             intermediate_values=dict(values), trial_id=trial_id(t))
        return bool(study.pruner.prune(self.snapshot, frozen))  # type: ignore[arg-type]
