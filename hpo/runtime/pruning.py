"""Pruning decisions that cost no storage round trip per epoch, for both trial paths.

Optuna's Trial.should_prune() re-reads the trial and every unfinished trial of the study at each
epoch. The pruners that look only at intermediate values (median, percentile, threshold, none)
need just the trial's own values, which the runtime holds, and the study's trials as they stood
a moment ago: one read of the study serves every decision for up to REFRESH seconds (a fused
round's members, or one trial's next epochs). Other pruners (successive halving, hyperband,
Wilcoxon) keep state in the trial's system attributes, so they go through Optuna as before.
Either way a pruner reads the study's recent and unfinished trials past 1,100 (hpo.storage.ledger),
so a decision costs the same at 100,000 trials as at 1,000.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from hpo._private import trial_id
from hpo.storage.ledger import ledger_of

REFRESH = 1.0  # seconds a read of the study serves pruning decisions (and reports wait to be written)

_FROM_VALUES = (optuna.pruners.MedianPruner, optuna.pruners.PercentilePruner, optuna.pruners.ThresholdPruner,
                optuna.pruners.NopPruner)


def decides_from_values(pruner: optuna.pruners.BasePruner) -> bool:
    """True for the pruners that read only intermediate values (their own subclasses excepted)."""
    return type(pruner) in _FROM_VALUES


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
        # The ledger's recent and unfinished trials (hpo.storage.ledger): the best would skew the reference.
        recent = ledger_of(self._study).read().history(with_best=False)
        return [t for t in recent if states is None or t.state in states]

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
        self._trials = ledger_of(study).read().history(with_best=False)
        self.taken = time.monotonic()

    def _read(self, states: Any) -> list[FrozenTrial]:
        return [t for t in self._trials if states is None or t.state in states]

    def frozen(self, tid: int) -> FrozenTrial:
        return next(t for t in self._trials if trial_id(t) == tid)


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
        return bool(study.pruner.prune(self.snapshot, frozen))  # type: ignore[arg-type]
