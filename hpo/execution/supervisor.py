"""A command that trains in its own process (`hpo run` with one worker, `hpo worker`) is watched
by a small parent, as `hpo run` watches the workers it forks.

Training code can end the process under a trial in ways no `except` sees: `os._exit`, a crash of
the interpreter or a native library, the kernel's out-of-memory killer. The parent is forked before
anything is imported, forwards SIGINT and SIGTERM, and when the child ends takes back the trial it
left running (queued to resume from its checkpoint, under the retry cap, with a reason that says how
the process ended) and exits non-zero. Only the standard library is imported here: the parent
stays small.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
from typing import Any

# What ends a process under a trial with no exception to catch, said after how it ended.
DEATH_CAUSES = " (sys.exit, os._exit or a crash in the training code, or the out-of-memory killer)"
ENV_NOTE = "HPO_SUPERVISOR"  # the file where the supervised process names its storage and study


def stop_with_parent() -> None:
    """In a child process: SIGTERM when the process that started it dies (even by kill -9), so
    it queues its trial and exits instead of running on unsupervised (Linux; elsewhere a no-op,
    and its trials come back through heartbeats)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def ended(code: int | None) -> str:
    """How a process ended, for a person (a waitstatus_to_exitcode value)."""
    if code is not None and code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def supervise_self() -> None:
    """Fork: the child returns and runs the command; the parent waits for it, forwarding
    signals, takes back what it left running, and exits with its status (never returns)."""
    if not sys.platform.startswith("linux") or os.environ.get(ENV_NOTE):
        return
    fd, note = tempfile.mkstemp(prefix="hpo-run-", suffix=".json")
    os.close(fd)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.environ[ENV_NOTE] = note
        stop_with_parent()
        return

    forwarded: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        forwarded.append(signum)
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    try:
        how, cause = ended(code), DEATH_CAUSES
        if code == -signal.SIGKILL and forwarded:
            how, cause = (f"did not stop within the grace period after {signal.Signals(forwarded[0]).name} and "
                          "was killed", " (training code that swallows KeyboardInterrupt?)")
        message = _take_back(note, pid, how, cause)
    finally:
        os.unlink(note)
    if message:
        print(f"Error: {message}", file=sys.stderr, flush=True)
        code = code or 1
    if code < 0:  # end as the child did, so whoever started `hpo` sees the same status
        if -code not in (signal.SIGKILL, signal.SIGSTOP):  # those two cannot be handled, nor need resetting
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        code = 128 - code  # a signal whose default is to go on: exit as a shell reports it
    os._exit(code)


def announce(storage_url: str, study: str) -> None:
    """In the supervised process: say which study it works on, for the parent."""
    if note := os.environ.get(ENV_NOTE):
        with open(note, "w") as f:
            json.dump({"storage": storage_url, "study": study}, f)


def finished() -> None:
    """In the supervised process: its worker loop ended every trial it ran (done, or queued on a
    stop), so the parent has nothing to take back and exits at once, without opening the
    storage (about 1.5 s: Optuna's import and the database). A process that dies under a trial,
    os._exit(0) included, never gets here."""
    if note := os.environ.get(ENV_NOTE):
        try:
            with open(note) as f:
                where = json.load(f)
        except (OSError, ValueError):
            return
        with open(note, "w") as f:
            json.dump(where | {"finished": True}, f)


def _take_back(note: str, pid: int, how: str, cause: str) -> str | None:
    """The trial the child left running, queued again; a line saying so, or None."""
    try:
        with open(note) as f:
            where = json.load(f)
    except (OSError, ValueError):
        return None  # it ended before opening a study
    if where.get("finished"):
        return None
    import optuna

    from hpo.runtime.lifecycle import end_orphans
    from hpo.storage.backends import open_storage

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        study = optuna.load_study(study_name=where["study"], storage=open_storage(where["storage"], create=False))
        notes: list[str] = []
        reclaimed = end_orphans(study, {pid: how}, notes.append)
        for note in notes:  # a trial past its retry cap
            print(note, file=sys.stderr, flush=True)
    except KeyError:
        return None  # the study was deleted (`hpo delete` while it ran): the worker said so
    except Exception as e:
        return f"the worker process {how}; its trials could not be taken back ({e})"
    if not reclaimed:
        return None
    numbers = ", ".join(map(str, (*reclaimed.queued, *reclaimed.dropped)))
    what = "queued to resume from its checkpoint" if not reclaimed.dropped else \
        "not retried again (past the retry cap)" if not reclaimed.queued else "queued to resume where not past the retry cap"
    return f"the worker process {how} while running trial {numbers}{cause}; {what}"
