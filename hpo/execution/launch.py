"""Run a study here or in local worker processes, with progress, then score the best model.

The CLI's `run` and `worker` commands call these; they print progress to stderr through
hpo.ui.progress and leave the summary and exit status to the caller.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpo._private import import_dynamo
from hpo.data.splits import DataCache
from hpo.errors import HpoError, SettingError, is_storage_failure
from hpo.execution.headstart import HeadStart
from hpo.execution.processes import (
    WorkerSettings,
    can_fork,
    fork,
    launch,
    plan,
    supervise,
)
from hpo.execution.share import HostSlot, ThreadShare
from hpo.execution.supervisor import announce, finished
from hpo.execution.worker import Interrupted, WorkerResult, reclaim, run_worker
from hpo.runtime import stopping
from hpo.runtime.listener import Listener
from hpo.runtime.stopping import StudyStopWatch
from hpo.search.budget import budget_status
from hpo.search.failures import FailureStop, run_verdict
from hpo.search.results import finalize
from hpo.search.samplers import effective_n_trials
from hpo.search.study import StudyHandle, choose_device, stop_requests
from hpo.spec.schema import StudySpec
from hpo.storage.backends import Heartbeat, forget_connections
from hpo.storage.urls import mask, reason
from hpo.ui.progress import Progress

if TYPE_CHECKING:
    from hpo.execution.processes import Process


@dataclass
class Outcome:
    elapsed: float
    stopped: str = ""
    failed_workers: list[int] = field(default_factory=list)  # exit codes of workers that failed
    failure: FailureStop | None = None  # the run stopped on failures, or ended with failures and no result
    errors: list[str] = field(default_factory=list)  # why workers could not go on, each once
    interrupted: str | None = None  # a stop ended the run: the signal's name or "hpo stop"
    code: int = 0  # the exit status a stop gives (128 + the signal's number; 0 for hpo stop)


@dataclass(frozen=True)
class Ending:
    """How a run ended, for a person: written once here for `hpo run`, `hpo worker` and `hpo.run()`.
    `error`: the one line of a run that could not do what was asked (its workers' errors, failures,
    workers that exited with an error): the CLI exits 1 with it, hpo.run() raises hpo.HpoError.
    Otherwise `stopped`: a stop (Ctrl-C, SIGTERM, hpo stop) queued its trials, said by `line` and
    the exit status `code`; or the run reached its end (code 0, no line)."""

    code: int
    line: str = ""
    error: bool = False
    stopped: str | None = None  # the signal's name or "hpo stop"
    why: str = ""  # what the lines printed before `line` said (the failures), for an exception's message

    @property
    def message(self) -> str:
        """The error as one message, for hpo.run()'s exception: with what the terminal showed above it."""
        return self.line.replace(" stopped on failures;", f" stopped on failures: {self.why};") if self.why else self.line


def run_ending(outcome: Outcome, name: str, n_workers: int) -> Ending:
    from hpo.search.failures import advice

    if outcome.interrupted is not None:
        return Ending(outcome.code, outcome.stopped, stopped=outcome.interrupted)
    if outcome.errors:
        more = f" (and {len(outcome.errors) - 1} more)" if len(outcome.errors) > 1 else ""
        return Ending(1, outcome.errors[0] + more, error=True)
    if outcome.failure is not None:  # "Stopped: <why>" and the user's frames were printed above this line
        return Ending(1, f"study {name} stopped on failures; {advice(name)}", error=True, why=outcome.failure.reason)
    if outcome.failed_workers:
        return Ending(1, f"{len(outcome.failed_workers)} of {n_workers} workers exited with an error (exit codes "
                         f"{outcome.failed_workers})", error=True)
    return Ending(0)


def prepare(spec: StudySpec, device: Any, ahead: HeadStart | None = None) -> DataCache | None:
    """Import the spec's user code and load the data of hpo's own loop (None for a train function):
    before any storage is touched, so these mistakes write nothing. `ahead`: the data already
    loaded by the run's head start."""
    from hpo.spec.user_code import load_references

    load_references(spec)
    if spec.execution.tensorboard:
        from hpo.runtime.tensorboard import check_available

        check_available(spec.source)
    if spec.train is not None:
        return None
    return DataCache(spec.builtin_data, spec.seed, device, spec.model, raw=ahead.data() if ahead else None)


def work(handle: StudyHandle, device: Any, data: DataCache | None, listener: Listener, *, n_trials: int | None,
         timeout: float | None, checkpoint_interval: float, since: float, threads: ThreadShare,
         label_output: bool = False) -> WorkerResult:
    """One worker's trials, fused or one at a time as the spec says, until the budget, a limit,
    the run's failures or a stop (a signal, or `hpo stop` seen in the study) ends them; before
    each trial the worker takes its share of the host's CPUs."""
    spec = handle.spec
    stopping.runs_trials()
    watch = StudyStopWatch(lambda: stop_requests(handle.study))
    try:
        if spec.execution.mode == "fused":
            from hpo.execution.fused_worker import run_fused_worker

            return run_fused_worker(handle, device=device, group_size=spec.execution.group_size, n_trials=n_trials,
                                    timeout=timeout, listener=listener, data=data,
                                    checkpoint_interval=checkpoint_interval, since=since, before_trial=threads.apply)
        return run_worker(handle, device=device, n_trials=n_trials, timeout=timeout, listener=listener, data=data,
                          checkpoint_interval=checkpoint_interval, since=since, before_trial=threads.apply,
                          turn=threads.turn, label_output=label_output)
    finally:
        watch.close()


class Stopped(Exception):
    """A stop request ended the run: `why` is the signal's name or "hpo stop", `code` the exit
    status (128 + the signal's number, 0 for hpo stop); the message says what resumes where."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.why = stopping.requested() or "SIGINT"
        self.code = stopping.exit_code()


def _head() -> str:
    why = stopping.requested()
    return "Stopped by hpo stop" if why == stopping.BY_COMMAND else f"Interrupted ({why or 'SIGINT'})"


def _stopped(result: WorkerResult | None) -> Stopped:
    if result is not None and result.interrupted_trial is not None:
        return Stopped(f"{_head()}: trial {result.interrupted_trial} is queued and resumes from epoch "
                       f"{result.resumes_from_epoch} on the next run.")
    return Stopped(f"{_head()}.")


def failure_outcome(handle: StudyHandle, since: float, listener: Listener) -> FailureStop | None:
    """Whether the run that started at `since` stopped on failures, or ended with failures and no
    result, judged from the storage (every worker's trials), and told with the user's frames
    (even when quiet: it is why the run fails)."""
    stop = run_verdict(handle.study.get_trials(deepcopy=False), since, handle.spec.budget.failure_limit)
    if stop is not None:
        listener.warn(f"Stopped: {stop.reason}")
        if stop.frames:
            listener.warn(stop.frames)
    return stop


def run_here(
    handle: StudyHandle,
    device: Any,
    data: DataCache | None,
    *,
    timeout: float | None,
    n_trials: int | None,
    quiet: bool,
    storage_url: str,
    checkpoint_interval: float = 2.0,
    slot: HostSlot | None = None,
    threads: int | None = None,
    label_output: bool = False,
) -> Outcome:
    """Run trials in this process (fused or one at a time), then score the best model. `slot`:
    this worker's place among the host's hpo workers (taken here when not given); `threads`:
    --threads, which wins over its share of the CPUs; `label_output`: one worker among others
    (`hpo worker`), so what a trial prints says its number."""
    spec = handle.spec
    slot = slot or HostSlot()
    share = ThreadShare(slot, threads)
    progress = Progress(effective_n_trials(spec), spec.metric, spec.budget.epochs, quiet,
                        objectives=tuple(o.name for o in spec.goals),
                        time_budget=timeout if timeout is not None else spec.budget.timeout)
    fused = ""
    if spec.execution.mode == "fused":
        grouped = "width and depth padded per trial" if spec.execution.pads(device.type) else "grouped by structure"
        fused = f", fused {spec.execution.group_size} trials at a time ({grouped})"
    streamed = ""
    if data is not None and data.streamed is not None:
        s = data.streamed.train
        streamed = f", data streamed through a DataLoader ({getattr(s, 'workers', 0)} workers)"
    where = f"{device}, {share.apply().describe()}{_per_trial(spec)}"
    progress.say(f"Study {spec.name}: {_budget(spec, timeout)} on {where}{fused}{streamed}, storage "
                 f"{mask(storage_url)}")
    for note in handle.notes:
        progress.warn(note)
    start, since = time.monotonic(), time.time()
    announce(storage_url, spec.name)  # the parent of `hpo run`/`hpo worker` takes back what a crash leaves
    try:
        result = work(handle, device, data, progress, n_trials=n_trials, timeout=timeout,
                      checkpoint_interval=checkpoint_interval, since=since, threads=share, label_output=label_output)
    except Interrupted as e:
        finished()  # the trial in flight is queued
        progress.close()
        raise _stopped(e.result) from None
    finally:
        slot.close()
    finished()
    progress.close()
    finalize(handle, device, data)
    if result.failure is None:
        progress.say(f"Stopped: {result.stopped}.")
    return Outcome(time.monotonic() - start, result.stopped, failure=failure_outcome(handle, since, progress))


def run_in_processes(
    handle: StudyHandle,
    storage_url: str,
    n_workers: int,
    gpu_ids: list[int] | None,
    device: str,
    *,
    timeout: float | None,
    heartbeat: Heartbeat,
    quiet: bool,
    checkpoint_interval: float,
    data: DataCache | None = None,
) -> Outcome:
    """Start local workers (forked from this process on a CPU, `hpo worker` processes for GPUs),
    show their progress from the storage, then score."""
    spec, study = handle.spec, handle.study
    dev = choose_device("cuda" if gpu_ids else device)
    plans = plan(n_workers, gpu_ids, device, per_trial=spec.execution.processes_per_trial)
    progress = Progress(effective_n_trials(spec), spec.metric, spec.budget.epochs, quiet,
                        objectives=tuple(o.name for o in spec.goals),
                        time_budget=timeout if timeout is not None else spec.budget.timeout)
    where = (f"GPUs {','.join(map(str, gpu_ids))}" if gpu_ids
             else f"{dev}, {plans[0].threads} thread{'s' if plans[0].threads > 1 else ''} each") + _per_trial(spec)
    progress.say(f"Study {spec.name}: {_budget(spec, timeout)}, {n_workers} workers ({where}), storage "
                 f"{mask(storage_url)}")
    for note in handle.notes:
        progress.warn(note)
    reclaim(study, progress)  # here, where it is said; the workers would find nothing left to take
    start, since, asked = time.monotonic(), time.time(), stop_requests(study)
    messages: Path | None = None  # forked workers leave their one-line errors here
    procs: Sequence[Process]
    if dev.type != "cpu" or not can_fork():
        settings = WorkerSettings(str(handle.artifacts.path.resolve()), "cuda", 1, heartbeat.interval, heartbeat.grace,
                                  checkpoint_interval, spec.execution.group_size if spec.execution.mode == "fused"
                                  else None, timeout, spec.execution.processes_per_trial)
        procs = launch(spec.name, storage_url, plans, settings)
    else:
        messages = Path(tempfile.mkdtemp(prefix="hpo-workers-"))

        def body(index: int) -> int:
            assert messages is not None
            return _forked_worker(handle, storage_url, messages / str(index), plans[index].threads, data,
                                  heartbeat, timeout=timeout, checkpoint_interval=checkpoint_interval, since=since)

        procs = fork(len(plans), body)
    watch = _Watch(study, progress, procs)
    try:
        codes = supervise(procs, watch.tick)
    except KeyboardInterrupt:
        watch.tick()  # a worker killed after the grace period left its trial running: queue it now
        progress.close()
        raise Stopped(f"{_head()}: every worker queued its trial; the next run resumes them.") from None
    finally:
        if messages is not None:
            watch.errors[:0] = _collect(messages)
    progress.close()
    if stop_requests(study) != asked:
        stopping.request(stopping.BY_COMMAND)
        raise Stopped(f"{_head()}: every worker queued its trial; the next run resumes them.")
    finalize(handle, dev, data)
    _say_end(progress, study, timeout if timeout is not None else spec.budget.timeout)
    codes = watch.settle(codes)
    errors = list(dict.fromkeys(watch.errors))
    failure = None if errors else failure_outcome(handle, since, progress)  # a worker's error says more
    return Outcome(time.monotonic() - start, "", codes or [0 for _ in errors], failure, errors)


class _Watch:
    """What the run sees of its workers between polls: the trials they finish (shown), and the
    workers that exit, whose trial in flight it queues again at once, with how they ended."""

    def __init__(self, study: Any, progress: Progress, procs: Sequence[Process]) -> None:
        self.study, self.progress, self.procs = study, progress, procs
        self.seen: set[int] = set()
        self.gone: set[int] = set()
        self.errors: list[str] = []  # what the workers could not go on with
        self.requeued: dict[int, tuple[tuple[int, ...], str]] = {}  # a dead worker's pid: its trials queued, how

    def tick(self) -> None:
        from hpo.execution.supervisor import DEATH_CAUSES, ended

        for p in self.procs:
            if (code := p.poll()) is not None and p.pid not in self.gone:
                self.gone.add(p.pid)
                if reclaimed := reclaim(self.study, self.progress, {p.pid: ended(code)}):
                    if reclaimed.dropped:
                        self.errors.append(f"a worker process {ended(code)} under a trial, which is past its retry "
                                           f"cap and not retried again{DEATH_CAUSES}")
                    else:
                        self.requeued[p.pid] = (reclaimed.queued, ended(code))
        for t in self.study.get_trials(deepcopy=False):
            if t.state.is_finished() and t.number not in self.seen:
                self.seen.add(t.number)
                self.progress.trial_finished(self.study, t)

    def settle(self, codes: list[int]) -> list[int]:
        """At the run's end, each worker that died under a trial (its trial queued here, or taken
        back first by another worker): where every trial it left was retried to its end in this
        run, a warning (the study lost nothing), and its exit code is not a failure; otherwise an
        error, for a trial is still queued. Returns the exit codes (of `codes`, one per worker)
        that are failures."""
        from optuna.trial import TrialState

        from hpo.execution.supervisor import DEATH_CAUSES, ended
        from hpo.storage.retry import OWNER_ATTR, owned_here_by, retried_by

        died = {p.pid: code for p in self.procs if (code := p.poll())} | {pid: None for pid in self.requeued}
        if not died:
            return [c for c in codes if c]
        trials = self.study.get_trials(deepcopy=False)
        retried = {n for t in trials for n in retried_by(t)}
        finished = {n for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED) for n in retried_by(t)}
        recovered = set()
        for pid in died:
            numbers, how = self.requeued.get(pid, ((), ""))
            left = {*numbers, *(t.number for t in trials if t.state == TrialState.FAIL and t.number in retried
                                and owned_here_by(t.system_attrs.get(OWNER_ATTR), pid))}
            which = f"trial {', '.join(map(str, sorted(left)))}"
            if left and finished.issuperset(left):
                recovered.add(pid)
                self.progress.warn(f"hpo: a worker process {how or ended(died[pid])} under {which}, which resumed from "
                                   f"its checkpoint and finished in this run{DEATH_CAUSES}")
            elif numbers:
                self.errors.append(f"a worker process {how} under {which}, which is queued to resume from its "
                                   f"checkpoint{DEATH_CAUSES}")
        return [c for p, c in zip(self.procs, codes) if c and p.pid not in recovered]


def _budget(spec: StudySpec, timeout: float | None) -> str:
    """"30 trials x 25 epochs", "trials for 10m x 25 epochs": the budget this run works to."""
    from dataclasses import replace

    budget = spec.budget if timeout is None else replace(spec.budget, timeout=timeout)
    return budget.describe() if spec.sampler.name != "grid" else \
        replace(budget, n_trials=effective_n_trials(spec)).describe()


def _per_trial(spec: StudySpec) -> str:
    n = spec.execution.processes_per_trial
    return f", {n} processes per trial" if n > 1 else ""


def _say_end(progress: Progress, study: Any, timeout: float | None) -> None:
    left = budget_status(study, progress.total)
    if left.all_taken and left.running == 0:
        progress.say(f"Stopped: study budget of {progress.total} trials reached.")
    elif left.waiting and timeout is not None:
        progress.say(f"Stopped: timeout of {timeout:g} s reached; {left.waiting} trials are queued and resume on "
                     "the next run.")


def _collect(folder: Path) -> list[str]:
    """The one-line errors the forked workers left in `folder`, in worker order, and the folder gone."""
    import shutil

    out = [f.read_text().strip() for f in sorted(folder.glob("*"), key=lambda f: int(f.name))]
    shutil.rmtree(folder, ignore_errors=True)
    return [line for line in out if line]


def _forked_worker(handle: StudyHandle, storage_url: str, message: Path, threads: int, data: DataCache | None,
                   heartbeat: Heartbeat, *, timeout: float | None, checkpoint_interval: float, since: float) -> int:
    """A worker forked from `hpo run` after it loaded torch, the user's code and the data: it
    starts at once, sharing them, with its own storage connection. An error it cannot go on with
    is left in `message` for the run, which says each once."""
    import torch

    torch.set_num_threads(threads)  # as a DataLoader worker does after its fork; its share before each trial
    forget_connections(handle.study)
    options = RunOptions(storage_url, heartbeat=heartbeat, artifacts=str(handle.artifacts.path.resolve()))
    try:
        with forked_run(handle.spec, options, data) as mine:
            work(mine, choose_device("cpu"), data, Notes(), n_trials=None, timeout=timeout,
                 checkpoint_interval=checkpoint_interval, since=since, threads=ThreadShare(HostSlot(), cap=threads),
                 label_output=True)
    except Interrupted:
        return stopping.exit_code()
    except Exception as e:
        if isinstance(e, HpoError):
            message.write_text(str(e))
        elif is_storage_failure(e):
            message.write_text(f"storage error: {reason(e)}")
        else:  # a bug in hpo: its traceback, as the run's own process would show it
            message.write_text("".join(traceback.format_exception(e)).rstrip())
        return 1
    return 0


class Notes(Listener):
    """A forked worker's front end: the run's own process shows trials from the storage; the
    worker says only what the run cannot see there (a trial taken over after a freeze)."""

    def warn(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class RunOptions:
    """How to run a study here: what `hpo run`'s and `hpo worker`'s flags and `hpo.run()`'s
    arguments say."""

    storage_url: str
    workers: int | None = None  # None: execution.workers, else one per core (or per GPU)
    gpu_ids: list[int] | None = None
    device: str = "auto"
    timeout: float | None = None
    heartbeat: Heartbeat = field(default_factory=Heartbeat)
    quiet: bool = False
    checkpoint_interval: float = 2.0
    artifacts: str | None = None
    fuse: int | None = None  # run fused groups of this size, whatever the spec says
    procs_per_trial: int | None = None  # processes per trial, whatever the spec says


@contextlib.contextmanager
def run_spec(spec: StudySpec, options: RunOptions, device: Any,
             ahead: HeadStart | None = None) -> Iterator[tuple[StudyHandle, DataCache | None]]:
    """A spec run here (`hpo run`, `hpo.run()`): its user code and data first (their mistakes
    write nothing), then the study created or resumed. `ahead`: the run's head start
    (hpo.execution.headstart), whose data and tables it takes."""
    from hpo.search.study import open_for_spec

    spec = _with_overrides(spec, options)
    _share_dynamo(device)
    data = prepare(spec, device, ahead)
    with _storage(options, spec.name, create=True, ahead=ahead) as store:
        yield open_for_spec(spec, store, options.storage_url, options.artifacts), data


@contextlib.contextmanager
def join_study(name: str, options: RunOptions, device: Any) -> Iterator[tuple[StudyHandle, DataCache | None]]:
    """A stored study a worker joins by name (`hpo worker`): the spec stored in it (with the
    worker's overrides), then the code and data that spec names."""
    from hpo.search.study import open_existing

    _share_dynamo(device)
    with _storage(options, name, create=False) as store:
        handle = open_existing(name, store, options.storage_url, options.artifacts)
        handle.spec = _with_overrides(handle.spec, options)
        yield handle, prepare(handle.spec, device)


@contextlib.contextmanager
def forked_run(spec: StudySpec, options: RunOptions, data: DataCache | None) -> Iterator[StudyHandle]:
    """A worker forked from the run: the run's spec (its overrides applied) and data, nothing
    loaded again, and a storage the run has made ready."""
    from hpo.search.study import open_existing

    with _storage(options, spec.name, create=False, checked=True) as store:
        handle = open_existing(spec.name, store, options.storage_url, options.artifacts)
        handle.spec = spec
        yield handle


def _with_overrides(spec: StudySpec, options: RunOptions) -> StudySpec:
    """The spec with the run's `fuse` and `procs_per_trial` settings, where given."""
    from hpo.spec.validate import with_fusion, with_processes

    if options.fuse is not None:
        spec = with_fusion(spec, options.fuse)
    if options.procs_per_trial is not None:
        spec = with_processes(spec, options.procs_per_trial)
    return spec


def _share_dynamo(device: Any) -> None:
    """Once, in the process that forks the workers: CPU workers share it (GPU workers are processes
    of their own); before the data, so that it overlaps the head start's loading."""
    if device.type == "cpu":
        import_dynamo()


@contextlib.contextmanager
def _storage(options: RunOptions, name: str, *, create: bool, checked: bool = False,
             ahead: HeadStart | None = None) -> Iterator[Any]:
    """The run sequence's storage step, written once: the study held on a SQLite file (one run
    per study there), then the storage opened (`create`: its tables made if missing; `checked`:
    known to be ready, by the run that forked this worker or its head start)."""
    from hpo.storage.backends import open_storage
    from hpo.storage.locks import sole_writer

    with sole_writer(options.storage_url, name):
        ready = ahead is not None and ahead.storage_ready()
        store = open_storage(options.storage_url, create=create, heartbeat=options.heartbeat,
                             checked=checked or ready)
        if ahead is not None:
            ahead.taken()
        yield store


def run_study(spec: StudySpec, options: RunOptions, ahead: HeadStart | None = None) -> tuple[StudyHandle, Outcome, int]:
    """`hpo run` and `hpo.run()`: the run sequence (run_spec), then the trials in this process
    (one worker) or in local worker processes, then the best model scored. Returns the study, how
    the run ended and how many workers ran."""
    from hpo.execution.processes import auto_workers

    gpu_ids = options.gpu_ids
    dev = choose_device("cuda" if gpu_ids else options.device)
    with run_spec(spec, options, dev, ahead=ahead) as (handle, data):
        n_workers = options.workers or spec.execution.workers or auto_workers(handle, dev, gpu_ids)
        per_trial = handle.spec.execution.processes_per_trial
        if gpu_ids and len(gpu_ids) < per_trial * n_workers:
            raise SettingError("gpus", f"{n_workers} workers with {per_trial} processes per trial need "
                                       f"{per_trial * n_workers} GPUs; {len(gpu_ids)} listed")
        start = time.monotonic()
        try:
            if n_workers == 1 and not gpu_ids:
                outcome = run_here(handle, dev, data, timeout=options.timeout, n_trials=None, quiet=options.quiet,
                                   storage_url=options.storage_url, checkpoint_interval=options.checkpoint_interval)
            else:
                outcome = run_in_processes(handle, options.storage_url, n_workers, gpu_ids, options.device,
                                           timeout=options.timeout, heartbeat=options.heartbeat, quiet=options.quiet,
                                           checkpoint_interval=options.checkpoint_interval, data=data)
        except Stopped as e:  # every trial in flight is queued: the run's result says so
            outcome = Outcome(time.monotonic() - start, str(e), interrupted=e.why, code=e.code)
    return handle, outcome, n_workers
