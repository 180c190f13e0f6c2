"""How a trial can end, decided in one place for every path (user functions, hpo's own loop,
fused groups): the Optuna state it gets, the `reason` it leaves, and whether it comes back.

Training code signals an ending by raising a `Stop` (or hpo.TrialPruned); the runtime
(hpo.runtime.runner) and the fused worker turn it into the trial's state and attributes with `Ending`,
and hpo.runtime.lifecycle records it.
"""

from __future__ import annotations

import enum
import os
import sysconfig
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from optuna.trial import TrialState


class End(enum.Enum):
    COMPLETE = "complete"
    PRUNED = "pruned"  # by the pruner
    DIVERGED = "diverged"  # a reported metric or the loss became NaN or infinite
    TRIAL_TIMEOUT = "trial_timeout"  # budget.trial_timeout passed
    STUDY_TIMEOUT = "study_timeout"  # the study's timeout passed: queued, resumes from its checkpoint
    INTERRUPTED = "interrupted"  # Ctrl-C or SIGTERM: queued, resumes from its checkpoint
    OUT_OF_MEMORY = "out_of_memory"
    ERROR = "error"  # any other exception in training code
    RANK_LOST = "rank_lost"  # a process of a multi-process trial died (kill -9, the OOM killer): retried

    @property
    def state(self) -> TrialState:
        if self is End.COMPLETE:
            return TrialState.COMPLETE
        if self in (End.PRUNED, End.DIVERGED, End.TRIAL_TIMEOUT):
            return TrialState.PRUNED  # a verdict on the parameters: Optuna's samplers learn from it
        return TrialState.FAIL

    @property
    def requeued(self) -> bool:
        """Stopped from outside: the trial is queued and resumes from its last checkpoint, which is
        kept (every other ending removes it)."""
        return self in (End.STUDY_TIMEOUT, End.INTERRUPTED)

    @property
    def retried(self) -> bool:
        """Its process died under it: the trial comes back from its last checkpoint as a trial whose
        worker died does, within the storage's retry limit."""
        return self is End.RANK_LOST

    @property
    def keeps_checkpoint(self) -> bool:
        return self.requeued or self.retried


@dataclass(frozen=True)
class Ending:
    end: End
    reason: str | None = None  # what a user reads in the trial's `reason` attribute

    @staticmethod
    def pruned(pruner: str, epoch: int) -> Ending:
        return Ending(End.PRUNED, f"pruned by the {pruner} rule at epoch {epoch}")

    @staticmethod
    def diverged(what: str, value: float, epoch: int) -> Ending:
        return Ending(End.DIVERGED, f"diverged: {what} is {value} at epoch {epoch}")

    @staticmethod
    def trial_timeout(limit: float, epoch: int) -> Ending:
        return Ending(End.TRIAL_TIMEOUT, f"trial_timeout: stopped after {limit:g} s in epoch {epoch}")

    @staticmethod
    def out_of_memory(device: object, detail: str) -> Ending:
        return Ending(End.OUT_OF_MEMORY, f"out of memory on {device} ({detail})"[:2000])

    @staticmethod
    def error(e: BaseException) -> Ending:
        return Ending(End.ERROR, f"{type(e).__name__}: {e}"[:2000])


class Stop(Exception):
    """Raised inside training to end the trial now; carries the ending."""

    def __init__(self, ending: Ending) -> None:
        super().__init__(ending.reason or ending.end.value)
        self.ending = ending


class Diverged(Stop):
    def __init__(self, what: str, value: float, epoch: int) -> None:
        super().__init__(Ending.diverged(what, value, epoch))


class TimeLimit(Stop):
    def __init__(self, limit: float, epoch: int) -> None:
        super().__init__(Ending.trial_timeout(limit, epoch))


class StudyTimeout(Stop):
    """The study's timeout passed while a trial ran: it stops now and is queued to resume from its
    last checkpoint, so `--timeout` bounds the command's time without losing work."""

    def __init__(self, epoch: int) -> None:
        super().__init__(Ending(End.STUDY_TIMEOUT, f"study timeout in epoch {epoch}"))




def user_frames(e: BaseException, limit: int = 6) -> list[traceback.FrameSummary]:
    """The frames of `e`'s traceback in the user's own code: neither hpo's nor the standard
    library's nor an installed package's (torch, numpy...). When the user's code is itself an
    installed package, the frames below hpo's."""
    libraries = tuple({sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")})
    frames = [f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith(_HPO_ROOT)]
    own = [f for f in frames if not f.filename.startswith(libraries) and not f.filename.startswith("<frozen")]
    return (own or frames)[-limit:]


_HPO_ROOT = str(Path(__file__).resolve().parents[1]) + os.sep


class RemoteError(Exception):
    """An exception raised in another process of a multi-process trial (hpo.runtime.ranks), as
    that process described it: its message, traceback and error record travel as text."""

    def __init__(self, message: str, traceback_text: str, record: dict[str, str]) -> None:
        super().__init__(message)
        self.traceback_text, self.record = traceback_text, record


def traceback_text(e: BaseException) -> str:
    if isinstance(e, RemoteError):
        return e.traceback_text
    return "".join(traceback.format_exception(e))


def error_record(e: BaseException) -> dict[str, str]:
    """What a failed trial keeps of its error: a signature that is the same for every trial the
    same bug fails (the exception's type and where in the user's code it was raised), and the
    user's frames, for the message that stops a run."""
    if isinstance(e, RemoteError):
        return e.record
    frames = user_frames(e)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return {"signature": f"{type(e).__name__}{where}", "frames": "".join(traceback.format_list(frames)).rstrip()}


def is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.cuda.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower()
    )


@dataclass
class Deadlines:
    """The trial's and the study's time limits (time.monotonic() values), checked in one place:
    every batch by hpo's own loop, every epoch by a fused group, at report()/save_checkpoint()/
    check() by user code."""

    trial_limit: float | None = None  # seconds, budget.trial_timeout
    trial_deadline: float | None = None
    study_deadline: float | None = None

    @staticmethod
    def start(trial_limit: float | None, study_deadline: float | None) -> Deadlines:
        now = time.monotonic()
        return Deadlines(trial_limit, now + trial_limit if trial_limit else None, study_deadline)

    def check(self, epoch: int) -> None:
        if self.trial_deadline is None and self.study_deadline is None:
            return
        now = time.monotonic()
        if self.trial_deadline is not None and now > self.trial_deadline:
            assert self.trial_limit is not None
            raise TimeLimit(self.trial_limit, epoch)
        if self.study_deadline is not None and now > self.study_deadline:
            raise StudyTimeout(epoch)


class CheckpointPolicy:
    """When a checkpoint is worth writing: at the end of an epoch once `interval` seconds passed
    since the last, stretched so that writing them never takes more than ~5% of the time (a big
    model's state on a fast epoch). An interval of 0 asks for every epoch, and gets it."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.cost = 0.0  # seconds the last write took (per member, for a fused group)

    def due(self, since: float, members: int = 1) -> bool:
        wait = 0.0 if self.interval == 0 else max(self.interval, 20 * self.cost * members)
        return time.monotonic() - since >= wait
