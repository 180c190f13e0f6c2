"""The local workers of one `hpo run`: forked from it on a CPU, `hpo worker` processes for GPUs.

Each worker is a process of its own (its own interpreter state, its own CUDA context), so a crash
or an out-of-memory error in one cannot take the others down. On a CPU they are forked after the
run has loaded torch, the user's code and the data, so they start at once and share that memory;
for GPUs each is a fresh `hpo worker` pinned with CUDA_VISIBLE_DEVICES (CUDA does not survive a
fork). Workers run in their own session: the parent alone receives Ctrl-C and forwards exactly
one SIGINT to each, so every worker requeues its trial once and exits; a worker whose parent dies
gets SIGTERM (Linux), so none writes on unsupervised.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Protocol

from hpo.errors import SettingError
from hpo.execution.supervisor import stop_with_parent
from hpo.search.budget import budget_status
from hpo.search.samplers import effective_n_trials
from hpo.spec.user_code import ADDED_PATHS
from hpo.storage.urls import ENV_STORAGE

if TYPE_CHECKING:
    import torch

    from hpo.search.study import StudyHandle


@dataclass(frozen=True)
class WorkerPlan:
    device: str
    threads: int
    env: dict[str, str]


ENV_SETTINGS = "HPO_WORKER_SETTINGS"  # a started worker's WorkerSettings, as JSON


@dataclass(frozen=True)
class WorkerSettings:
    """What `hpo run` gives each `hpo worker` process it starts (one per GPU): typed, and passed in
    the environment rather than as a command line, so only hpo.cli spells flags and a renamed
    flag cannot break these workers at run time."""

    artifacts: str
    device: str
    threads: int
    heartbeat_interval: int
    grace_period: int
    checkpoint_interval: float
    fuse: int | None = None
    timeout: float | None = None
    procs_per_trial: int | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def take_from_environment() -> WorkerSettings | None:
        """The settings of a worker `hpo run` started, removed from the environment (its own
        children are not such workers), or None for a worker started by hand."""
        text = os.environ.pop(ENV_SETTINGS, None)
        return WorkerSettings(**json.loads(text)) if text else None


def parse_gpus(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip() != ""]
    except ValueError:
        raise SettingError("gpus", f"{text!r} is not a comma-separated list of GPU numbers, e.g. 0,1") from None
    if not ids or any(i < 0 for i in ids):
        raise SettingError("gpus", f"{text!r} is not a comma-separated list of GPU numbers, e.g. 0,1")
    if len(set(ids)) != len(ids):
        raise SettingError("gpus", f"{text!r} names a GPU twice")
    return ids


def cpu_cores() -> int:
    """The cores this process may use (a container's or taskset's limit, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def auto_workers(handle: StudyHandle, device: torch.device, gpus: list[int] | None) -> int:
    """Trials at once by default: one per listed GPU; one on a single GPU (it is one device); on a
    CPU one per core, each on one thread (an MLP of this size leaves a second intra-op thread
    mostly idle; benchmarks/RESULTS.md), never more than the trials left to run."""
    per_trial = handle.spec.execution.processes_per_trial  # processes each trial runs on
    if gpus:
        return max(1, len(gpus) // per_trial)
    if device.type != "cpu":
        return 1
    status = budget_status(handle.study, effective_n_trials(handle.spec))
    return max(1, min(cpu_cores() // per_trial, status.remaining + status.waiting))


def plan(workers: int, gpus: list[int] | None, device: str, cpu_count: int | None = None,
         per_trial: int = 1) -> list[WorkerPlan]:
    """One plan per worker: GPUs round-robin, `per_trial` each (pinned with CUDA_VISIBLE_DEVICES),
    else CPU threads split (a worker splits its own between the processes of a trial)."""
    cores = cpu_count or os.cpu_count() or 1
    threads = max(1, cores // workers)
    out = []
    for i in range(workers):
        env = {"OMP_NUM_THREADS": str(threads)}
        if gpus:
            mine = [gpus[(i * per_trial + r) % len(gpus)] for r in range(per_trial)]
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, mine))
            out.append(WorkerPlan("cuda", threads, env))
        else:
            out.append(WorkerPlan(device, threads, env))
    return out


def launch(study: str, storage_url: str, plans: list[WorkerPlan], settings: WorkerSettings
           ) -> list[subprocess.Popen[bytes]]:
    """One `hpo worker STUDY` process per plan, its settings (with the plan's device and threads)
    and the storage URL in its environment."""
    procs = []
    for p in plans:
        env = dict(os.environ)
        env.update(p.env)
        env[ENV_STORAGE] = storage_url  # not on the command line, where `ps` would show a password
        env[ENV_SETTINGS] = replace(settings, device=p.device, threads=p.threads).to_json()
        if ADDED_PATHS:  # modules beside the study file: the workers import them too
            env["PYTHONPATH"] = os.pathsep.join([*ADDED_PATHS, *filter(None, [env.get("PYTHONPATH")])])
        procs.append(subprocess.Popen([sys.executable, "-m", "hpo", "worker", study], env=env,
                                      start_new_session=True, preexec_fn=stop_with_parent))
    return procs


class Process(Protocol):
    """What supervise() needs of a worker: a subprocess.Popen, or a ForkedProcess."""

    pid: int

    @property
    def returncode(self) -> int | None: ...

    def poll(self) -> int | None: ...

    def send_signal(self, sig: int) -> None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def kill(self) -> None: ...


def can_fork() -> bool:
    """Forking after torch and the data are loaded is safe on Linux as long as the child sets its
    own thread count (what DataLoader workers do); elsewhere workers start as new processes."""
    return sys.platform.startswith("linux")


class ForkedProcess:
    """A worker forked from this process, with Popen's methods."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._code: int | None = None

    @property
    def returncode(self) -> int | None:
        return self._code

    def poll(self) -> int | None:
        if self._code is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self._code = os.waitstatus_to_exitcode(status)
        return self._code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0.0)
            time.sleep(0.02)
        assert self._code is not None
        return self._code

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def fork(n: int, body: Callable[[int], int]) -> list[ForkedProcess]:
    """Fork n workers; worker i runs body(i) in its own session (the parent alone forwards Ctrl-C)
    and stops with the parent, and exits with body's code without running the parent's exit
    handlers."""
    sys.stdout.flush()
    sys.stderr.flush()
    procs = []
    for i in range(n):
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                os.setsid()
                stop_with_parent()
                code = body(i)
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        procs.append(ForkedProcess(pid))
    return procs


def supervise(procs: Sequence[Process], tick: Callable[[], None], every: float = 1.0) -> list[int]:
    """Wait for every worker, calling `tick` between polls; Ctrl-C stops them all cleanly."""
    try:
        while any(p.poll() is None for p in procs):
            tick()
            _wait_any(procs, every)
        tick()
        return [p.poll() or 0 for p in procs]
    except KeyboardInterrupt:
        stop(procs)
        raise


def stop(procs: Sequence[Process]) -> None:
    """Pass the stop on to every worker, as the signal this process got (SIGINT for a stop of
    another kind), and wait for them to queue their trials."""
    from hpo.runtime.stopping import by_signal

    sig = by_signal() or signal.SIGINT
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)
    from hpo.runtime.stopping import grace

    deadline = time.monotonic() + grace() + 5  # a worker kills itself after grace(); this is the backstop
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()  # its trial goes stale and is retried by the heartbeat mechanism
            p.wait()


def _wait_any(procs: Sequence[Process], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            return
        time.sleep(0.05)

