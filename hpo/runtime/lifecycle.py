"""The one lifecycle of a trial, whoever trains it: started (claimed, its heartbeat, its first
attempt's number, checkpoint and reports found), ended (attributes, constraints, the model kept if
it may be the best, its checkpoint removed unless it comes back, its state told), requeued to
resume from its checkpoint, or found taken over by another worker; and a trial whose process is
gone (killed on this machine, or its heartbeat stopped) ended the way a trial that loses a rank
is: its reason, failed, retried from its checkpoint within the retry cap.

Every write of a trial's final state is here (tests/test_layout.py holds it): `TrialRunner` (one
trial at a time, the user's `train` or hpo's own loop) and the fused worker (K trials trained as
one batched model) start and end their trials here, and every worker, the run that supervises
them and the parent that watches a run take back dead processes' trials here; how a live trial
ends is decided by hpo.runtime.endings.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from hpo._private import stale_trial_ids, storage_of, study_id, trial_id
from hpo.runtime import stopping
from hpo.runtime.endings import End, Ending, error_record, traceback_text
from hpo.runtime.listener import Listener
from hpo.runtime.pruning import dominates
from hpo.storage.artifacts import Artifacts, find_artifact
from hpo.storage.budget_lock import holding
from hpo.storage.keys import CHECKPOINT_ATTR, ERROR_ATTR, MODEL_FILE, RERUN_ATTR
from hpo.storage.ledger import ledger_of
from hpo.storage.lineage import Segment
from hpo.storage.resilient import set_user_attrs
from hpo.storage.retry import (
    OWNER_ATTR,
    claim,
    is_gone,
    requeue,
    retry_lost,
    stale_retrier,
)

if TYPE_CHECKING:
    from hpo.runtime.checkpoints import (
        Envelope,  # torch: imported where a trial starts, not to end one
    )


class TakenOver(Exception):
    """Another worker failed this trial as stale while this one was stopped (frozen past the
    grace period, cut off) and queued its retry: nothing more may be written to it."""

    def __init__(self, number: int) -> None:
        super().__init__(f"trial {number} was taken over by another worker while this one was stopped (past "
                         "the grace period); dropped it, going on")
        self.number = number


@dataclass
class Attempt:
    """One attempt at a trial, as `Lifecycle.start` found it."""

    trial: optuna.Trial
    number: int  # the first attempt's number: a retry keeps its seed and checkpoint
    envelope: Envelope | None  # the last checkpoint, to resume from
    inherited: dict[int, float] = field(default_factory=dict)  # epochs an earlier attempt reported
    rerun_of: int | None = None  # a completed trial this one runs again, to save its model anew (hpo retry STUDY N)
    segment: Segment | None = None  # a population member's segment (search.strategy pbt): where it ends

    @property
    def retry_of(self) -> int | None:
        return None if self.number == self.trial.number else self.number


@dataclass
class Outcome:
    """What the runtime records when a trial ends."""

    ending: Ending
    attributes: dict[str, Any]
    values: list[float] | None = None  # one per objective, for a complete trial
    constraints: dict[str, float] = field(default_factory=dict)
    model: Callable[[], Any] | None = None  # the final training state, read only when the trial may be the best
    error: BaseException | None = None  # an exception in training code: its traceback and record
    requeue_why: str = ""  # for a requeued ending: what the retry says ("study timeout in epoch 3")
    checkpoint_epoch: int = 0  # for a requeued ending: the epoch its last checkpoint resumes from


class Heartbeats:
    """Records a heartbeat for every trial this worker has in flight, from one thread (Optuna
    does this only inside `study.optimize`, one thread per trial)."""

    def __init__(self, study: optuna.Study) -> None:
        storage: Any = storage_of(study)  # an RDB storage (heartbeats) or a journal/proxy (none)
        self.interval = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
        self.storage = storage
        self.ids: set[int] = set()
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        if self.interval:
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()

    def _run(self) -> None:
        assert self.interval is not None
        while not self.stop.wait(self.interval):
            for tid in list(self.ids):
                try:
                    self.storage.record_heartbeat(tid)
                except Exception:
                    pass  # the next beat retries; a dead worker is what staleness is for

    def add(self, tid: int) -> None:
        self.ids.add(tid)
        if self.interval:
            self.storage.record_heartbeat(tid)

    def close(self) -> None:
        self.stop.set()


class Lifecycle:
    """Starts and ends the trials of one worker on one study."""

    def __init__(self, study: optuna.Study, artifacts: Artifacts, listener: Listener | None = None) -> None:
        self.study, self.artifacts = study, artifacts
        self.listener = listener or Listener()
        self.storage = storage_of(study)
        self.beats = Heartbeats(study)

    def close(self) -> None:
        self.beats.close()

    def start(self, trial: optuna.Trial) -> Attempt:
        """Claim a new trial (a kill -9 of this process is seen at once) and find what an earlier
        attempt left: call before its parameters are sampled (a retry is created with them)."""
        tid = trial_id(trial)
        self.beats.add(tid)
        claim(self.storage, tid)
        attrs = self.storage.get_trial_system_attrs(tid)
        history = attrs.get("retry_history") or []
        number = int(history[0]) if history else trial.number  # the first attempt's: its seed and checkpoint
        envelope = self._checkpoint(trial.number, number, attrs.get(CHECKPOINT_ATTR))
        segment = Segment.from_attrs(attrs)
        if envelope is None and segment is not None and segment.checkpoint is not None:
            # A member's next segment: the checkpoint its lineage names (its parent's last).
            envelope = self._checkpoint(trial.number, segment.checkpoint, segment.start)
        # A retry inherited its first attempt's reports; the epochs it trains again are not re-sent.
        inherited = dict(self.storage.get_trial(tid).intermediate_values) if number != trial.number else {}
        rerun_of = attrs.get(RERUN_ATTR)
        return Attempt(trial, number, envelope, inherited, rerun_of if isinstance(rerun_of, int) else None, segment)

    def _checkpoint(self, shown: int, number: int, expected: object) -> Envelope | None:
        """The trial's last readable checkpoint. One that cannot be read (torn, truncated, of
        another format, missing where the trial was queued to resume from it) costs a warning
        and a restart from the one before it or from epoch 0, never the study."""
        from hpo.runtime.checkpoints import Envelope

        raw, problems = self.artifacts.load_checkpoint(number, Envelope.problem)
        envelope = Envelope.from_dict(raw)
        then = (f"resumes from epoch {envelope.epoch}, the checkpoint before it" if envelope is not None
                else "starts over from epoch 0")
        for problem in problems:
            self.listener.warn(f"hpo: trial {shown}: checkpoint {problem}; the trial {then}")
        if not problems and isinstance(expected, int) and (envelope.epoch if envelope else 0) < expected:
            files = " or ".join(str(f) for f in self.artifacts.checkpoint_paths(number))
            self.listener.warn(f"hpo: trial {shown}: its checkpoint of epoch {expected} is missing (no file {files}); "
                               f"the trial {then}")
        return envelope

    def end(self, attempt: Attempt, outcome: Outcome) -> FrozenTrial:
        """Write the trial's record and tell its state; a requeued ending queues its retry, which
        resumes from the checkpoint kept for it. Raises TakenOver when another worker ended it."""
        with stopping.shielded(obey=False):  # a stop waits until the trial is told and queued: never half ended
            return self._end(attempt, outcome)

    def _end(self, attempt: Attempt, outcome: Outcome) -> FrozenTrial:
        trial, ending = attempt.trial, outcome.ending
        with self.owned(trial):
            attributes = dict(outcome.attributes)
            if outcome.error is not None and ending.end is End.ERROR:
                attributes["traceback"] = traceback_text(outcome.error)[-4000:]
            set_user_attrs(trial, attributes)
            if outcome.error is not None:  # tells a bug (the same error trial after trial) from bad parameters
                self.storage.set_trial_system_attr(trial_id(trial), ERROR_ATTR, error_record(outcome.error))
            for key, excess in outcome.constraints.items():
                trial.set_constraint(key, excess)
            complete = ending.end is End.COMPLETE and outcome.values is not None
            feasible = all(v <= 0 for v in outcome.constraints.values())
            if complete and outcome.model is not None and attempt.rerun_of is not None:
                self._save_again(attempt.rerun_of, outcome.model)
            if complete and feasible and outcome.model is not None and improves(self.study, outcome.values or []):
                # Only a trial that may be the best keeps its final state (the test function's input).
                self.artifacts.upload(trial, MODEL_FILE, outcome.model())
            if not ending.end.keeps_checkpoint and not (complete and attempt.segment is not None):
                self.artifacts.remove_checkpoint(attempt.number)  # a member's segment: the next ones start there
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna's word on a failed trial: hpo says it itself
                frozen = self.study.tell(trial, outcome.values if complete else None, state=ending.end.state)
        self.beats.ids.discard(trial_id(trial))
        if ending.end.requeued:
            requeue(self.study, trial_id(trial), outcome.requeue_why, outcome.checkpoint_epoch)
        elif ending.end.retried and (note := retry_lost(self.study, frozen, outcome.requeue_why)):
            self.listener.warn(note)
        self.listener.trial_finished(self.study, frozen)
        return frozen

    def abandon(self, trial: optuna.Trial, why: str, checkpoint_epoch: int = 0) -> bool:
        """A trial stopped from outside before it could be ended (Ctrl-C in a fused round, a storage
        error): told failed if it is not yet, and queued to resume from its last checkpoint.
        False when it was already finished (by this worker or another)."""
        self.beats.ids.discard(trial_id(trial))
        if self.taken_over(trial):
            return False  # already ended (the stop came while it was being ended): it keeps its ending
        try:
            then = f"queued to resume from epoch {checkpoint_epoch}" if checkpoint_epoch else "queued to run again"
            set_user_attrs(trial, {"reason": f"{why}; {then}"})
            self.study.tell(trial, state=TrialState.FAIL)
        except Exception:
            return False  # ended by another worker a moment ago
        return requeue(self.study, trial_id(trial), why, checkpoint_epoch) is not None

    def _save_again(self, number: int, model: Callable[[], Any]) -> None:
        """A completed trial run again because its saved model could not be read: the new final
        state is written over that trial's model, so the test step and `hpo export` read it there."""
        try:
            first = self.storage.get_trial(self.storage.get_trial_id_from_study_id_trial_number(
                study_id(self.study), number))
        except KeyError:
            return
        if (artifact := find_artifact(first, MODEL_FILE, self.storage)) is not None:
            self.artifacts.rewrite(artifact, model(), f"trial {number}'s {MODEL_FILE}")

    def taken_over(self, trial: optuna.Trial) -> bool:
        return self.storage.get_trial(trial_id(trial)).state.is_finished()

    @contextmanager
    def owned(self, trial: optuna.Trial) -> Iterator[None]:
        """Writes to a trial this worker believes it runs: the one place a trial taken over by
        another worker is noticed (Optuna refuses writes to a finished trial)."""
        try:
            yield
        except (UpdateFinishedTrialError, ValueError):
            if not self.taken_over(trial):
                raise
            self.beats.ids.discard(trial_id(trial))
            raise TakenOver(trial.number) from None


def improves(study: optuna.Study, values: Sequence[float]) -> bool:
    """Whether `values` beat every completed trial so far (ties included), so its final state must
    be kept for the test scoring; the others' are not saved. With several objectives: whether no
    trial on the Pareto front dominates it."""
    values = list(values)
    if len(values) > 1:
        return not any(dominates(t.values, values, study.directions) for t in study.best_trials)
    best = ledger_of(study).read().best_value()  # not Optuna's query: it sorts every trial
    if best is None:  # no completed trial yet
        return True
    value = values[0]
    return value >= best if study.direction == optuna.study.StudyDirection.MAXIMIZE else value <= best


def trial_attributes(metric: str, curves: Mapping[str, list[float]], epoch_seconds: list[float], device: Any,
                     resumed_from: int, extra: Mapping[str, Any], reason: str | None) -> dict[str, Any]:
    """What a user reads on a trial's page (one at a time or fused), written once, at the end, in one
    commit: every reported metric but the study's own (that is the trial's learning curve) per epoch,
    seconds per epoch, the device, and why it was stopped early if it was."""
    attrs: dict[str, Any] = {name: [round(v, 6) for v in values] for name, values in curves.items() if name != metric}
    attrs["epoch_seconds"] = [round(v, 4) for v in epoch_seconds]
    attrs["device"] = str(device)
    if resumed_from:
        attrs["resumed_from_epoch"] = resumed_from
    attrs.update(extra)
    if reason:
        attrs["reason"] = reason
    return attrs


# ---- trials whose process is gone ------------------------------------------------------------


@dataclass(frozen=True)
class Reclaimed:
    """Trials whose process was gone, by what became of them: `queued` to resume from their
    checkpoints, or `dropped` past the retry cap (their checkpoints removed)."""

    queued: tuple[int, ...] = ()
    dropped: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.queued or self.dropped)


def end_orphans(study: optuna.Study, exits: Mapping[int, str] | None = None,
                say: Callable[[str], None] = lambda text: None) -> Reclaimed:
    """End now, without waiting out the grace period, every running trial whose process is known
    to be gone (same machine and PID namespace, pid no longer alive): a `kill -9` of a whole run
    leaves its trials RUNNING, and the next run on this machine takes them back at once. `exits`
    says how processes this one started ended, by pid ("exited with status 0"), for the reason;
    `say` is told of a trial past its retry cap."""
    queued: list[int] = []
    dropped: list[int] = []
    gone = [(t, recorded) for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if isinstance(recorded := t.system_attrs.get(OWNER_ATTR), str) and is_gone(recorded)]
    if not gone:
        return Reclaimed()
    # Failed and queued again as one step under the budget lock: a worker that counted the budget
    # between the two would see the trial's place free and start a new trial, one over the budget.
    with holding(storage_of(study), study_id(study)):
        for t, recorded in gone:
            pid = recorded.split(":")[-2]
            ended = _end_dead(study, t, f"its process (pid {pid}) {(exits or {}).get(int(pid), 'ended')} during "
                                        "the trial", say)
            (queued if ended == "queued" else dropped if ended == "dropped" else []).append(t.number)
    return Reclaimed(tuple(queued), tuple(dropped))


def end_stale(study: optuna.Study, say: Callable[[str], None] = lambda text: None) -> list[int]:
    """End every running trial whose heartbeat stopped for longer than the grace period (killed
    on another machine, frozen, cut off), as Optuna's fail_stale_trials would, but the way a trial
    whose process died here is: with its reason. Returns the numbers of those queued to resume."""
    storage = storage_of(study)
    taken = []
    for tid in stale_trial_ids(storage, study_id(study)):
        t = storage.get_trial(tid)
        if _end_dead(study, t, "its worker stopped sending heartbeats (killed, frozen or cut off)", say) == "queued":
            taken.append(t.number)
    return taken


def _end_dead(study: optuna.Study, t: FrozenTrial, what: str,
              say: Callable[[str], None]) -> Literal["queued", "dropped"] | None:
    """A trial whose process died under it: its reason written while it still runs, failed, then
    retried from its checkpoint within the storage's retry cap ("queued"; past it "dropped", its
    checkpoints removed and `say` told), as a trial that loses a rank is. None when another worker
    ended it first."""
    storage = storage_of(study)
    retrier = stale_retrier(storage)
    try:
        storage.set_trial_user_attr(trial_id(t), "reason", retrier.outcome(t, what))  # while it can be written
        if not storage.set_trial_state_values(trial_id(t), state=TrialState.FAIL):
            return None
    except Exception:
        return None  # another worker took it back first
    if note := retrier.retry(study, storage.get_trial(trial_id(t)), what):
        say(note)
        return "dropped"
    return "queued"
