"""Trials whose worker died come back as retries: Optuna's heartbeat retry, saying why, and the
requeue of a trial interrupted on purpose (Ctrl-C, a study timeout)."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path

import optuna
from optuna.storages import BaseStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from hpo._private import storage_of, study_id
from hpo.storage.keys import CHECKPOINT_ATTR, PBT_ATTR, RERUN_ATTR, RESUMES_ATTR


class RetryStaleTrial(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a trial whose worker stopped sending heartbeats, saying so: the retry
    records why it exists, and a trial that has used up its retries is announced (with its
    checkpoints removed) instead of silently dropped."""

    def __init__(self, max_retry: int | None) -> None:
        super().__init__(max_retry=max_retry, inherit_intermediate_values=True)
        self.max_retry = max_retry  # None: no limit, as Optuna's own callback

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Optuna's own fail_stale_trials calls this (study.optimize on hpo's storage); hpo ends such
        trials itself (hpo.runtime.lifecycle.end_stale), which says what this logs."""
        if (note := self.retry(study, trial, "its worker stopped sending heartbeats (killed, frozen or cut off)")):
            logging.getLogger("hpo").warning(note)

    def exhausted(self, trial: FrozenTrial) -> bool:
        return self.max_retry is not None and len(trial.system_attrs.get("retry_history", ())) + 1 > self.max_retry

    def outcome(self, trial: FrozenTrial, what: str) -> str:
        """The reason the failed trial keeps: what happened, and whether it comes back."""
        if self.exhausted(trial):
            return f"{what}; not retried again (the limit is {self.max_retry} retries)"
        return f"{what}; queued to resume from its last checkpoint"

    def retry(self, study: optuna.Study, trial: FrozenTrial, what: str) -> str | None:
        """Queue the failed `trial`'s retry, saying `what` happened, unless the cap is reached:
        then its checkpoints go, and the line that announces it is returned for the caller to say."""
        if self.exhausted(trial):
            history = [*trial.system_attrs.get("retry_history", ()), trial.number]
            forget_checkpoints(study, [int(history[0])])
            return (f"hpo: trial {trial.number} lost its worker {len(history)} times (killed, frozen or cut off each "
                    f"time, e.g. by the kernel's out-of-memory killer); it is not retried again (the limit is "
                    f"{self.max_retry} retries)")
        queue_retry(study, trial, f"resumes trial {trial.number}: {what}", inherit=True)
        return None




def retried_by(trial: FrozenTrial) -> list[int]:
    """The numbers of the earlier attempts `trial` retries (they live on in it)."""
    return [int(n) for n in trial.system_attrs.get("retry_history", ())]


def resumed_by(trial: FrozenTrial) -> int | None:
    """The number of the trial `trial` resumes, stopped under it (not a failure of its parameters)."""
    resumes = trial.system_attrs.get(RESUMES_ATTR)
    return resumes if isinstance(resumes, int) else None


def queue_retry(study: optuna.Study, trial: FrozenTrial, why: str, *, inherit: bool,
                extra: Mapping[str, object] | None = None) -> int:
    """Queue `trial` (failed) again with its parameters, as Optuna's retry callbacks do, and return
    the new trial's number. It keeps the first attempt's number in its retry history (its seed and
    checkpoint for the training code); `inherit`: it resumes, with the epochs already reported.
    Unlike Optuna's callbacks it copies none of the failed trial's user attributes (a reason or a
    traceback would stay on a retry that completes) but a population member's lineage: it says
    only `why` it exists."""
    storage = storage_of(study)
    template = optuna.trial.create_trial(
        state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        intermediate_values=dict(trial.intermediate_values) if inherit else None,
        system_attrs={"failed_trial": trial.number,
                      "retry_history": [*trial.system_attrs.get("retry_history", ()), trial.number],
                      **({RESUMES_ATTR: trial.number} if inherit else {}),
                      **({PBT_ATTR: trial.system_attrs[PBT_ATTR]} if PBT_ATTR in trial.system_attrs else {}),
                      **(extra or {})},
        user_attrs={"retry_reason": why[:500],
                    **{k: v for k, v in trial.user_attrs.items() if k.startswith("pbt_")}},  # its lineage
    )
    number = storage.get_trial_number_from_id(storage.create_new_trial(study_id(study), template_trial=template))
    mark_queued(study, number)
    return number


QUEUED = "hpo:queued:"  # study system attrs, one per trial created with its parameters (a retry, a queued one)


def mark_queued(study: optuna.Study, number: int) -> None:
    """Record that trial `number` carries its parameters (the sampler proposes nothing for it), so
    the sampler can tell each trial's place among the sampled ones from one read of the study.
    One key per trial: processes marking at once never overwrite each other."""
    storage_of(study).set_study_system_attr(study_id(study), f"{QUEUED}{number}", True)


def queued_before(study: optuna.Study, number: int) -> int:
    """How many trials before `number` were created with their parameters."""
    attrs = storage_of(study).get_study_system_attrs(study_id(study))
    return sum(1 for key in attrs if key.startswith(QUEUED) and int(key[len(QUEUED):]) < number)


def forget_checkpoints(study: optuna.Study, numbers: Iterable[int]) -> None:
    """Remove the checkpoint slots of trials that will never resume nor be continued (only
    hpo-shaped names, inside the study's artifact folder)."""
    from pathlib import Path

    from hpo.storage.artifacts import own_file

    numbers = list(numbers)
    if not numbers:
        return
    system = storage_of(study).get_study_system_attrs(study_id(study))
    folder, uid = system.get("hpo:artifacts"), system.get("hpo:uid")
    if not isinstance(folder, str) or not isinstance(uid, str) or not Path(folder).is_dir():
        return
    base = Path(folder).resolve()
    for number in numbers:
        for slot in "ab":
            if (path := own_file(base, f"{uid}-trial{number}-{slot}.ckpt", uid)) is not None:
                path.unlink()


def requeue(study: optuna.Study, tid: int, why: str = "interrupted", checkpoint_epoch: int = 0) -> FrozenTrial | None:
    """Queue a retry of an interrupted trial (already failed, its reason written), the way a
    heartbeat-stale trial is retried; the retry says which trial it resumes, and why, and the
    epoch of the checkpoint it resumes from (so a checkpoint missing then is told)."""
    trial = storage_of(study).get_trial(tid)
    if trial.state != TrialState.FAIL:
        return None
    queue_retry(study, trial, f"resumes trial {trial.number}: {why}", inherit=True,
                extra={CHECKPOINT_ATTR: checkpoint_epoch} if checkpoint_epoch else None)
    return trial


OWNER_ATTR = "hpo:owner"  # "machine:pid:start" of the process running a trial (machine: see _machine)


def claim(storage: BaseStorage, tid: int) -> None:
    """Record this process as the running trial's owner, so a run on this machine can tell when
    it is gone (hpo.runtime.lifecycle.end_orphans)."""
    storage.set_trial_system_attr(tid, OWNER_ATTR, owner())


def owner() -> str:
    """This process, as a trial records it: where its pid means something, the pid, and the pid's
    start time (a pid is reused)."""
    global _owner
    if _owner is None or _owner[0] != os.getpid():
        _owner = (os.getpid(), f"{_machine()}:{os.getpid()}:{_started(os.getpid())}")
    return _owner[1]


_owner: tuple[int, str] | None = None


def _machine() -> str:
    """Where a pid names one process: the host name, this boot of its kernel, and the PID
    namespace. Containers with host networking share the host name but not the PID namespace: a
    pid recorded in another namespace says nothing here, so only its heartbeats can tell."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        boot = namespace = "?"
    return f"{socket.gethostname()}/{boot}/{namespace}".replace(":", "=")


def _started(pid: int) -> str:
    """The pid's start time in clock ticks (/proc/PID/stat field 22); "Z" for a zombie (a killed
    process its parent has not reaped yet: gone all the same); "" where /proc is missing."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return ""
    return "Z" if fields[0] == "Z" else fields[19]


def is_gone(recorded: str) -> bool:
    """True when `recorded` names a process of this machine and PID namespace that no longer runs."""
    parts = recorded.rsplit(":", 2)
    if len(parts) != 3:
        return False
    machine, pid_text, start = parts
    if machine != _machine() or not pid_text.isdigit() or "?" in machine:
        return False  # another machine or namespace: its heartbeats (and the grace period) decide
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    return bool(start) and _started(pid) != start  # the pid now belongs to another process


def owned_here_by(recorded: object, pid: int) -> bool:
    """True when `recorded` (an OWNER_ATTR) names process `pid` of this machine."""
    return isinstance(recorded, str) and recorded.rsplit(":", 2)[:2] == [_machine(), str(pid)]


def is_local_and_alive(recorded: object) -> bool:
    """True when `recorded` (an OWNER_ATTR) names a live process on this machine."""
    return isinstance(recorded, str) and recorded.rsplit(":", 2)[0] == _machine() and not is_gone(recorded)


def retry_lost(study: optuna.Study, trial: FrozenTrial, what: str) -> str | None:
    """Retry a trial (already failed) that lost one of its processes, within the storage's retry
    limit, as a trial whose worker died is; the line to say when the limit is reached."""
    return stale_retrier(storage_of(study)).retry(study, trial, what)


def stale_retrier(storage: BaseStorage) -> RetryStaleTrial:
    """The storage's own retry of a trial whose process died (its cap), or one without a cap where
    the storage has none (a journal)."""
    callback = getattr(storage, "get_heartbeat_stale_trial_callback", lambda: None)()
    return callback if isinstance(callback, RetryStaleTrial) else RetryStaleTrial(None)


def rerun(study: optuna.Study, trial: FrozenTrial) -> int:
    """Queue a completed trial again with its parameters and seed, from the start, for `hpo retry
    STUDY N` when its saved model cannot be read: when the run completes, its final state is
    written over the first trial's model (hpo.runtime.lifecycle). Returns the new trial's number."""
    return queue_retry(study, trial, f"hpo retry: trial {trial.number} again, to save its model anew",
                       inherit=False, extra={RERUN_ATTR: trial.number})


def requeue_fresh(study: optuna.Study, trial: FrozenTrial) -> int:
    """Queue a failed trial again with its parameters, from the start, for `hpo retry` after the
    cause was fixed. Returns the new trial's number."""
    why = str(trial.user_attrs.get("reason") or "failed")
    return queue_retry(study, trial, f"hpo retry: trial {trial.number} again ({why})", inherit=False)
