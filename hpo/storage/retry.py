"""Trials whose worker died come back as retries: Optuna's heartbeat retry, saying why, and the
requeue of a trial interrupted on purpose (Ctrl-C, a study timeout)."""

from __future__ import annotations

import os
import socket
import sys
import warnings

import optuna
from optuna.storages import BaseStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from hpo._private import storage_of, study_id, trial_id


class RetryStaleTrial(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a trial whose worker stopped sending heartbeats, saying so: the retry
    records why it exists, and a trial that has used up its retries is announced (with its
    checkpoints removed) instead of silently dropped."""

    def __init__(self, max_retry: int | None) -> None:
        super().__init__(max_retry=max_retry, inherit_intermediate_values=True)
        self.max_retry = max_retry  # None: no limit, as Optuna's own callback

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.retry(study, trial, f"trial {trial.number}'s worker stopped sending heartbeats (killed, frozen or cut "
                                 "off); this retry resumes from its last checkpoint")

    def retry(self, study: optuna.Study, trial: FrozenTrial, reason: str) -> None:
        """Queue the failed `trial`'s retry, recording `reason` on it, unless the cap is reached."""
        history = [*trial.system_attrs.get("retry_history", ()), trial.number]
        if self.max_retry is not None and len(history) > self.max_retry:
            _forget_checkpoints(study, int(history[0]))
            print(f"hpo: trial {trial.number} lost its worker {len(history)} times (killed, frozen or cut off each "
                  f"time, e.g. by the kernel's out-of-memory killer); it is not retried again (the limit is "
                  f"{self.max_retry} retries)", file=sys.stderr, flush=True)
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            super().__call__(study, trial)
        retry = study.get_trials(deepcopy=False)[-1]
        if (retry.system_attrs.get("retry_history") or [None])[-1] == trial.number and retry.state == TrialState.WAITING:
            storage_of(study).set_trial_user_attr(trial_id(retry), "retry_reason", reason)


def _forget_checkpoints(study: optuna.Study, number: int) -> None:
    """Remove the checkpoint slots of a trial that will never resume (only hpo-shaped names, inside
    the study's artifact folder)."""
    from pathlib import Path

    from hpo.storage.artifacts import own_file

    system = storage_of(study).get_study_system_attrs(study_id(study))
    folder, uid = system.get("hpo:artifacts"), system.get("hpo:uid")
    if not isinstance(folder, str) or not isinstance(uid, str) or not Path(folder).is_dir():
        return
    base = Path(folder).resolve()
    for slot in "ab":
        if (path := own_file(base, f"{uid}-trial{number}-{slot}.ckpt", uid)) is not None:
            path.unlink()


def requeue(study: optuna.Study, trial_id: int) -> FrozenTrial | None:
    """Queue a retry of an interrupted trial, the way a heartbeat-stale trial is retried."""
    trial = storage_of(study).get_trial(trial_id)
    if trial.state != TrialState.FAIL:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)(study, trial)
    return trial


OWNER_ATTR = "hpo:owner"  # "host:pid:start" of the process running a trial


def claim(storage: BaseStorage, tid: int) -> None:
    """Record this process as the running trial's owner, so a run on this machine can tell when
    it is gone (reclaim_orphans)."""
    storage.set_trial_system_attr(tid, OWNER_ATTR, owner())


def owner() -> str:
    """This process, as a trial records it: host, pid and the pid's start time (a pid is reused)."""
    global _owner
    if _owner is None or _owner[0] != os.getpid():
        _owner = (os.getpid(), f"{socket.gethostname()}:{os.getpid()}:{_started(os.getpid())}")
    return _owner[1]


_owner: tuple[int, str] | None = None


def _started(pid: int) -> str:
    """The pid's start time in clock ticks (/proc/PID/stat field 22); "Z" for a zombie (a killed
    process its parent has not reaped yet: gone all the same); "" where /proc is missing."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return ""
    return "Z" if fields[0] == "Z" else fields[19]


def _gone(recorded: str) -> bool:
    """True when `recorded` names a process on this host that no longer runs."""
    parts = recorded.rsplit(":", 2)
    if len(parts) != 3:
        return False
    host, pid_text, start = parts
    if host != socket.gethostname() or not pid_text.isdigit():
        return False  # another machine: its heartbeats (and the grace period) decide
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    return bool(start) and _started(pid) != start  # the pid now belongs to another process


def is_local_and_alive(recorded: object) -> bool:
    """True when `recorded` (an OWNER_ATTR) names a live process on this machine."""
    return isinstance(recorded, str) and recorded.rsplit(":", 2)[0] == socket.gethostname() and not _gone(recorded)


def reclaim_orphans(study: optuna.Study) -> list[int]:
    """Retry now, without waiting out the grace period, every running trial whose process is
    known to be gone (same host, pid no longer alive): a `kill -9` of a whole run leaves its
    trials RUNNING, and the next run on this machine takes them back at once. Returns their numbers."""
    storage = storage_of(study)
    callback = getattr(storage, "get_heartbeat_stale_trial_callback", lambda: None)()
    taken = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        recorded = t.system_attrs.get(OWNER_ATTR)
        if not isinstance(recorded, str) or not _gone(recorded):
            continue
        try:
            if not storage.set_trial_state_values(trial_id(t), state=TrialState.FAIL):
                continue
        except Exception:
            continue  # another worker took it back first
        # The storage's own retry (its cap), or one without a cap where the storage has none (a journal).
        retrier = callback if isinstance(callback, RetryStaleTrial) else RetryStaleTrial(None)
        retrier.retry(study, storage.get_trial(trial_id(t)),
                      f"trial {t.number}'s process (pid {recorded.split(':')[-2]}) on this machine is gone; this "
                      "retry resumes from its last checkpoint")
        taken.append(t.number)
    return taken
