"""Run a study here or in local worker processes, with progress, then score the best model.

The CLI's `run` and `worker` commands call these; they print progress to stderr through
hpo.ui.progress and leave the summary and exit status to the caller.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hpo.data.splits import DataCache
from hpo.errors import HpoError
from hpo.execution.worker import Interrupted, WorkerResult, reclaim, run_worker
from hpo.runtime.listener import Listener
from hpo.search.budget import budget_status
from hpo.search.results import finalize
from hpo.search.samplers import effective_n_trials
from hpo.search.study import StudyHandle, choose_device
from hpo.spec.schema import StudySpec
from hpo.storage.backends import Heartbeat, forget_connections, mask, reason
from hpo.ui.progress import Progress

if TYPE_CHECKING:
    from hpo.execution.processes import Process


@dataclass
class Outcome:
    elapsed: float
    stopped: str = ""
    failed_workers: list[int] = field(default_factory=list)  # exit codes of workers that failed


def prepare(spec: StudySpec, device: Any) -> DataCache | None:
    """Import the spec's user code and load the data of hpo's own loop (None for a train function):
    before any storage is touched, so these mistakes write nothing."""
    from hpo.spec.user_code import load_references

    load_references(spec)
    return DataCache(spec.builtin_data, spec.seed, device, spec.model) if spec.train is None else None


def work(handle: StudyHandle, device: Any, data: DataCache | None, listener: Listener, *, n_trials: int | None,
         timeout: float | None, checkpoint_interval: float) -> WorkerResult:
    """One worker's trials, fused or one at a time as the spec says."""
    spec = handle.spec
    if spec.execution.mode == "fused":
        from hpo.execution.fused_worker import run_fused_worker

        return run_fused_worker(handle, device=device, group_size=spec.execution.group_size, n_trials=n_trials,
                                timeout=timeout, listener=listener, data=data,
                                checkpoint_interval=checkpoint_interval)
    return run_worker(handle, device=device, n_trials=n_trials, timeout=timeout, listener=listener, data=data,
                      checkpoint_interval=checkpoint_interval)


class Stopped(Exception):
    """Ctrl-C or SIGTERM ended the run; the message says what resumes where."""


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
) -> Outcome:
    """Run trials in this process (fused or one at a time), then score the best model."""
    spec = handle.spec
    progress = Progress(effective_n_trials(spec), spec.metric, spec.budget.epochs, quiet,
                        objectives=tuple(o.name for o in spec.goals))
    fused = ""
    if spec.execution.mode == "fused":
        grouped = "width and depth padded per trial" if spec.execution.pads(device.type) else "grouped by structure"
        fused = f", fused {spec.execution.group_size} trials at a time ({grouped})"
    streamed = ""
    if data is not None and data.streamed is not None:
        s = data.streamed.train
        streamed = f", data streamed through a DataLoader ({getattr(s, 'workers', 0)} workers)"
    progress.say(f"Study {spec.name}: {progress.total} trials x {spec.budget.epochs} epochs on {device}{fused}"
                 f"{streamed}, storage {mask(storage_url)}")
    start = time.monotonic()
    try:
        result = work(handle, device, data, progress, n_trials=n_trials, timeout=timeout,
                      checkpoint_interval=checkpoint_interval)
    except Interrupted as e:
        progress.close()
        r = e.result
        if r.interrupted_trial is not None:
            raise Stopped(f"Interrupted: trial {r.interrupted_trial} is queued and resumes from epoch "
                          f"{r.resumes_from_epoch} on the next run.") from None
        raise Stopped("Interrupted.") from None
    progress.close()
    finalize(handle, device, data)
    progress.say(f"Stopped: {result.stopped}.")
    return Outcome(time.monotonic() - start, result.stopped)


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
    from hpo.execution.processes import can_fork, fork, launch, plan, supervise

    spec, study = handle.spec, handle.study
    dev = choose_device("cuda" if gpu_ids else device)
    plans = plan(n_workers, gpu_ids, device)
    progress = Progress(effective_n_trials(spec), spec.metric, spec.budget.epochs, quiet,
                        objectives=tuple(o.name for o in spec.goals))
    where = (f"GPUs {','.join(map(str, gpu_ids))}" if gpu_ids
             else f"{dev}, {plans[0].threads} thread{'s' if plans[0].threads > 1 else ''} each")
    progress.say(f"Study {spec.name}: {progress.total} trials x {spec.budget.epochs} epochs, "
                 f"{n_workers} workers ({where}), storage {mask(storage_url)}")
    extra = ["--heartbeat-interval", str(heartbeat.interval), "--grace-period", str(heartbeat.grace),
             "--checkpoint-interval", str(checkpoint_interval)]
    if spec.execution.mode == "fused":
        extra += ["--fuse", str(spec.execution.group_size)]
    if timeout is not None:
        extra += ["--timeout", str(timeout)]
    seen: set[int] = set()

    def tick() -> None:
        for t in study.get_trials(deepcopy=False):
            if t.state.is_finished() and t.number not in seen:
                seen.add(t.number)
                progress.trial_finished(study, t)

    reclaim(study, progress)  # here, where it is said; the workers would find nothing left to take
    start = time.monotonic()
    procs: Sequence[Process]
    if dev.type != "cpu" or not can_fork():
        procs = launch(spec.name, storage_url, str(handle.artifacts.path.resolve()), plans, extra)
    else:
        def body(index: int) -> int:
            return _forked_worker(handle, storage_url, index, plans[index].threads, data, heartbeat,
                                  timeout=timeout, checkpoint_interval=checkpoint_interval)

        procs = fork(len(plans), body)
    try:
        codes = supervise(procs, tick)
    except KeyboardInterrupt:
        progress.close()
        raise Stopped("Interrupted: every worker queued its trial; the next run resumes them.") from None
    progress.close()
    finalize(handle, dev, data)
    left = budget_status(study, progress.total)
    if left.remaining <= 0 and left.waiting == 0 and left.running == 0:
        progress.say(f"Stopped: study budget of {progress.total} trials reached.")
    elif left.waiting and timeout is not None:
        progress.say(f"Stopped: timeout of {timeout:g} s reached; {left.waiting} trials are queued and resume on "
                     "the next run.")
    return Outcome(time.monotonic() - start, "", [c for c in codes if c])


def _forked_worker(handle: StudyHandle, storage_url: str, index: int, threads: int, data: DataCache | None,
                   heartbeat: Heartbeat, *, timeout: float | None, checkpoint_interval: float) -> int:
    """A worker forked from `hpo run` after it loaded torch, the user's code and the data: it
    starts at once, sharing them, with its own storage connection and its sampler's own seed."""
    import torch

    from hpo.search.study import open_existing
    from hpo.storage.backends import open_storage

    torch.set_num_threads(threads)  # as a DataLoader worker does after its fork
    forget_connections(handle.study)
    store = open_storage(storage_url, create=False, heartbeat=heartbeat, checked=True)
    mine = open_existing(handle.spec.name, store, storage_url, str(handle.artifacts.path.resolve()), index)
    mine.spec = handle.spec  # with the run's overrides (--fuse, --n-trials)
    try:
        work(mine, choose_device("cpu"), data, Listener(), n_trials=None, timeout=timeout,
             checkpoint_interval=checkpoint_interval)
    except Interrupted:
        return 130
    except Exception as e:
        print(f"hpo: worker {index}: {e if isinstance(e, HpoError) else reason(e)}", file=sys.stderr, flush=True)
        return 1
    return 0
