"""One worker running trials one at a time until the study's budget is met."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from hpo._private import storage_of
from hpo.data.splits import DataCache
from hpo.errors import StorageError
from hpo.runtime import stopping
from hpo.runtime.endings import CheckpointPolicy, Stop
from hpo.runtime.lifecycle import Lifecycle, Reclaimed, TakenOver, end_orphans
from hpo.runtime.listener import Listener
from hpo.runtime.runner import TrialRunner
from hpo.runtime.trial import Trial, TrialContext
from hpo.search.budget import wait_for_running
from hpo.search.failures import FailureStop
from hpo.search.samplers import effective_n_trials
from hpo.search.slots import Taken, TrialSlots
from hpo.search.study import StudyHandle
from hpo.spec.schema import StudySpec
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
    listener = listener or Listener()
    train_fn, who = training_function(spec, device, data)
    timeout = timeout if timeout is not None else spec.budget.timeout
    deadline = time.monotonic() + timeout if timeout else None
    life = Lifecycle(study, handle.artifacts, listener)
    runner = TrialRunner(TrialContext(spec, handle.artifacts, device, listener, CheckpointPolicy(checkpoint_interval),
                                      deadline, who, label_output, rank_training), life, train_fn)
    slots = TrialSlots(study, effective_n_trials(spec), time.time() if since is None else since,
                       spec.budget.failure_limit, listener.warn, spec)
    result = WorkerResult()
    reclaim(study, listener)
    pending: optuna.Trial | None = None  # a trial taken and not yet in the runner's hands
    try:
        while not _limit_reached(result, n_trials, deadline, timeout):
            if stopping.requested():  # a stop that came between trials (hpo stop)
                raise Interrupted(result)
            if not turn(listener.note) and not slots.all_taken():
                continue  # more workers than CPUs on this host, the others busy: turn() waited a moment
            with stopping.shielded():  # a signal here would leave a new trial running with no owner; a stop
                taken = slots.take()  # that came meanwhile (or `hpo stop`, seen by take) is raised as it ends
                pending = taken.trials[0] if taken.trials else None
            if not taken.trials:
                if _more_may_come(study, taken, wait_for_others, listener.note):
                    continue
                result.stopped, result.failure, result.budget_reached = taken.stopped, taken.failure, taken.budget_reached
                break
            before_trial()  # this worker's share of the host's CPUs, read again
            if not _run_one(runner, taken.trials[0], listener, result, timeout):
                break
    except Interrupted:
        raise
    except KeyboardInterrupt:
        if pending is not None and runner.took is not pending:  # stopped before it started: queued again
            life.abandon(pending, f"interrupted ({stopping.requested() or 'stopped'}) before it started")
        raise Interrupted(result) from None
    except Exception:
        if _study_gone(study):  # `hpo delete` while this worker ran: say so, no traceback
            raise StorageError(f"study {study.study_name!r} was deleted while this worker ran; stopped") from None
        raise
    finally:
        life.close()
    return result


def _more_may_come(study: optuna.Study, taken: Taken, wait_for_others: bool, note: Callable[[str], None]) -> bool:
    """Nothing to take now: whether to look again. A trial running elsewhere may still come back
    as a retry; a population member's failed segment may be about to (its retry is queued a moment
    after it fails)."""
    if ((taken.budget_reached and wait_for_others) or taken.busy) and wait_for_running(study, note):
        return True
    if taken.busy:
        time.sleep(0.2)
        return True
    return False


def _limit_reached(result: WorkerResult, n_trials: int | None, deadline: float | None, timeout: float | None) -> bool:
    """This worker's own limits (not the study's budget): `n_trials` run here, or the timeout."""
    if n_trials is not None and result.ran >= n_trials:
        result.stopped = f"ran the {n_trials} trials asked of this worker"
        return True
    if deadline is not None and time.monotonic() >= deadline:
        result.stopped = f"timeout of {timeout:g} s reached"
        return True
    return False


def _run_one(runner: TrialRunner, trial: optuna.Trial, listener: Listener, result: WorkerResult,
             timeout: float | None) -> bool:
    """Run one trial; False when this worker must stop: the study's timeout requeued it."""
    try:
        frozen = runner.run(trial)
    except Stop as stop:
        if not stop.ending.end.requeued:
            raise
        result.stopped = f"timeout of {timeout:g} s reached"
        if runner.resumes_from is not None:
            result.interrupted_trial, result.resumes_from_epoch = trial.number, runner.resumes_from
            result.stopped += (f"; trial {trial.number} is queued and resumes from epoch {runner.resumes_from} "
                               "on the next run")
        return False
    except KeyboardInterrupt:
        if runner.resumes_from is not None:
            result.interrupted_trial, result.resumes_from_epoch = trial.number, runner.resumes_from
        raise Interrupted(result) from None
    except TakenOver as e:
        listener.warn(str(e))
        return True
    result.ran += 1
    if frozen.state == TrialState.FAIL and runner.ctx.device.type == "cuda":  # its memory is handed back
        gc.collect()
        torch.cuda.empty_cache()
    return True


def reclaim(study: optuna.Study, listener: Listener, exits: Mapping[int, str] | None = None) -> Reclaimed:
    """Take back, at once, the trials a process on this machine left running when it ended
    (`exits`: how the processes this one started ended, by pid, for the trials' reasons)."""
    reclaimed = end_orphans(study, exits, listener.warn)
    if numbers := reclaimed.queued:
        listener.note(f"trial{'s' if len(numbers) > 1 else ''} {', '.join(map(str, numbers))} {'were' if len(numbers) > 1 else 'was'} "
                      "left running by a process on this machine that is gone; queued to resume from "
                      f"{'their checkpoints' if len(numbers) > 1 else 'its checkpoint'}")
    return reclaimed


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


def rank_training(spec: StudySpec, device: torch.device) -> Callable[[Trial], Any]:
    """The training function in another process of a multi-process trial (hpo.runtime.ranks)."""
    return training_function(spec, device)[0]


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the worker; `result` says which trial will resume where."""

    def __init__(self, result: WorkerResult) -> None:
        super().__init__()
        self.result = result
