"""Several local worker processes on one study: one per GPU, or CPU cores split between them.

Each worker is a separate `hpo worker` process (its own CUDA context, its own interpreter), so a
crash or an out-of-memory error in one cannot take the others down. Workers run in their own
process group: the parent alone receives Ctrl-C and forwards exactly one SIGINT to each, so every
worker requeues its trial once and exits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from hpo.errors import HpoError
from hpo.storage import ENV_STORAGE
from hpo.user_code import ADDED_PATHS

STOP_GRACE = 60.0  # seconds a worker gets to requeue its trial after SIGINT before SIGKILL


@dataclass(frozen=True)
class WorkerPlan:
    device: str
    threads: int
    env: dict[str, str]


def parse_gpus(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip() != ""]
    except ValueError:
        raise HpoError(f"--gpus: {text!r} is not a comma-separated list of GPU numbers, e.g. 0,1") from None
    if not ids or any(i < 0 for i in ids):
        raise HpoError(f"--gpus: {text!r} is not a comma-separated list of GPU numbers, e.g. 0,1")
    if len(set(ids)) != len(ids):
        raise HpoError(f"--gpus: {text!r} names a GPU twice")
    return ids


def check_parallel_storage(url: str, workers: int) -> None:
    """SQLite is not safe for several writer processes (Optuna FAQ): refuse, naming what is."""
    if workers > 1 and url.startswith("sqlite"):
        raise HpoError(
            f"{workers} workers need a server storage: SQLite is not safe for several writers. "
            "Use --storage postgresql://USER@HOST/DB or mysql+pymysql://USER@HOST/DB "
            "(or redis://HOST:6379 for a journal without crash recovery), or run one worker"
        )


def plan(workers: int, gpus: list[int] | None, device: str, cpu_count: int | None = None) -> list[WorkerPlan]:
    """One plan per worker: GPUs round-robin (pinned with CUDA_VISIBLE_DEVICES), else CPU threads split."""
    cores = cpu_count or os.cpu_count() or 1
    threads = max(1, cores // workers)
    out = []
    for i in range(workers):
        env = {"OMP_NUM_THREADS": str(threads)}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(gpus[i % len(gpus)])
            out.append(WorkerPlan("cuda", threads, env))
        else:
            out.append(WorkerPlan(device, threads, env))
    return out


def launch(
    study: str,
    storage_url: str,
    artifacts: str,
    plans: list[WorkerPlan],
    extra: list[str] | None = None,
) -> list[subprocess.Popen[bytes]]:
    procs = []
    for p in plans:
        env = dict(os.environ)
        env.update(p.env)
        env[ENV_STORAGE] = storage_url  # not on the command line, where `ps` would show a password
        if ADDED_PATHS:  # modules beside the study file: the workers import them too
            env["PYTHONPATH"] = os.pathsep.join([*ADDED_PATHS, *filter(None, [env.get("PYTHONPATH")])])
        cmd = [
            sys.executable, "-m", "hpo", "worker", study, "--artifacts", artifacts,
            "--device", p.device, "--threads", str(p.threads), "--quiet", *(extra or []),
        ]
        procs.append(subprocess.Popen(cmd, env=env, start_new_session=True))
    return procs


def supervise(procs: list[subprocess.Popen[bytes]], tick: Callable[[], None], every: float = 1.0) -> list[int]:
    """Wait for every worker, calling `tick` between polls; Ctrl-C stops them all cleanly."""
    try:
        while any(p.poll() is None for p in procs):
            tick()
            _wait_any(procs, every)
        tick()
        return [p.returncode for p in procs]
    except KeyboardInterrupt:
        stop(procs)
        raise


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + STOP_GRACE
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()  # its trial goes stale and is retried by the heartbeat mechanism
            p.wait()


def _wait_any(procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            return
        time.sleep(0.05)

