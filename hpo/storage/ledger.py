"""A worker's running account of its study, so that what it does per trial does not grow with the study.

Every trial a worker starts needs counts (the budget, the failures, the status line) and the
sampler's history. Read from every trial each time, they cost a pass over the whole study per
trial: about 1 s at 100,000 trials. A finished trial never changes (Optuna's own cache relies on
it), so the ledger looks once at each trial that finished and, on each read, only at the trials
new or unfinished since the last. Trial numbers are dense (0, 1, 2, ... in each study), which
tells it where the new ones begin.

The sampler's history is bounded: past `RECENT + BEST` trials it reads the `RECENT` most recent
trials, the `BEST` best complete ones and every unfinished one (hpo.search.samplers). TPE splits
its history into the best trials (at most 25) and the rest, and already weighs the rest toward
the recent ones (optuna.samplers.TPESampler's `weights`), so the best are all kept and only the
oldest of the rest are left out. Studies up to `RECENT + BEST` trials are sampled exactly as
before. A percentile (median) pruner's reference is not bounded: the ledger keeps every complete
trial's value at each step as it finishes (`percentile_at`), so a trial is judged against the
whole study at any size. Bounded to the recent trials, that median rose as the search improved
and pruned more than Optuna's over the whole study (benchmarks/history_bound.py measured it).
"""

from __future__ import annotations

import copy
import heapq
import math
import os
from collections import Counter
from collections.abc import Container
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo._private import TrialsReader, cached_trials, storage_of, study_id
from hpo.errors import HpoError
from hpo.storage.retry import resumed_by, retried_by

RECENT = 1000  # the sampler reads the most recent trials...
BEST = 100  # ...and the best complete ones, once a study holds more than both
BOUND_ENV = "HPO_HISTORY"  # "RECENT,BEST" in place of the two above (benchmarks/history_bound.py measures them)


def bound() -> tuple[int, int]:
    """The history's bound: $HPO_HISTORY, else RECENT and BEST."""
    text = os.environ.get(BOUND_ENV, "").strip()
    if not text:
        return RECENT, BEST
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise HpoError(f"{BOUND_ENV} must be two whole numbers above 0, the recent and the best trials the sampler "
                       f"reads (e.g. {RECENT},{BEST}); it is {text!r}")
    return int(parts[0]), int(parts[1])


class _Column:
    """The values complete trials reported at one step, in an array that grows by doubling."""

    __slots__ = ("buf", "n")

    def __init__(self) -> None:
        self.buf = np.empty(16)
        self.n = 0

    def add(self, value: float) -> None:
        if self.n == len(self.buf):
            self.buf = np.concatenate([self.buf, np.empty(self.n)])
        self.buf[self.n] = value
        self.n += 1

    def values(self) -> np.ndarray:
        return self.buf[:self.n]


class Ledger:
    """One process's account of one study (`ledger_of`); `read()` brings it up to date."""

    def __init__(self, study: optuna.Study) -> None:
        self.study = study
        self.single = len(study.directions) == 1
        self._keep = max(BEST, bound()[1])  # the best complete trials kept
        self.maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
        self.trials: dict[int, FrozenTrial] | list[FrozenTrial] = {}
        self._reset(None)

    def _reset(self, since: float | None) -> None:
        """Forget every trial looked at; keep the trials started at or after `since`."""
        self._next = 0  # trials numbered below this were looked at
        self._open: set[int] = set()  # looked at while unfinished: looked at again on every read
        self._finished: Counter[TrialState] = Counter()
        self._retried: set[int] = set()  # of finished trials: numbers that live on in a retry
        self._resumed: set[int] = set()
        self._failed: set[int] = set()
        self._best: list[tuple[float, int]] = []  # the BEST best feasible complete trials (value, place), worst on top
        self._ended: list[FrozenTrial] = []  # finished trials started at or after `since`, in the order seen
        self._steps: dict[int, _Column] = {}  # each step's values of the complete trials: a pruner's reference
        self.since = since
        self.count = 0

    def read(self, since: float | None = None) -> Ledger:
        """Bring the account up to date; `since` (a time.time()): also keep the trials started since."""
        if since is not None and since != self.since:  # another run in this process (hpo.run() again)
            self._reset(since)
        cached = cached_trials(self.study)
        # A storage without Optuna's cache: one list, indexed by number.
        trials: dict[int, FrozenTrial] | list[FrozenTrial] = (cached if cached is not None
                                                             else self.study.get_trials(deepcopy=False))
        n = len(trials)
        last = (trials.get(n - 1) if isinstance(trials, dict) else trials[n - 1]) if n else None
        if n < self._next or (last is not None and last.number != n - 1):
            # Numbers with gaps (never made by Optuna): the trials by position, all looked at again.
            trials = sorted(trials.values(), key=lambda t: t.number) if isinstance(trials, dict) else list(trials)
            self._reset(self.since)
        self.trials, self.count = trials, n
        look = [*sorted(self._open), *range(self._next, n)]
        self._open = set()
        for k in look:
            t = trials[k]
            if t.state.is_finished():
                self._finish(t, k)
            else:
                self._open.add(k)
        self._next = n
        return self

    def _finish(self, t: FrozenTrial, k: int) -> None:
        self._finished[t.state] += 1
        self._retried.update(retried_by(t))
        if (resumes := resumed_by(t)) is not None:
            self._resumed.add(resumes)
        if t.state == TrialState.FAIL:
            self._failed.add(t.number)
        if t.state == TrialState.COMPLETE:
            for step, value in t.intermediate_values.items():
                self._steps.setdefault(step, _Column()).add(value)
        if t.state == TrialState.COMPLETE and self.single and t.value is not None \
                and all(v <= 0 for v in t.constraints.values()):  # feasible, as Optuna's best_trial counts
            key = t.value if self.maximize else -t.value
            (heapq.heappush if len(self._best) < self._keep else heapq.heappushpop)(self._best, (key, k))
        if self.since is not None and t.datetime_start is not None and t.datetime_start.timestamp() >= self.since:
            self._ended.append(t)

    def _open_trials(self) -> list[FrozenTrial]:
        return [self.trials[k] for k in sorted(self._open)]

    @property
    def retried(self) -> set[int]:
        return self._retried | {n for t in self._open_trials() for n in retried_by(t)}

    @property
    def resumed(self) -> set[int]:
        return self._resumed | {n for t in self._open_trials() if (n := resumed_by(t)) is not None}

    def counts(self) -> tuple[int, int, int, int]:
        """Complete and pruned, failed and not retried, running, waiting: what
        hpo.search.budget.count_budget counts over every trial."""
        live = Counter(t.state for t in self._open_trials())
        return (self._finished[TrialState.COMPLETE] + self._finished[TrialState.PRUNED], len(self._failed - self.retried),
                live[TrialState.RUNNING], live[TrialState.WAITING])

    @property
    def pruned(self) -> int:
        return self._finished[TrialState.PRUNED]

    @property
    def complete(self) -> int:
        return self._finished[TrialState.COMPLETE]

    def best_value(self) -> float | None:
        """The best value of a feasible complete trial (one objective), as Optuna's best_value."""
        if not self._best:
            return None
        key = max(self._best)[0]
        return key if self.maximize else -key

    def ended(self) -> list[FrozenTrial]:
        """The trials finished since `since` (read(since=...)), as hpo.search.failures.run_trials orders them."""
        return sorted(self._ended, key=lambda t: ((t.datetime_complete or t.datetime_start).timestamp(), t.number))  # type: ignore[union-attr]

    def percentile_at(self, step: int, percentile: float, n_min_trials: int, maximize: bool) -> float:
        """What Optuna's PercentilePruner compares a trial's best value with at `step`: the
        percentile of every complete trial's value there (the top `percentile` kept), nan when
        fewer than `n_min_trials` reported it or all of those are nan."""
        column = self._steps.get(step)
        values = column.values() if column is not None else np.empty(0)
        if len(values) < n_min_trials or np.isnan(values).all():
            return math.nan
        return float(np.nanpercentile(values, 100 - percentile if maximize else percentile))

    def history(self) -> list[FrozenTrial]:
        """The trials the sampler reads, by number: all of them, or past RECENT + BEST the most
        recent, the best complete ones and every unfinished one; with several objectives all of them."""
        n, (recent, best) = self.count, bound()
        if n <= recent + best or not self.single:
            return [self.trials[k] for k in range(n)] if isinstance(self.trials, dict) else list(self.trials)
        kept = heapq.nlargest(best, self._best) if best < len(self._best) else self._best
        numbers = sorted({*(number for _, number in kept if number < n - recent), *self._open, *range(n - recent, n)})
        return [self.trials[k] for k in numbers]


_LEDGERS: dict[tuple[int, int], Ledger] = {}


def ledger_of(study: optuna.Study) -> Ledger:
    """This process's ledger of `study` (one per storage and study, shared by every reader)."""
    key = (id(storage_of(study)), study_id(study))
    ledger = _LEDGERS.get(key)
    if ledger is None or storage_of(ledger.study) is not storage_of(study):
        while len(_LEDGERS) >= 16:  # a notebook or a test session opens many: the oldest go
            del _LEDGERS[next(iter(_LEDGERS))]
        ledger = _LEDGERS[key] = Ledger(study)
    return ledger


class History(TrialsReader):
    """The study as the sampler reads it: the ledger's bounded history, read when the trial starts
    (hpo.search.samplers.TrialSeeded.before_trial); everything else is the study's own."""

    def __init__(self, study: optuna.Study, trials: list[FrozenTrial]) -> None:
        self._study, self._trials = study, trials

    def get_trials(self, deepcopy: bool = True, states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        trials = self._trials if states is None else [t for t in self._trials if t.state in states]
        return copy.deepcopy(trials) if deepcopy else trials

    @property
    def trials(self) -> list[FrozenTrial]:
        return self.get_trials()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)
