"""What a worker may use of its host, shared with the other hpo workers there: CPU threads and a GPU.

Left alone, every worker runs torch's default of one thread per core, so K workers on a host run
K x cores threads that spin against each other. Each worker that trains holds a slot, a file in
a folder of this host locked with flock for the worker's life (a `kill -9` frees it with the
process; there is no server), counts the slots of the workers that may run on the same CPUs in
the same Slurm allocation, and takes its share of the CPUs it may use: its CPU affinity
(taskset, Slurm's binding), a cgroup's CPU quota (a container's or pod's limit) and
SLURM_CPUS_PER_TASK. The count is read again before every trial, so the share follows the
workers that start and end; a worker past the CPUs waits while the workers ahead of it are busy.
`--threads` and a user's OMP_NUM_THREADS win; so do `--device cuda:N` and CUDA_VISIBLE_DEVICES
over the GPU a slot picks.
"""

from __future__ import annotations

import fcntl
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ENV_SLOTS = "HPO_SLOTS_DIR"  # the host-wide folder of slot files (default: the temp folder)
MAX_SLOTS = 4096


def slots_dir() -> Path:
    return Path(os.environ.get(ENV_SLOTS) or Path(tempfile.gettempdir()) / f"hpo-slots-{os.getuid()}")


@dataclass(frozen=True)
class Cpus:
    """The CPUs this process may use, and what limits them."""

    count: int
    limit: str  # "affinity", "cgroup quota" or "SLURM_CPUS_PER_TASK"


def usable_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> Cpus:
    try:
        found = [Cpus(len(os.sched_getaffinity(0)), "affinity")]
    except AttributeError:  # not Linux
        found = [Cpus(os.cpu_count() or 1, "affinity")]
    if (quota := cgroup_quota(cgroup_root)) is not None:
        found.append(Cpus(max(1, math.ceil(quota)), "cgroup quota"))
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        found.append(Cpus(int(slurm), "SLURM_CPUS_PER_TASK"))
    return min(found, key=lambda c: c.count)


def cgroup_quota(root: Path = Path("/sys/fs/cgroup"), proc: Path = Path("/proc/self/cgroup")) -> float | None:
    """The tightest CPU quota, in CPUs, of this process's cgroup and its ancestors: cgroup v2's
    `cpu.max` ("max 100000" or "QUOTA PERIOD") or v1's cpu.cfs_quota_us / cpu.cfs_period_us.
    torch counts the machine's cores, not the quota."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return None
    quotas: list[float] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: the unified hierarchy
            bases = [root, root / "unified"]
        elif "cpu" in controllers.split(","):
            bases = [root / controllers, root / "cpu", root / "cpu,cpuacct"]
        else:
            continue
        for base in bases:
            folder = base / path.lstrip("/")
            while True:
                quotas.extend(_quota(folder))
                if folder == base or base not in folder.parents:
                    break
                folder = folder.parent
    return min(quotas) if quotas else None


def _quota(folder: Path) -> list[float]:
    try:
        if (v2 := folder / "cpu.max").is_file():
            quota, period = v2.read_text().split()[:2]
            return [] if quota == "max" else [int(quota) / int(period)]
        if (v1 := folder / "cpu.cfs_quota_us").is_file():
            quota_us = int(v1.read_text())
            return [] if quota_us <= 0 else [quota_us / int((folder / "cpu.cfs_period_us").read_text())]
    except (OSError, ValueError):
        pass
    return []


class HostSlot:
    """This worker's place among the hpo workers of this host: the lowest slot file it could lock."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder or slots_dir()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.file: IO[str] | None = None
        self.index = -1
        for i in range(MAX_SLOTS):
            f = open(self.folder / f"{i}.slot", "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()} {_pid_namespace()} {_cpu_list()} {_allocation()}\n")  # see peers(), turn()
            f.flush()
            self.file, self.index = f, i
            return

    def held(self) -> list[int]:
        """The slots held now, this one included, in order. A slot that can be locked shared is
        free (its worker ended, even by kill -9); one held exclusively is a live worker's."""
        out = []
        for path in self.folder.glob("*.slot"):
            if not path.stem.isdigit():
                continue
            i = int(path.stem)
            if i == self.index:
                out.append(i)
                continue
            with open(path, "a+") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    out.append(i)
        return sorted(out)

    def _record(self, index: int) -> list[str]:
        try:
            return (self.folder / f"{index}.slot").read_text().split()
        except OSError:
            return []

    def pid(self, index: int) -> int | None:
        """The process that holds slot `index`, when it is in this process's PID namespace."""
        record = self._record(index)
        if len(record) < 2:
            return None
        pid, ns = record[:2]
        return int(pid) if pid.isdigit() and ns == _pid_namespace() else None

    def peers(self) -> list[int]:
        """The held slots whose workers share CPUs with this one, this one included, in order:
        those that may run on some of the same CPUs, within the same Slurm allocation (two array
        tasks on one node each hold their own CPUs, bound to them or not)."""
        mine, allocation = set(_cpu_list().split(",")), _allocation()
        out = []
        for i in self.held():
            record = self._record(i)
            # This worker, a record still being written (counted, to be safe), or a peer.
            if i == self.index or len(record) < 4 or (record[3] == allocation and mine & set(record[2].split(","))):
                out.append(i)
        return out

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


@dataclass(frozen=True)
class Share:
    threads: int
    rank: int  # 0-based among the workers of this host
    workers: int
    cpus: Cpus
    chosen: bool  # set by --threads or OMP_NUM_THREADS, not by the share
    ahead: tuple[int, ...] = ()  # the slots of the workers before this one that share its CPUs

    @property
    def past_cpus(self) -> bool:
        """More workers before this one than CPUs to share (a third on two cores), threads not asked for."""
        return not self.chosen and self.rank >= self.cpus.count

    def describe(self) -> str:
        plural = "s" if self.threads > 1 else ""
        usable = f"{self.cpus.count} usable CPU{'s' if self.cpus.count > 1 else ''}"
        if self.cpus.limit != "affinity":
            usable += f" ({self.cpus.limit})"
        how = " (as asked)" if self.chosen else ""
        return f"worker {self.rank + 1} of {self.workers} on this host: {self.threads} thread{plural}{how} of {usable}"


def _cpu_list() -> str:
    try:
        return ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return ",".join(str(c) for c in range(os.cpu_count() or 1))


def _allocation() -> str:
    """The Slurm task this process runs in (its CPUs are its own), or "-" outside Slurm."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return "-"
    return f"slurm:{job}.{os.environ.get('SLURM_ARRAY_TASK_ID', '')}.{os.environ.get('SLURM_PROCID', '0')}"


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return "-"


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) a process has used so far, None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def busy(pids: list[int], interval: float = 0.5, share: float = 0.2) -> int:
    """How many of `pids` used at least `share` of a CPU over the next `interval` seconds: a
    worker that is stopped, frozen or idle uses none, so it keeps no other worker waiting."""
    before = {pid: cpu_seconds(pid) for pid in pids}
    time.sleep(interval)
    after = {pid: cpu_seconds(pid) for pid in pids}
    return sum(1 for pid in pids if (b := before[pid]) is not None and (a := after[pid]) is not None
               and a - b >= share * interval)


def explicit_threads(asked: int | None) -> int | None:
    """--threads, else a user's OMP_NUM_THREADS: these win over the share."""
    if asked is not None:
        return asked
    omp = os.environ.get("OMP_NUM_THREADS", "")
    return int(omp) if omp.isdigit() and int(omp) > 0 else None


def share(slot: HostSlot, asked: int | None = None) -> Share:
    """This worker's threads now: its explicit setting, else the CPUs it may use divided among the
    workers of the host (the first ones take the remainder)."""
    cpus = usable_cpus()
    held = slot.peers() or [slot.index]
    workers = len(held)
    rank = held.index(slot.index) if slot.index in held else workers - 1
    ahead = tuple(held[:rank])
    if (chosen := explicit_threads(asked)) is not None:
        return Share(chosen, rank, workers, cpus, True, ahead)
    threads = max(1, cpus.count // workers + (1 if rank < cpus.count % workers else 0))
    return Share(threads, rank, workers, cpus, False, ahead)


def pick_gpu(slot_index: int, gpus: list[int]) -> int:
    """The GPU a worker takes among `gpus` (ids): distinct ones first, round-robin once the
    workers outnumber them."""
    return gpus[slot_index % len(gpus)]


class ThreadShare:
    """Sets torch's threads to this worker's share before each trial, as the host's workers come and go."""

    def __init__(self, slot: HostSlot, asked: int | None = None, cap: int | None = None) -> None:
        """`cap`: at most this many threads. A worker forked from a process that already ran
        torch's thread pool keeps to the threads it was forked with: OpenMP started before a
        fork can hang the child's first parallel region with more threads (seen: a forked worker
        stuck in Linear.forward after its share rose to 2)."""
        self.slot, self.asked, self.cap = slot, asked, cap
        self.waiting = False

    def apply(self) -> Share:
        import torch

        now = share(self.slot, self.asked)
        if self.cap is not None and now.threads > self.cap:
            now = replace(now, threads=self.cap)
        if torch.get_num_threads() != now.threads:
            torch.set_num_threads(now.threads)
        return now

    def turn(self, note: Callable[[str], None]) -> bool:
        """Whether this worker may start a trial now. A worker past the host's CPUs (three on two
        cores) waits while as many workers before it are busy training, rather than time-slice
        with them: three then go as fast as two, not slower. A worker before it that is stopped or
        idle does not count (it is measured, not assumed), so nothing waits on a frozen process.
        Threads that were asked for (--threads, OMP_NUM_THREADS) never wait."""
        now = self.apply()
        waits = now.past_cpus and _cpus_taken(self.slot, now)
        if waits and not self.waiting:
            note(_waits_line(now))
        self.waiting = waits
        return not waits


def _cpus_taken(slot: HostSlot, now: Share) -> bool:
    """As many workers before this one as it may use CPUs are busy training (a half-second look)."""
    return busy([pid for i in now.ahead if (pid := slot.pid(i)) is not None]) >= now.cpus.count


def _waits_line(now: Share) -> str:
    return (f"worker {now.rank + 1} of {now.workers} on this host: the {now.cpus.count} usable CPU"
            f"{'s are' if now.cpus.count > 1 else ' is'} busy with other workers; it starts a trial when one is free")


def wait_to_start(slot: HostSlot, asked: int | None, study_done: Callable[[], bool],
                  note: Callable[[str], None]) -> bool:
    """A worker started past the host's CPUs (a third on two cores) waits here, before it imports
    torch and loads its data: seconds of CPU that would slow the workers that train. It goes on
    when a CPU is free (True), or ends when the study needs no more trials (False). Cheap to
    call: it reads slot files and /proc, and the storage through `study_done` while it waits."""
    said = False
    while True:
        now = share(slot, asked)
        if not (now.past_cpus and _cpus_taken(slot, now)):
            return True
        if study_done():
            return False
        if not said:
            note(_waits_line(now))
            said = True


def device_for(name: str | None, slot: HostSlot) -> torch.device:
    """`--device` for a worker: `auto` on a host with several GPUs takes the slot's GPU (distinct
    ones first); CUDA_VISIBLE_DEVICES or an explicit cuda:N win."""
    import torch

    from hpo.search.study import choose_device

    if name in (None, "auto") and "CUDA_VISIBLE_DEVICES" not in os.environ and torch.cuda.is_available() \
            and torch.cuda.device_count() > 1:
        return torch.device(f"cuda:{pick_gpu(slot.index, list(range(torch.cuda.device_count())))}")
    return choose_device(name)
