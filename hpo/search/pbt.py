"""Population-based training: which segment a population trains next, decided from the study alone.

A member trains in segments of `interval` epochs, each an Optuna trial (so Optuna's tools and the
dashboard read every one). When a member's segment ends, the next one is decided by whichever
worker asks (asynchronous: no member waits for another): among the members that have reached the
same epoch, one in the bottom quantile continues from a top member's checkpoint of that epoch
(weights and optimizer state) with its parameters perturbed x0.8 / x1.2 or redrawn (exploit and
explore); the others continue from their own. A segment that fails (an error, a diverged metric,
its retries spent) is replaced the same way, from a top member, never waited for. Members are
compared at equal epochs, so every member trains the same number of segments and the budget is
population x segments.

A fixed schedule (search.strategy schedule: a PBT member's, from `hpo export`) is replayed the same
way, as one member whose segments take the schedule's values.

Each decision is a WAITING trial carrying its parameters and its lineage (member, generation,
parent trial, the checkpoint it starts from) in the study, made under the budget lock: any worker
takes it, and a restart continues the population where it was. Ray Tune's PBT and its issues
(ray#27170, ray PR 28509, ray#12122, ray#62173) are what this avoids: a member exploited from a
segment with no checkpoint is refused in one line; a segment loads the checkpoint its lineage
names; a crashed member is replaced; the new parameters are applied over the loaded state.
"""

from __future__ import annotations

import datetime
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from hpo._private import storage_of, study_id
from hpo.search.budget import retried_numbers
from hpo.spec.schema import SearchSpec, StudySpec
from hpo.storage.keys import ERROR_ATTR, PBT_ATTR
from hpo.storage.lineage import Segment
from hpo.storage.retry import forget_checkpoints, mark_queued, retried_by, stale_retrier

PERTURB = (0.8, 1.2)  # PBT's factors (Jaderberg et al. 2017; Ray Tune's defaults)


@dataclass(frozen=True)
class Decision:
    """A member's next segment, as `create` writes it to the study."""

    segment: Segment
    params: dict[str, Any] | None  # None: the sampler draws a new member's
    distributions: dict[str, BaseDistribution]  # the params' (an exploit's); none: fixed values (a schedule's)


@dataclass
class _Member:
    number: int
    latest: FrozenTrial  # its newest segment's newest attempt
    segment: Segment
    done: dict[int, FrozenTrial]  # its completed segments by the epoch they end at


def members(trials: Sequence[FrozenTrial]) -> dict[int, _Member]:
    """Each member's segments as the study holds them; a retried attempt gives way to its retry."""
    retried = retried_numbers(list(trials))
    out: dict[int, _Member] = {}
    for t in sorted(trials, key=lambda t: t.number):
        if (seg := Segment.of(t)) is None:
            continue
        m = out.setdefault(seg.member, _Member(seg.member, t, seg, {}))
        if t.state == TrialState.COMPLETE:
            m.done[seg.end] = t
        if t.number not in retried and (seg.generation, t.number) >= (m.segment.generation, m.latest.number):
            m.latest, m.segment = t, seg
    return out


def checkpoint_of(trial: FrozenTrial) -> int:
    """The number a trial's checkpoints are kept under: its first attempt's."""
    history = retried_by(trial)
    return history[0] if history else trial.number


DONE = "done"  # every member has trained every epoch
BUSY = "busy"  # the members that have not are all training: the next segment waits on one of them


def next_segment(study: optuna.Study, spec: StudySpec) -> Decision | str:
    """The segment to train next, or DONE, or BUSY. The population's budget is its members'
    epochs, not a count of trials: a diverged or failed segment is replaced, and the population
    is done when every member has trained every epoch."""
    search, epochs = spec.search, spec.budget.epochs
    trials = study.get_trials(deepcopy=False)
    population = members(trials)
    rng = random.Random(f"{spec.seed}:{len(trials)}")  # the same study, the same decisions
    for number in range(search.population):
        if number not in population:
            return _first(number, search, epochs, "start")
    ready, busy = [], False
    for m in population.values():
        state, seg = m.latest.state, m.segment
        if state in (TrialState.RUNNING, TrialState.WAITING):
            busy = True
            continue
        if state == TrialState.COMPLETE:
            if seg.end < epochs:
                ready.append((seg.end, m.number, m, False))
        elif state == TrialState.FAIL and not _lost(study, m.latest):
            busy = True  # its process died or it was stopped: its retry is on the way
        else:  # diverged, an error in its code, its retries spent: replaced
            ready.append((seg.start, m.number, m, True))
    _forget_passed(study, population)
    if not ready:
        return BUSY if busy else DONE
    at, _, member, failed = min(ready, key=lambda r: (r[0], r[1]))
    if search.schedule:
        return _scheduled(member, at, search)
    names = search.explored(spec.space, spec.train is None)
    return _decide(member, at, failed, population, search, epochs, spec.direction, rng, names)


RETRY_WINDOW = 30.0  # s: a failed segment with no retry by then will have none (replaced)


def _lost(study: optuna.Study, trial: FrozenTrial) -> bool:
    """Whether a failed segment will not come back as a retry: an error in the training code, or
    its retries spent. A trial whose process died is failed a moment before its retry is queued
    (hpo.runtime.lifecycle), and another worker deciding then must not replace it too."""
    if ERROR_ATTR in trial.system_attrs or stale_retrier(storage_of(study)).exhausted(trial):
        return True
    ended = trial.datetime_complete
    return ended is None or (datetime.datetime.now() - ended).total_seconds() > RETRY_WINDOW


def _forget_passed(study: optuna.Study, population: Mapping[int, _Member]) -> None:
    """Remove the checkpoints no segment can start from any more: those of segments that end
    before the epoch every member is at (a decision copies a checkpoint of the epoch the member
    is at). Each member's last one stays (a larger budget.epochs continues from it). Without it
    a population keeps population x segments checkpoints."""
    floor = min(m.segment.end if m.latest.state == TrialState.COMPLETE else m.segment.start
                for m in population.values())
    passed = {checkpoint_of(t) for m in population.values() for end, t in m.done.items() if end < floor}
    forgotten = _forgotten.setdefault(study.study_name, set())
    forget_checkpoints(study, sorted(passed - forgotten))
    forgotten |= passed


_forgotten: dict[str, set[int]] = {}  # by study: the checkpoints this process removed already


def _first(number: int, search: SearchSpec, epochs: int, action: str) -> Decision:
    """A member's first segment (a new one, or one replacing a first segment that failed): a
    fixed schedule's first values, else a draw of the study's sampler."""
    if search.schedule:
        step = search.schedule[0]
        return Decision(Segment(number, 0, 0, step.end, "schedule"), dict(step.params), {})
    return Decision(Segment(number, 0, 0, min(search.interval, epochs), action), None, {})


def _decide(member: _Member, at: int, failed: bool, population: Mapping[int, _Member], search: SearchSpec,
            epochs: int, direction: str, rng: random.Random, names: Sequence[str]) -> Decision:
    end = min(at + search.interval, epochs)
    if failed and at == 0:  # nothing to copy yet: a new draw takes its place
        return _first(member.number, search, epochs, "replace")
    generation = member.segment.generation + (0 if failed else 1)
    ranked = _ranked(member.number, at, population, search, direction)
    cut = max(1, int(len(ranked) * search.quantile))
    if failed or member.number in ranked[-cut:]:
        # A donor from the top that has reached this epoch: its checkpoint of this epoch is copied.
        top = [n for n in ranked[:cut] if n != member.number and at in population[n].done]
        if failed and not top:
            top = [n for n in ranked if n != member.number and at in population[n].done][:1]
        if top:
            donor = rng.choice(top)
            parent = population[donor].done[at]
            params = explore(parent.params, parent.distributions, search, rng, names)
            seg = Segment(member.number, generation, at, end, "replace" if failed else "exploit", parent.number,
                          checkpoint_of(parent), donor)
            return Decision(seg, params, dict(parent.distributions))
    own = member.done[at] if at in member.done else member.latest
    seg = Segment(member.number, generation, at, end, "continue", own.number, checkpoint_of(own))
    return Decision(seg, dict(own.params), dict(own.distributions))


def _scheduled(member: _Member, at: int, search: SearchSpec) -> Decision:
    """A fixed schedule's next segment (search.strategy schedule): its values, from the member's
    own checkpoint of this epoch (a failed first segment starts over)."""
    if at not in member.done:
        return _first(member.number, search, search.schedule[-1].end, "schedule")
    step = next(s for s in search.schedule if s.start == at)
    own = member.done[at]
    seg = Segment(member.number, member.segment.generation + 1, at, step.end, "schedule", own.number,
                  checkpoint_of(own))
    return Decision(seg, dict(step.params), {})


def _ranked(number: int, at: int, population: Mapping[int, _Member], search: SearchSpec,
            direction: str) -> list[int]:
    """Members best first, compared where enough of them are: at this epoch, or at the latest
    segment's end before it that `1 / quantile` members (this one among them) have reached. Members
    are compared at equal epochs; waiting for the others to catch up is what asynchrony avoids."""
    need = math.ceil(1 / search.quantile - 1e-9)
    for b in range(at, 0, -search.interval):
        scores = {m.number: m.done[b].value for m in population.values()
                  if b in m.done and m.done[b].value is not None}
        if number in scores and len(scores) >= need:
            return sorted(scores, key=lambda n: scores[n] or 0.0, reverse=direction == "maximize")
    return []


def explore(params: Mapping[str, Any], distributions: Mapping[str, BaseDistribution], search: SearchSpec,
            rng: random.Random, names: Sequence[str]) -> dict[str, Any]:
    """A donor's parameters, each of `names` redrawn (probability `resample`) or perturbed."""
    out = dict(params)
    for name in names:
        if name not in out or name not in distributions:
            continue
        dist = distributions[name]
        out[name] = _draw(dist, rng) if rng.random() < search.resample else _perturb(out[name], dist, rng)
    return out


def _perturb(value: Any, dist: BaseDistribution, rng: random.Random) -> Any:
    if isinstance(dist, CategoricalDistribution):
        choices = list(dist.choices)
        ordered = all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in choices)
        if not ordered or value not in choices:
            return value
        i = choices.index(value) + rng.choice((-1, 1))
        return choices[min(max(i, 0), len(choices) - 1)]
    if isinstance(dist, (FloatDistribution, IntDistribution)):
        return _fit(float(value) * rng.choice(PERTURB), dist)
    return value


def _draw(dist: BaseDistribution, rng: random.Random) -> Any:
    if isinstance(dist, CategoricalDistribution):
        return rng.choice(list(dist.choices))
    if isinstance(dist, (FloatDistribution, IntDistribution)):
        lo, hi = float(dist.low), float(dist.high)
        x = math.exp(rng.uniform(math.log(lo), math.log(hi))) if dist.log else rng.uniform(lo, hi)
        return _fit(x, dist)
    return None


def _fit(x: float, dist: FloatDistribution | IntDistribution) -> Any:
    """`x` inside the distribution: clipped to its range, on its step, an int where it is one."""
    lo, hi = dist.low, dist.high
    if dist.step is not None:
        x = lo + round((x - lo) / dist.step) * dist.step
    x = min(max(x, lo), hi)
    return int(round(x)) if isinstance(dist, IntDistribution) else float(x)


def create(study: optuna.Study, decision: Decision) -> int:
    """The decision as a WAITING trial (any worker's next ask takes it); its number. Parameters
    without their distributions (a fixed schedule's) are fixed as Optuna's enqueue_trial fixes them."""
    seg = decision.segment
    storage = storage_of(study)
    fixed = {"fixed_params": dict(decision.params)} if decision.params and not decision.distributions else {}
    template = optuna.trial.create_trial(
        state=TrialState.WAITING, params=decision.params if decision.distributions else {},
        distributions=decision.distributions, system_attrs={PBT_ATTR: seg.to_dict(), **fixed},
        user_attrs=seg.user_attrs())
    number = storage.get_trial_number_from_id(storage.create_new_trial(study_id(study), template_trial=template))
    if decision.params:
        mark_queued(study, number)  # the sampler proposes nothing for it
    return number
