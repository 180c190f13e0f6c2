"""A stop asked of this process, remembered until it is obeyed.

A stop comes from Ctrl-C, SIGTERM (docker stop, Slurm before its time limit, Kubernetes), `hpo stop`
from another shell or machine (a request stored in the study), or the run that started this worker
dying. The first signal raises KeyboardInterrupt wherever the code is; training code that swallows
it (`except BaseException`) is stopped again at its next `report()`, `save_checkpoint()` or
`check()`, and a process still running `grace()` seconds after the request kills itself, so no
worker outlives its run: its trial then comes back as a dead process's, with the reason.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

ENV_GRACE = "HPO_STOP_GRACE"
STOP_ATTR = "hpo:stop"  # study system attr: how many times `hpo stop` was asked for this study

_reason: str | None = None
_watchdog: threading.Timer | None = None
_armed = False  # this process runs trials: a stop it does not obey in time kills it
_deferred = False  # a signal is only remembered, raised at the next report(): see defer()


def grace() -> float:
    """Seconds a stopped process gets to queue its trial before it is killed (env HPO_STOP_GRACE)."""
    try:
        return max(0.5, float(os.environ.get(ENV_GRACE, "30")))
    except ValueError:
        return 30.0


def request(reason: str) -> bool:
    """Remember a stop (the first reason wins); True when it is the first."""
    global _reason
    if _reason is not None:
        return False
    _reason = reason
    _arm_watchdog()
    return True


def runs_trials() -> None:
    """This process trains (a worker, not the run that supervises forked workers, which kills
    them itself): from now on a stop it has not obeyed after grace() seconds kills it."""
    global _armed
    _armed = True
    _arm_watchdog()


def _arm_watchdog() -> None:
    global _watchdog
    if _armed and _reason is not None and _watchdog is None:
        _watchdog = threading.Timer(grace(), _kill)
        _watchdog.daemon = True
        _watchdog.start()


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def requested() -> str | None:
    """Why this process was asked to stop ("SIGINT", "SIGTERM", "hpo stop"), or None."""
    return _reason


BY_COMMAND = "hpo stop"  # the reason of a stop asked with `hpo stop` (a request stored in the study)


def by_signal() -> signal.Signals | None:
    """The signal that stopped this process, if a signal did."""
    return signal.Signals[_reason] if _reason is not None and _reason in signal.Signals.__members__ else None


def exit_code() -> int:
    """How a stopped command exits: 128 + the signal's number, as a shell reports a process a signal
    ended (SIGINT 130, SIGTERM 143); 0 for `hpo stop`, which asked for it."""
    sig = by_signal()
    return 0 if _reason == BY_COMMAND else 128 + (sig or signal.SIGINT)


def raise_if_requested() -> None:
    """Where training code calls hpo (report, save_checkpoint, check): obey a stop it swallowed."""
    if _reason is not None:
        raise KeyboardInterrupt


def defer(on: bool) -> None:
    """While a trial of several processes runs, Ctrl-C and SIGTERM are obeyed at rank 0's next
    report() (raised there and on every rank), not wherever rank 0's code is: raised in the middle
    of a collective, it would leave the other ranks waiting in it. grace() still bounds the wait."""
    global _deferred
    _deferred = on


_shields = 0  # sections a signal must not cut, open now


@contextlib.contextmanager
def shielded(obey: bool = True) -> Iterator[None]:
    """A section a signal must not cut (a trial created and not yet claimed by the code that runs
    it would be left running with no owner; a trial half ended): a stop that comes during it is
    remembered, and raised as the section ends (`obey`) or at the caller's next check."""
    global _shields
    _shields += 1
    try:
        yield
    finally:
        _shields -= 1
    if obey and not _shields and not _deferred:
        raise_if_requested()


def reset() -> None:
    """The stop was obeyed (the run ended in this process, as a notebook's does): forget it."""
    global _reason, _watchdog, _armed
    if _watchdog is not None:
        _watchdog.cancel()
    _reason, _watchdog, _armed = None, None, False


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """While a run lasts, SIGINT and SIGTERM stop it the same way, once: a second signal (the
    terminal's Ctrl-C reaches every process of the group, and a supervisor forwards it too) is
    remembered, not raised again in the middle of queuing the trial. SIGINT gets Python's
    behaviour back even where a shell started this process with SIGINT ignored (in the
    background). Afterwards the stop is forgotten and the previous handlers are back (a notebook's
    kernel, a test runner)."""

    def handler(signum: int, frame: Any) -> None:
        if request(f"{signal.Signals(signum).name}") and not _deferred and not _shields:
            raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach the main thread only; its own handlers stay
        return
    before = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        reset()
        for sig, previous in before.items():
            signal.signal(sig, previous)


class StudyStopWatch:
    """Polls the study for `hpo stop` in a thread of its own: a request made after this worker
    started stops it (a run started after the request runs normally)."""

    def __init__(self, read: Callable[[], Any], every: float = 1.0) -> None:
        self.read, self.every = read, every
        self.baseline = read()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(self.every):
            try:
                value = self.read()
            except Exception:
                continue  # the storage is down: the worker's own calls say so
            if value != self.baseline:
                request(BY_COMMAND)
                return

    def close(self) -> None:
        self.done.set()


