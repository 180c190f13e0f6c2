"""Trials of several processes (`execution.processes_per_trial: N`): distributed data-parallel
training inside one trial, on one machine.

The worker's process is rank 0: it owns the Optuna trial (sampling, heartbeats, reports,
checkpoints, the ending, all through hpo.runtime.lifecycle), starts ranks 1..N-1 for the trial
(fresh interpreters, as torchrun's are), and sets up `torch.distributed` in all of them (gloo on
a CPU, NCCL on CUDA, a TCP store on a free local port) before `train` is called. Every rank gets
the same parameters, seed, start epoch and checkpoint state. `report()` is where they agree:
each rank waits there for rank 0's decision on that epoch (go on, pruned, stopped), so a
decision is raised on all of them at the same epoch and none is left waiting in a collective.

Faults: a rank that raises sends its message and traceback to rank 0 and exits; one killed (kill
-9, the out-of-memory killer) is seen by its exit. Either way the collectives of the others fail
(gloo sees the closed connection) and rank 0 ends the trial with that rank's error, or as lost
and retried from its last checkpoint. When rank 0 dies the others are killed by the kernel
(PR_SET_PDEATHSIG) and the trial comes back as any dead worker's does. No rank outlives its trial.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import io
import multiprocessing
import multiprocessing.connection
import os
import select
import signal
import sys
import time
import traceback
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import optuna
import torch

from hpo._private import DYNAMO_MODULE
from hpo.data import seeding
from hpo.runtime import stopping
from hpo.runtime.endings import End, Ending, RemoteError, Stop, error_record, is_oom
from hpo.runtime.output import keep_rank_output
from hpo.runtime.trial import Trial, TrialPruned, trial_seed
from hpo.spec.schema import StudySpec
from hpo.spec.user_code import UserCodeError, register

START_TIMEOUT = 300.0  # seconds for the other ranks to import torch and the training code
END_WAIT = 30.0  # seconds the other ranks get to return from `train` once rank 0 has
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)  # torch's default, said here


def backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r's device: the r-th GPU after the worker's own (the worker sees the trial's GPUs), or
    the CPU."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


@dataclass(frozen=True)
class RankSetup:
    """What a rank > 0 is started with (pickled into a fresh interpreter)."""

    spec: StudySpec
    resolve: Callable[[StudySpec, torch.device], Callable[[Trial], Any]]  # the training function, there
    given: Callable[..., Any] | None  # a function object handed to hpo.run, pickled by reference
    rank: int
    world_size: int
    port: int
    device: str
    threads: int
    params: dict[str, Any]
    number: int
    first_number: int
    start_epoch: int
    checkpoint: bytes  # torch.save of (state, random streams): tensors travel as one blob
    log: str  # the trial's log file, shared by its ranks
    prefix: str  # what starts each line this rank prints
    parent: int  # rank 0's pid: a rank exits the moment rank 0 is gone
    environment: dict[str, str]  # rank 0's (the server the ranks are forked from keeps the one it started with)


@dataclass(frozen=True)
class RankFailure:
    """How another rank of the trial failed, as rank 0 ends the trial."""

    ending: Ending
    error: BaseException | None = None
    user_code: bool = False  # a mistake every trial would repeat: the run stops


class RankFailed(Exception):
    """Raised on rank 0 at its next report()/check() when another rank failed."""


class RankGroup:
    """Rank 0's side of one trial's processes: started before `train`, closed after it."""

    def __init__(self, world_size: int, device: torch.device, setup: Callable[[int, int, int], RankSetup],
                 epoch: Callable[[], int]) -> None:
        self.world_size = world_size
        self.setup = setup  # setup(rank, port, threads): what rank r is started with
        self.epoch = epoch  # the epoch in flight, for a lost rank's reason
        self.device = device
        self.procs: list[Any] = []
        self.conns: list[multiprocessing.connection.Connection] = []  # one per rank: decisions out, events in
        self.finished: set[int] = set()  # ranks that returned from train (or obeyed a decision)
        self.failure: RankFailure | None = None
        self.ended = False  # a decision that ends the trial was sent
        self.threads = torch.get_num_threads()
        self.closed = False

    # ---- start and end ---------------------------------------------------------------------

    def start(self) -> None:
        """Start ranks 1..N-1, wait until they can join, and join them in the process group."""
        import torch.distributed as dist

        if self.device.type == "cuda" and (self.device.index or 0) + self.world_size > torch.cuda.device_count():
            raise UserCodeError(f"execution.processes_per_trial is {self.world_size}, but this worker sees "
                                f"{torch.cuda.device_count()} GPUs from {self.device}; give each worker that many"
                                " (the gpus setting: a multiple of it)")
        store = dist.TCPStore(  # type: ignore[attr-defined]
            "127.0.0.1", 0, self.world_size, is_master=True, wait_for_workers=False)
        threads = max(1, self.threads // self.world_size)  # a CPU's share is split between the ranks
        torch.set_num_threads(threads)
        setups = [self.setup(rank, store.port, threads) for rank in range(1, self.world_size)]
        if getattr(setups[0].given, "__module__", None) == "__main__" and not _main_file():
            raise UserCodeError("train: a function defined in a notebook (or a script read from stdin) cannot run "
                                "on several processes per trial; put it in a module and name it in the study")
        ctx = _context([setups[0].resolve.__module__, *_user_module(setups[0].spec)])
        for given in setups:
            mine, theirs = ctx.Pipe()
            p = ctx.Process(target=rank_main, args=(given, theirs), daemon=True, name=f"hpo-rank-{given.rank}")
            with _main_module(needed=getattr(given.given, "__module__", None) == "__main__"):
                p.start()
            theirs.close()
            self.procs.append(p)
            self.conns.append(mine)
        stopping.defer(True)
        self._await_ready()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        dist.init_process_group(backend(self.device), store=store, rank=0, world_size=self.world_size,
                                timeout=COLLECTIVE_TIMEOUT)
        self.store = store  # kept alive while the group lives

    def _await_ready(self) -> None:
        ready: set[int] = set()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            self._read_events(ready)
            if len(ready) == self.world_size - 1:
                return
            if self.failure is not None:
                raise RankFailed(self.failure.ending.reason)
            if time.monotonic() > deadline:
                self.failure = RankFailure(Ending(End.ERROR, f"the other ranks did not start in {START_TIMEOUT:g} s"))
                raise RankFailed(self.failure.ending.reason)
            self._wait(1.0)

    def close(self, completed: bool = False) -> RankFailure | None:
        """After `train` returned (`completed`) or raised on rank 0: let the other ranks finish
        (they return from `train` too, or obey the decision sent them), kill any that do not,
        leave the process group. Returns how another rank failed, if one did."""
        import torch.distributed as dist

        if self.closed:
            return self.failure
        self.closed = True
        stopping.defer(False)
        if not self.ended:
            self._send(("done", "") if completed else ("stop", "rank 0 ended the trial"))
        # Ranks that return from train get their time; after a stop or a failure they may be waiting in
        # a collective rank 0 left, and are killed after a moment.
        deadline = time.monotonic() + (END_WAIT if completed and self.failure is None else 2.0)
        while any(p.is_alive() for p in self.procs) and time.monotonic() < deadline:
            self._poll(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join()
        self._poll(timeout=0)
        for conn in self.conns:
            conn.close()
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(self.threads)
        return self.failure

    # ---- what rank 0's handle calls ------------------------------------------------------------

    def raise_if_failed(self) -> None:
        self._poll(timeout=0)
        if self.failure is not None:
            raise RankFailed(self.failure.ending.reason)

    def decided(self, error: BaseException | None, at_report: bool = True) -> None:
        """Tell the other ranks what rank 0's report() (or check, save_checkpoint) decided."""
        if error is None:
            if at_report:
                self._send(("go", ""))
            return
        if isinstance(error, RankFailed):
            return
        if isinstance(error, optuna.TrialPruned | Stop) and not _requeued(error):
            self._send(("pruned", str(error)))
        else:
            self._send(("stop", str(error) or type(error).__name__))
        self.ended = True

    def explain(self, error: BaseException) -> RankFailure | None:
        """When rank 0's code raised: another rank's failure, if that is what it was (a collective
        that failed because a rank died, or RankFailed), after waiting a moment for its word."""
        waits = isinstance(error, RankFailed) or _collective_failure(error)
        deadline = time.monotonic() + (5.0 if waits else 0.0)
        while True:
            self._poll(timeout=min(0.5, max(0.0, deadline - time.monotonic())))
            if self.failure is not None or time.monotonic() >= deadline:
                return self.failure

    # ---- the other ranks' word -----------------------------------------------------------------

    def _send(self, message: tuple[str, str]) -> None:
        for conn in self.conns:
            try:
                conn.send(message)
            except (BrokenPipeError, OSError):
                pass  # that rank is gone: its exit says why

    def _wait(self, timeout: float) -> None:
        if self.procs:
            multiprocessing.connection.wait([p.sentinel for p in self.procs] + list(self.conns), timeout)

    def _poll(self, timeout: float) -> None:
        if timeout > 0:
            self._wait(timeout)
        self._read_events(set())

    def _events(self) -> list[tuple[Any, ...]]:
        out = []
        for conn in self.conns:
            try:
                while conn.poll():
                    out.append(conn.recv())
            except (EOFError, OSError):
                pass  # that rank is gone: its exit says why
        return out

    def _read_events(self, ready: set[int]) -> None:
        for kind, rank, *rest in self._events():
            if kind == "ready":
                ready.add(rank)
            elif kind == "done":
                self.finished.add(rank)
            elif kind == "error" and self.failure is None:
                message, text, record, oom, user_code = rest
                ending = (Ending.out_of_memory(rank_device(self.device, rank), f"rank {rank}") if oom
                          else Ending(End.ERROR, f"rank {rank}: {message}"[:2000]))
                self.failure = RankFailure(ending, RemoteError(f"rank {rank}: {message}", text, record), user_code)
        for rank, p in enumerate(self.procs, start=1):
            # An exit is judged after the events read above: what a rank sent before it exited.
            if self.failure is None and p.exitcode is not None and rank not in self.finished:
                self.failure = self._lost(rank, p)

    def _lost(self, rank: int, p: Any) -> RankFailure:
        code = p.exitcode
        how = (f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}")
        what = f"rank {rank} of {self.world_size} (pid {p.pid}) {how} in epoch {self.epoch()}"
        if code < 0:
            return RankFailure(Ending(End.RANK_LOST, f"{what}; the trial is retried from its last checkpoint"))
        return RankFailure(Ending(End.ERROR, what))


def _requeued(error: BaseException) -> bool:
    return isinstance(error, Stop) and error.ending.end.requeued


def _collective_failure(error: BaseException) -> bool:
    """A torch.distributed call that failed because a peer is gone."""
    import torch.distributed as dist

    text = str(error)
    return isinstance(error, dist.DistError) or any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "gloo", "NCCL"))


# ---- ranks 1..N-1 ------------------------------------------------------------------------------


class RankStopped(KeyboardInterrupt):
    """Raised on a rank > 0 where rank 0 decided the trial stops (Ctrl-C, a timeout, an error)."""


class RankTrial(Trial):
    """The handle of a rank > 0: what rank 0's has (params, seed, start_epoch, checkpoint state),
    with report() waiting for rank 0's decision; what it reports, saves and measures is rank 0's
    to record, so its own calls record nothing."""

    def __init__(self, setup: RankSetup, state: Any, conn: multiprocessing.connection.Connection) -> None:
        self.params = setup.params
        self.device = torch.device(setup.device)
        self.epochs = setup.spec.budget.epochs
        self.number = setup.number
        self.first_number = setup.first_number
        self.seed = trial_seed(setup.spec.seed, setup.first_number)
        self.start_epoch = setup.start_epoch
        self.rank, self.world_size = setup.rank, setup.world_size
        self._state = state
        self._conn = conn
        self._parent = setup.parent
        self._pending: collections.deque[tuple[str, str]] = collections.deque()
        self._link = None

    def report(self, epoch: int, **metrics: Any) -> None:
        while not self._pending:
            self._receive(block=True)
        self._obey(self._pending.popleft())

    def save_checkpoint(self, state: Any) -> None:
        self.check()

    def load_checkpoint(self) -> Any:
        return self._state

    def check(self, epoch: int | None = None) -> None:
        self._receive(block=False)
        for message in self._pending:
            if message[0] != "done":  # rank 0 returned from train: this rank finishes its own
                self._obey(message)

    def measure(self, model: torch.nn.Module, example: Any = None) -> None:
        pass

    def set_attr(self, key: str, value: Any) -> None:
        pass

    def _receive(self, block: bool) -> None:
        while self._conn.poll(1.0 if block else 0):
            self._pending.append(self._conn.recv())
            block = False
        if block and not _alive(self._parent):
            os._exit(1)  # rank 0 is gone (where PR_SET_PDEATHSIG is not there to say so)

    @staticmethod
    def _obey(message: tuple[str, str]) -> None:
        """A decision that ends the trial, raised here ("go" on: nothing)."""
        kind, reason = message
        if kind == "pruned":
            raise TrialPruned(reason)
        if kind == "stop":
            raise RankStopped(reason)
        if kind == "done":
            raise RankStopped("rank 0 returned from train before this rank's report(); every rank reports the "
                              "same epochs")

    def drain(self) -> None:
        """After `train` returned: wait for rank 0's end of the trial."""
        while True:
            self._receive(block=True)
            while self._pending:
                if self._pending.popleft()[0] != "go":
                    return


def rank_main(setup: RankSetup, conn: multiprocessing.connection.Connection) -> None:
    """A rank > 0 of one trial: join the group, run `train`, say how it went, exit."""
    _die_with(setup.parent)
    os.environ.clear()
    os.environ.update(setup.environment)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: rank 0 decides
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    keep_rank_output(__import__("pathlib").Path(setup.log), setup.prefix)
    torch.set_num_threads(setup.threads)
    code = 0
    try:
        import torch.distributed as dist

        device = torch.device(setup.device)
        if setup.given is not None and setup.spec.train is not None:
            register(setup.spec.train, setup.given)
        train = setup.resolve(setup.spec, device)
        state, rng = torch.load(io.BytesIO(setup.checkpoint), weights_only=True)
        store = dist.TCPStore("127.0.0.1", setup.port, setup.world_size, is_master=False)  # type: ignore[attr-defined]
        conn.send(("ready", setup.rank))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend(device), store=store, rank=setup.rank, world_size=setup.world_size,
                                timeout=COLLECTIVE_TIMEOUT)
        trial = RankTrial(setup, state, conn)
        seeding.seed_all(trial.seed)
        if rng is not None:
            seeding.restore(rng)
        try:
            train(trial)
            trial.drain()
        except (optuna.TrialPruned, RankStopped):
            pass  # rank 0's decision, obeyed
        conn.send(("done", setup.rank))
    except BaseException as e:
        code = 1
        conn.send(("error", setup.rank, f"{type(e).__name__}: {e}", "".join(traceback.format_exception(e)),
                    error_record(e), is_oom(e), isinstance(e, UserCodeError)))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # at once: a failed rank's closed connections end the others' collectives


def pack_checkpoint(state: Any, rng: dict[str, Any] | None) -> bytes:
    buffer = io.BytesIO()
    torch.save((state, rng), buffer)
    return buffer.getvalue()


@contextlib.contextmanager
def _main_module(needed: bool) -> Iterator[None]:
    """A new rank runs the parent's `__main__` again (as multiprocessing does) only when the
    training function lives there; otherwise it is hidden while the process starts, so a CLI, a
    test runner or a script read from stdin is not re-run in every rank."""
    if needed:
        yield
        return
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _user_module(spec: StudySpec) -> list[str]:
    """The module of the user's training function, imported once by the fork server rather than
    in every rank of every trial (a file path's module has no importable name: imported there)."""
    where = spec.train.split(":")[0] if spec.train else ""
    return [where] if where and not where.endswith(".py") else []


def _main_file() -> bool:
    """Whether `__main__` is a file the other ranks can import again (not a notebook or stdin)."""
    path = getattr(sys.modules["__main__"], "__file__", None)
    return bool(path) and os.path.isfile(str(path)) and "ipykernel" not in str(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _context(preload: list[str]) -> Any:
    """Fresh processes forked from a server that imported torch and hpo once per worker (a spawned
    interpreter would import them again for every trial: seconds); that server exits with the
    worker, and its children with it."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", DYNAMO_MODULE, "hpo.runtime.ranks", *preload])
    return ctx


def _die_with(rank0: int) -> None:
    """End this process the moment rank 0 ends (its parent is the fork server, which outlives rank 0
    while any rank holds it open): a thread blocked on rank 0's pidfd, else polling its pid."""
    import threading

    def watch() -> None:
        try:
            fd = os.pidfd_open(rank0)
        except (AttributeError, OSError):
            while _alive(rank0):
                time.sleep(0.5)
            os._exit(1)
        select.select([fd], [], [])
        os._exit(1)

    if not _alive(rank0):
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="hpo-rank0-watch").start()
