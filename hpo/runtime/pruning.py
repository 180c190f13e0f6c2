"""Pruning decisions that cost no storage round trip per epoch, for both trial paths.

Optuna's Trial.should_prune() re-reads the trial and every unfinished trial of the study at each
epoch. The pruners that look only at intermediate values (median, percentile, threshold, none)
need just the trial's own values, which the runtime holds, and the study's trials as they stood
a moment ago: one read of the study serves every decision for up to REFRESH seconds (a fused
round's members, or one trial's next epochs). Other pruners (successive halving, hyperband,
Wilcoxon) keep state in the trial's system attributes, so they go through Optuna as before.
A percentile (median) pruner's reference at a step comes from the worker's ledger, which keeps
every complete trial's values as they finish (hpo.storage.ledger): a decision is Optuna's over the
whole study, at about the same cost at 100,000 trials as at 1,000.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from hpo._private import best_reported, checked_at, percentile_settings, trial_id
from hpo.storage.ledger import Ledger, ledger_of

REFRESH = 1.0  # seconds a read of the study serves pruning decisions (and reports wait to be written)

_PERCENTILE = (optuna.pruners.MedianPruner, optuna.pruners.PercentilePruner)  # decided by percentile_prunes
_FROM_VALUES = (*_PERCENTILE, optuna.pruners.ThresholdPruner, optuna.pruners.NopPruner)


def decides_from_values(pruner: optuna.pruners.BasePruner) -> bool:
    """True for the pruners that read only intermediate values (their own subclasses excepted)."""
    return type(pruner) in _FROM_VALUES


def percentile_prunes(pruner: optuna.pruners.PercentilePruner, ledger: Ledger, trial: FrozenTrial,
                      maximize: bool) -> bool:
    """Optuna's PercentilePruner.prune (and so MedianPruner's), with the percentile over the
    complete trials at the step taken from the ledger instead of a pass over every trial."""
    settings = percentile_settings(pruner)
    step = trial.last_step
    if ledger.complete == 0 or ledger.complete < settings.n_startup_trials or step is None \
            or not checked_at(step, trial, settings):
        return False
    best = best_reported(trial, maximize)
    if math.isnan(best):
        return True
    reference = ledger.percentile_at(step, settings.percentile, settings.n_min_trials, maximize)
    if math.isnan(reference):
        return False
    return best < reference if maximize else best > reference


Peers = Callable[[FrozenTrial], bool]


def comparable(known: dict[str, tuple[str, float]]) -> Peers:
    """With several objectives, the trials a trial is judged against: those at least as good on
    every objective already known for it before training (`known`: name -> (direction, value),
    e.g. n_params). A small model is then pruned for losing to models no larger than itself, not
    for losing to large ones: the pruner's rule still applies, among trials it competes with on
    the front. Trials that do not record those values are not peers."""
    def peer(t: FrozenTrial) -> bool:
        for name, (direction, mine) in known.items():
            theirs = t.user_attrs.get(name)
            if not isinstance(theirs, (int, float)) or (theirs > mine if direction == "minimize" else theirs < mine):
                return False
        return True

    return peer


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[optuna.study.StudyDirection]) -> bool:
    """Whether values `a` are at least as good as `b` in every objective and better in one."""
    sign = [1.0 if d == optuna.study.StudyDirection.MINIMIZE else -1.0 for d in directions]
    x, y = [s * v for s, v in zip(sign, a)], [s * v for s, v in zip(sign, b)]
    return all(i <= j for i, j in zip(x, y)) and any(i < j for i, j in zip(x, y))


class DirectionView:
    """A study of several objectives that answers `study.direction` with one metric's direction
    (which the real study refuses); everything else is the study's own."""

    def __init__(self, study: optuna.Study, direction: str) -> None:
        self._study = study
        self.direction = optuna.study.StudyDirection[direction.upper()]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


class StudyView(DirectionView):
    """The study as a pruner sees it: with several objectives, a study of one, the pruned metric
    (Optuna's pruners read study.direction and directions), holding only the trial's `peers` when
    given."""

    def __init__(self, study: optuna.Study, direction: str, peers: Peers | None = None) -> None:
        super().__init__(study, direction)
        self.peers = peers

    @property
    def directions(self) -> list[optuna.study.StudyDirection]:
        return [self.direction]

    def _read(self, states: Any) -> list[FrozenTrial]:
        return [t for t in ledger_of(self._study).read().history() if states is None or t.state in states]

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[FrozenTrial]:
        peers = self.peers
        trials = [t for t in self._read(states) if peers is None or peers(t)]
        return copy.deepcopy(trials) if deepcopy else trials

    @property
    def trials(self) -> list[FrozenTrial]:
        return self.get_trials()


class Snapshot(StudyView):
    """The study as read once, for the pruner: it answers get_trials() and direction itself."""

    def __init__(self, study: optuna.Study, direction: str) -> None:
        super().__init__(study, direction)
        self.ledger = ledger_of(study).read()
        self._trials: list[FrozenTrial] | None = None  # listed when a pruner asks for them
        self.taken = time.monotonic()

    def _read(self, states: Any) -> list[FrozenTrial]:
        if self._trials is None:
            self._trials = self.ledger.history()
        return [t for t in self._trials if states is None or t.state in states]

    def frozen(self, tid: int) -> FrozenTrial:
        return next(t for t in self._read(None) if trial_id(t) == tid)

    def prunes(self, trial: FrozenTrial) -> bool:
        """The study's pruner's decision on `trial` (a pruner that reads only intermediate values)."""
        pruner = self._study.pruner
        if self.peers is None and type(pruner) in _PERCENTILE:
            assert isinstance(pruner, optuna.pruners.PercentilePruner)
            return percentile_prunes(pruner, self.ledger, trial, self.direction == optuna.study.StudyDirection.MAXIMIZE)
        return bool(pruner.prune(self, trial))  # type: ignore[arg-type]


class Pruning:
    """One trial's pruning decisions, from the values it reported and a snapshot of the study;
    `direction`: the pruned metric's (the study's, unless it has several objectives)."""

    def __init__(self, trial: optuna.Trial, direction: str) -> None:
        self.trial = trial
        self.direction = direction
        self.snapshot: Snapshot | None = None

    def should_prune(self, values: dict[int, float], flush: Callable[[], None] = lambda: None,
                     peers: Peers | None = None) -> bool:
        """`values`: every intermediate value of this trial (inherited ones included), the last
        one just reported; written to the storage or not yet (`flush` writes them). `peers`: the
        trials it is judged against (all when None; see comparable())."""
        study = self.trial.study
        if not decides_from_values(study.pruner):
            # Successive halving and the like keep their rungs in the trial's attributes: they
            # decide on the stored trial (a study of several objectives only; see Trial.report).
            flush()
            stored = self.trial.storage.get_trial(trial_id(self.trial))
            return bool(study.pruner.prune(StudyView(study, self.direction, peers), stored))  # type: ignore[arg-type]
        if self.snapshot is None or time.monotonic() - self.snapshot.taken >= REFRESH:
            self.snapshot = Snapshot(study, self.direction)
        self.snapshot.peers = peers
        t = self.trial
        frozen = FrozenTrial(number=t.number, state=optuna.trial.TrialState.RUNNING, value=None,
                             datetime_start=t.datetime_start, datetime_complete=None, params=t.params,
                             distributions=t.distributions, user_attrs={}, system_attrs={},
                             intermediate_values=dict(values), trial_id=trial_id(t))
        return self.snapshot.prunes(frozen)
