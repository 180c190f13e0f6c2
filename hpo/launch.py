"""Run a study here or in local worker processes, with progress, then score the best model.

The CLI's `run` and `worker` commands call these; they print progress to stderr through
hpo.progress and leave the summary and exit status to the caller.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from hpo.data import DataCache
from hpo.progress import Progress
from hpo.results import finalize
from hpo.samplers import effective_n_trials
from hpo.spec import StudySpec
from hpo.storage import Heartbeat, mask
from hpo.study import StudyHandle, choose_device
from hpo.worker import Interrupted, run_worker


@dataclass
class Outcome:
    elapsed: float
    stopped: str = ""
    failed_workers: list[int] = field(default_factory=list)  # exit codes of workers that failed


def prepare(spec: StudySpec, device: Any) -> DataCache | None:
    """Import the spec's user code and load the data of hpo's own loop (None for a train function):
    before any storage is touched, so these mistakes write nothing."""
    from hpo.user_code import load_references

    load_references(spec)
    return DataCache(spec.builtin_data, spec.seed, device, spec.model) if spec.train is None else None


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
    progress = Progress(effective_n_trials(spec), spec.metric, spec.budget.epochs, quiet)
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
        if spec.execution.mode == "fused":
            from hpo.fused_study import run_fused_worker

            result = run_fused_worker(handle, device=device, group_size=spec.execution.group_size,
                                      n_trials=n_trials, timeout=timeout, listener=progress, data=data,
                                      checkpoint_interval=checkpoint_interval)
        else:
            result = run_worker(handle, device=device, n_trials=n_trials, timeout=timeout,
                                listener=progress, data=data, checkpoint_interval=checkpoint_interval)
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
) -> Outcome:
    """Start local `hpo worker` processes, show their progress from the storage, then score."""
    from hpo.workers import launch, plan, supervise

    spec, study = handle.spec, handle.study
    plans = plan(n_workers, gpu_ids, device)
    progress = Progress(effective_n_trials(spec), spec.metric, spec.budget.epochs, quiet)
    where = f"GPUs {','.join(map(str, gpu_ids))}" if gpu_ids else f"{plans[0].device}, {plans[0].threads} threads each"
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

    start = time.monotonic()
    procs = launch(spec.name, storage_url, str(handle.artifacts.path.resolve()), plans, extra)
    try:
        codes = supervise(procs, tick)
    except KeyboardInterrupt:
        progress.close()
        raise Stopped("Interrupted: every worker queued its trial; the next run resumes them.") from None
    progress.close()
    finalize(handle, choose_device("cuda" if gpu_ids else device))
    return Outcome(time.monotonic() - start, "", [c for c in codes if c])
