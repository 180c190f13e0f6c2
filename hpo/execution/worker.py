"""One worker running trials one at a time until the study's budget is met."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from hpo._private import storage_of, study_id
from hpo.data.splits import DataCache
from hpo.errors import StorageError, TrialError
from hpo.runtime import stopping
from hpo.runtime.endings import CheckpointPolicy, Stop
from hpo.runtime.listener import Listener
from hpo.runtime.trial import Trial, TrialContext, TrialRunner
from hpo.search.budget import count_budget, is_budget_spent, wait_for_running
from hpo.search.failures import FailureStop, verdict
from hpo.search.samplers import effective_n_trials
from hpo.search.study import StudyHandle
from hpo.spec.schema import StudySpec
from hpo.storage.backends import BudgetLock
from hpo.storage.retry import reclaim_orphans, requeue
from hpo.training.trainer import configure_device


@dataclass
class WorkerResult:
    ran: int = 0
    stopped: str = ""  # why, for a person
    budget_reached: bool = False  # the study's budget is used up (as opposed to a timeout or an n_trials cap)
    interrupted_trial: int | None = None
    resumes_from_epoch: int | None = None
    counts: dict[str, int] = field(default_factory=dict)
    failure: FailureStop | None = None  # the run stopped on its failures (hpo.search.failures)


class _Tracker(Listener):
    """Remembers the trial in flight (to requeue it on Ctrl-C) and forwards to the front end."""

    def __init__(self, inner: Listener) -> None:
        self.inner = inner
        self.current: int | None = None

    def trial_started(self, number: int, params: Mapping[str, Any], resumed_epoch: int,
                      first: int | None = None) -> None:
        self.current = number
        self.inner.trial_started(number, params, resumed_epoch, first)

    def epoch_done(self, number: int, epoch: int, value: float) -> None:
        self.inner.epoch_done(number, epoch, value)

    def trial_finished(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.current = None
        self.inner.trial_finished(study, trial)

    def note(self, text: str) -> None:
        self.inner.note(text)

    def warn(self, text: str) -> None:
        self.inner.warn(text)


def run_worker(
    handle: StudyHandle,
    *,
    device: torch.device,
    n_trials: int | None = None,
    timeout: float | None = None,
    listener: Listener | None = None,
    data: DataCache | None = None,
    wait_for_others: bool = True,
    checkpoint_interval: float = 2.0,
    since: float | None = None,
    before_trial: Callable[[], object] = lambda: None,
    turn: Callable[[Callable[[str], None]], bool] = lambda note: True,
    label_output: bool = False,  # other workers print to this terminal: a trial's lines say its number
) -> WorkerResult:
    """Run trials until the study's budget is met, `n_trials` ran here, `timeout` passed, or the
    run's failures since `since` (a time.time(); default now) stop it.

    KeyboardInterrupt (Ctrl-C, or SIGTERM turned into it by the CLI) ends the trial in flight as
    FAIL, queues its retry and re-raises: the next run resumes it from its last checkpoint.
    """
    study, spec = handle.study, handle.spec
    configure_device(device)
    tracker = _Tracker(listener or Listener())
    train_fn, who = training_function(spec, device, data)
    total = effective_n_trials(spec)
    timeout = timeout if timeout is not None else spec.budget.timeout
    deadline = time.monotonic() + timeout if timeout else None
    objective = TrialRunner(TrialContext(spec, handle.artifacts, device, tracker, CheckpointPolicy(checkpoint_interval),
                                         deadline, who, label_output), train_fn)
    result = WorkerResult()

    def after_trial(s: optuna.Study, t: FrozenTrial) -> None:
        tracker.trial_finished(s, t)
        if t.state == TrialState.FAIL and device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()

    lock = BudgetLock(storage_of(study), study_id(study))
    objective.on_start = lock.release
    # The callback costs a storage read per trial: only when someone listens to finished trials (or
    # on a GPU, where a failed trial's memory is handed back).
    listens = listener is not None and type(listener).trial_finished is not Listener.trial_finished
    callbacks: list[Callable[[optuna.Study, FrozenTrial], None]] | None = [after_trial] if listens or device.type == "cuda" else None
    since = time.time() if since is None else since
    reclaim(study, tracker)
    try:
        while not _limit_reached(result, n_trials, deadline, timeout):
            if stopping.requested():  # a stop that came between trials (hpo stop)
                raise Interrupted(result)
            if not turn(tracker.note) and not _all_taken(study, total):
                continue  # more workers than CPUs on this host, the others busy: turn() waited a moment
            go = _take_slot(study, lock, total, since, spec.budget.failure_limit, result,
                            tracker.note if wait_for_others else None)
            if go is None:
                continue
            if go:
                before_trial()  # this worker's share of the host's CPUs, read again
            if not go or not _run_one(study, objective, tracker, lock, callbacks, result, timeout):
                break
    except Exception:
        if _study_gone(study):  # `hpo delete` while this worker ran: say so, no traceback
            raise StorageError(f"study {study.study_name!r} was deleted while this worker ran; stopped") from None
        raise
    return result


def _take_slot(study: optuna.Study, lock: BudgetLock, total: int, since: float, limit: int, result: WorkerResult,
               wait: Callable[[str], None] | None) -> bool | None:
    """Under the budget lock, held until the next trial exists (so workers never overshoot):
    True to start a trial (the lock still held), False to stop (the run's failures, or the
    budget), None to look again (`wait`: trials running elsewhere may still come back)."""
    lock.acquire()
    trials = study.get_trials(deepcopy=False)
    if (failure := verdict(trials, since, limit)) is not None:
        lock.release()
        result.stopped, result.failure = failure.reason, failure
        return False
    status = count_budget(trials, total)
    if status.all_taken:
        lock.release()
        if wait is not None and wait_for_running(study, wait):
            return None
        result.stopped, result.budget_reached = f"study budget of {total} trials reached", True
        return False
    return True


def _all_taken(study: optuna.Study, total: int) -> bool:
    """Every trial of the budget is running or done: a waiting worker goes on, to see it end."""
    status = count_budget(study.get_trials(deepcopy=False), total)
    return status.all_taken


def _limit_reached(result: WorkerResult, n_trials: int | None, deadline: float | None, timeout: float | None) -> bool:
    """This worker's own limits (not the study's budget): `n_trials` run here, or the timeout."""
    if n_trials is not None and result.ran >= n_trials:
        result.stopped = f"ran the {n_trials} trials asked of this worker"
        return True
    if deadline is not None and time.monotonic() >= deadline:
        result.stopped = f"timeout of {timeout:g} s reached"
        return True
    return False


def _run_one(study: optuna.Study, objective: TrialRunner, tracker: _Tracker, lock: BudgetLock,
             callbacks: list[Callable[[optuna.Study, FrozenTrial], None]] | None, result: WorkerResult,
             timeout: float | None) -> bool:
    """Run one trial (the runner releases the budget lock once it exists); False when this worker
    must stop: the study's timeout requeued the trial in flight."""
    try:
        study.optimize(objective, n_trials=1, catch=(TrialError,), callbacks=callbacks)
    except Stop as stop:
        if not stop.ending.end.requeued:
            raise
        lock.release()
        _requeue_current(study, tracker, objective, result, "study timeout")
        result.stopped = f"timeout of {timeout:g} s reached"
        if result.interrupted_trial is not None:
            result.stopped += (f"; trial {result.interrupted_trial} is queued and resumes from epoch "
                               f"{result.resumes_from_epoch} on the next run")
        return False
    except KeyboardInterrupt:
        lock.release()  # before the storage writes below
        _requeue_current(study, tracker, objective, result, f"interrupted ({stopping.requested() or 'stopped'})")
        raise Interrupted(result) from None
    except Exception as e:
        if objective.taken_over is not None:
            tracker.warn(f"trial {objective.taken_over} was taken over by another worker while this one "
                         "was stopped (past the grace period); dropped it, going on")
            objective.taken_over = tracker.current = None
            return True
        if not is_budget_spent(e):  # a gRPC proxy refused the trial: another worker took the last
            raise
        return True  # the budget check now says why this worker stops
    finally:
        lock.release()
    result.ran += 1
    return True


def reclaim(study: optuna.Study, listener: Listener, exits: Mapping[int, str] | None = None) -> list[int]:
    """Take back, at once, the trials a process on this machine left running when it ended
    (`exits`: how the processes this one started ended, by pid, for the trials' reasons)."""
    if numbers := reclaim_orphans(study, exits):
        listener.note(f"trial{'s' if len(numbers) > 1 else ''} {', '.join(map(str, numbers))} {'were' if len(numbers) > 1 else 'was'} "
                      "left running by a process on this machine that is gone; queued to resume from "
                      f"{'their checkpoints' if len(numbers) > 1 else 'its checkpoint'}")
    return numbers


def _study_gone(study: optuna.Study) -> bool:
    try:
        storage_of(study).get_study_id_from_name(study.study_name)
    except KeyError:
        return True
    except Exception:
        return False  # the storage itself is failing: that error says more
    return False


def training_function(spec: StudySpec, device: torch.device,
                      data: DataCache | None = None) -> tuple[Callable[[Trial], Any], str]:
    """The spec's training function and how messages name it: the user's `train`, imported (a
    one-line error when it cannot be), or hpo's own loop over the spec's model and data."""
    if spec.train is not None:
        from hpo.spec.user_code import load

        return load(spec.train, "train"), f"train: {spec.train}"
    from hpo.training.builtin import BuiltinTraining

    data = data or DataCache(spec.builtin_data, spec.seed, device, spec.model)
    return BuiltinTraining(spec, data), f"model: {spec.model}"


def _requeue_current(study: optuna.Study, tracker: _Tracker, objective: TrialRunner, result: WorkerResult,
                     why: str) -> None:
    """The trial in flight was stopped from outside (Ctrl-C, the study's timeout): queue its
    retry, which resumes from the trial's last checkpoint."""
    if tracker.current is None:
        return
    trial_id = storage_of(study).get_trial_id_from_study_id_trial_number(study_id(study), tracker.current)
    current = objective.current
    epoch, in_flight = (current.checkpointed_epoch, current._epoch_in_flight()) if current else (0, 0)
    if requeue(study, trial_id, f"{why} in epoch {in_flight}") is not None:
        result.interrupted_trial = tracker.current
        result.resumes_from_epoch = epoch
    tracker.current = None


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the worker; `result` says which trial will resume where."""

    def __init__(self, result: WorkerResult) -> None:
        super().__init__()
        self.result = result
