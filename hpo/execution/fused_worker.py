"""The fused worker: Optuna trials trained K at a time as batched models (hpo.training.fused).

The worker keeps K trials in flight, as K parallel workers would, and asks the sampler for each
one freely: fusion changes how trials run, never which parameters are tried. Trials in flight
that share a structure train together as one fused group; the structure is everything that
changes the update rule or the loop (optimizer, batch size, norm, residual, scaling:
hpo.training.fused.SHARED) and, unless padding is on (`execution.pad`; by default on a GPU only), width
and depth too. Padded, members of other widths and depths share a group, sized for its largest
(hpo.training.fused). The groups take turns, one epoch each per round. Every epoch each member reports to
its own trial; a member that is pruned, diverges or finishes leaves its group at once and its slot
is refilled from the sampler (continuous batching), into whichever group fits the new trial's
structure.

The trade-off is speed, not search: a group is as large as the number of trials in flight that
share its structure, so fusion gains most once the sampler settles on a few structures, and
little while it spreads K trials over K structures. An earlier design fixed each group's structure
to its first member's (Optuna's PartialFixedSampler) to keep groups full: it was faster, but it
explored width and depth once per 2K trials instead of once per trial and found worse best scores
at equal budget (the figures are in benchmarks/RESULTS.md). A tool whose speed-up changes what it
finds is not one to trust by default.

Everything the one-at-a-time worker guarantees holds here too: the study's budget (under the same
lock), heartbeats for every member, per-epoch checkpoints (a retried member resumes, fused), and
Ctrl-C requeues every member in flight.
"""

from __future__ import annotations

import math
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import optuna
import torch
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from hpo._private import storage_of, study_id, trial_id
from hpo.data.splits import DataCache, Split
from hpo.execution.worker import Interrupted, WorkerResult, reclaim
from hpo.runtime import stopping
from hpo.runtime.checkpoints import Envelope
from hpo.runtime.endings import CheckpointPolicy, Deadlines, End, Ending, Stop, is_oom
from hpo.runtime.listener import Listener
from hpo.runtime.pruning import Snapshot
from hpo.runtime.trial import improves, original_number, trial_attributes, trial_seed
from hpo.search.budget import count_budget, is_budget_spent, wait_for_running
from hpo.search.failures import verdict
from hpo.search.samplers import effective_n_trials
from hpo.search.study import StudyHandle
from hpo.spec.params import Params
from hpo.spec.space import suggest
from hpo.storage.backends import BudgetLock, report_all, set_user_attrs
from hpo.storage.retry import claim, requeue
from hpo.training.fused import PADDED, SHARED, FusedGroup
from hpo.training.trainer import configure_device, metric_value


class _Heartbeats:
    """Records a heartbeat for every member in flight (Optuna does this only inside optimize)."""

    def __init__(self, study: optuna.Study) -> None:
        storage: Any = storage_of(study)  # an RDB storage (heartbeats) or a journal/proxy (none)
        self.interval = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
        self.storage = storage
        self.ids: set[int] = set()
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        if self.interval:
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            for tid in list(self.ids):
                try:
                    self.storage.record_heartbeat(tid)
                except Exception:
                    pass  # the next beat retries; a dead worker is what staleness is for

    def add(self, trial_id: int) -> None:
        self.ids.add(trial_id)
        if self.interval:
            self.storage.record_heartbeat(trial_id)

    def close(self) -> None:
        self.stop.set()


def _structure(params: Params, names: tuple[str, ...]) -> tuple[Any, ...]:
    """The values a member must share with its group (its bucket's key)."""
    return tuple(getattr(params, k) for k in names)


def run_fused_worker(
    handle: StudyHandle,
    *,
    device: torch.device,
    group_size: int,
    n_trials: int | None = None,
    timeout: float | None = None,
    listener: Listener | None = None,
    data: DataCache | None = None,
    checkpoint_interval: float = 2.0,
    since: float | None = None,
    before_trial: Callable[[], object] = lambda: None,
) -> WorkerResult:
    """Run trials K at a time until the budget, `n_trials`, the timeout or the run's failures
    (hpo.search.failures) stop this worker."""
    configure_device(device)
    data = data or DataCache(handle.spec.builtin_data, handle.spec.seed, device, handle.spec.model)
    worker = FusedWorker(handle, device, group_size, data, listener or Listener(), checkpoint_interval,
                         n_trials, timeout if timeout is not None else handle.spec.budget.timeout, since)
    worker.before_fill = before_trial
    try:
        worker.run()
    except KeyboardInterrupt:
        _stop_groups(worker.groups.values(), worker.result, f"interrupted ({stopping.requested() or 'stopped'})")
        raise Interrupted(worker.result) from None
    finally:
        worker.beats.close()
    return worker.result


class FusedWorker:
    """The fused worker's state and its steps: fill the free slots, train one round, decide each
    member's fate. Each step is a method so it can be read (and tested) alone."""

    def __init__(self, handle: StudyHandle, device: torch.device, group_size: int, data: DataCache,
                 listener: Listener, checkpoint_interval: float, n_trials: int | None,
                 timeout: float | None, since: float | None = None) -> None:
        self.since = time.time() if since is None else since
        self.handle, self.study, self.spec = handle, handle.study, handle.spec
        self.device, self.group_size, self.data, self.listener = device, group_size, data, listener
        self.n_trials, self.timeout = n_trials, timeout
        self.deadline = time.monotonic() + timeout if timeout else None
        self.total = effective_n_trials(self.spec)
        self.lock = BudgetLock(storage_of(self.study), study_id(self.study))
        self.beats = _Heartbeats(self.study)
        self.result = WorkerResult()
        # One fused group per structure among the trials in flight; at most `group_size` trials in
        # flight in all, as `group_size` parallel workers would have.
        self.groups: dict[tuple[Any, ...], FusedGroup] = {}
        self.key_names = SHARED if self.spec.execution.pads(device.type) else SHARED + PADDED
        self.limits: dict[int, Deadlines] = {}  # per trial: budget.trial_timeout, checked every epoch
        self.policy = CheckpointPolicy(checkpoint_interval)  # its cost is one member's checkpoint
        self.before_fill: Callable[[], object] = lambda: None

    def run(self) -> None:
        reclaim(self.study, self.listener)
        while True:
            stopping.raise_if_requested()  # hpo stop, or a signal that came inside hpo's own code
            self.fill()
            for key in [k for k, g in self.groups.items() if not len(g)]:
                del self.groups[key]
            if not self.groups:
                if self.result.budget_reached and wait_for_running(self.study, self.listener.note):
                    self.result.stopped, self.result.budget_reached = "", False
                    continue  # a trial running elsewhere may still come back as a retry
                if not self.result.stopped:
                    self.result.stopped = "nothing left to run"
                return
            if self.out_of_time():
                # The study's timeout: the groups stop at an epoch boundary and every member is
                # queued to resume from its last checkpoint, as on Ctrl-C.
                queued = _stop_groups(self.groups.values(), self.result, "study timeout")
                self.result.stopped = (f"timeout of {self.timeout:g} s reached; {queued} trials are queued and "
                                       "resume on the next run")
                return
            self.round()

    def round(self) -> None:
        """Every group trains one epoch, the round's reports go in one commit, then one read of the
        study serves every member's pruning decision, as for K workers in step. A group formed by
        the refill after a round trains from the next, so no trial runs ahead."""
        trained: list[tuple[FusedGroup, dict[int, float] | None]] = []
        reports: list[tuple[optuna.Trial, float, int]] = []
        for group in list(self.groups.values()):
            if self.out_of_time():
                break
            trained.append((group, self.train(group, reports)))
        report_all(reports)
        snapshot = Snapshot(self.study, self.spec.direction)
        for group, values in trained:
            if values is not None:
                self.decide(group, values, snapshot)

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def in_flight(self) -> int:
        return sum(len(g) for g in self.groups.values())

    def can_start(self) -> bool:
        if self.n_trials is not None and self.result.ran >= self.n_trials:
            self.result.stopped = f"ran the {self.n_trials} trials asked of this worker"
            return False
        if self.out_of_time():
            self.result.stopped = f"timeout of {self.timeout:g} s reached"
            return False
        return True

    def budget_reached(self) -> None:
        self.result.stopped, self.result.budget_reached = f"study budget of {self.total} trials reached", True

    def ask(self) -> tuple[optuna.Trial, Params, int] | None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "heartbeat is meant for optimize": we beat
                trial = self.study.ask()
        except Exception as e:
            if not is_budget_spent(e):  # a gRPC proxy gave another worker the last trial
                raise
            self.budget_reached()
            return None
        number = original_number(trial)  # before suggest(), which fills trial.params
        return trial, suggest(trial, self.spec), number

    def fill(self) -> None:
        """Refill every free slot from the sampler; each trial joins the group of its structure.

        One budget read serves every trial this fill starts: under the lock no other worker
        starts one, and none of the changes others can make (a trial finishing, failing, or
        coming back as a retry) changes what is left."""
        if self.in_flight() >= self.group_size or not self.can_start():
            return
        self.before_fill()  # this worker's share of the host's CPUs, read again
        self.lock.acquire()
        try:
            trials = self.study.get_trials(deepcopy=False)
            if (failure := verdict(trials, self.since, self.spec.budget.failure_limit)) is not None:
                self.result.stopped, self.result.failure = failure.reason, failure
                return
            status = count_budget(trials, self.total)
            left = max(0, status.remaining) + status.waiting  # ask() takes a queued trial first
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # experimental
                optuna.storages.fail_stale_trials(self.study)
            while self.in_flight() < self.group_size and self.can_start():
                if left <= 0:
                    self.budget_reached()
                    return
                asked = self.ask()
                if asked is None:
                    return
                left -= 1
                self.start(*asked)
        finally:
            self.lock.release()

    def start(self, trial: optuna.Trial, params: Params, number: int) -> None:
        key = _structure(params, self.key_names)
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = FusedGroup(self.data.folds(params.scaling)[0], self.device)
        member = group.add(trial, params, trial_seed(self.spec.seed, number), self.spec.budget.epochs, number)
        _resume(group, len(group) - 1, Envelope.from_dict(self.handle.artifacts.load_checkpoint(number)))
        self.beats.add(trial_id(trial))
        claim(storage_of(self.study), trial_id(trial))
        self.result.ran += 1
        self.limits[trial.number] = Deadlines.start(self.spec.budget.trial_timeout, None)
        self.listener.trial_started(trial.number, params.to_dict(), member.epoch,
                                    None if member.number == trial.number else member.number)

    def finish(self, group: FusedGroup, index: int, ending: Ending, value: float | None = None) -> None:
        trial: optuna.Trial = group.members[index].key
        try:
            self._finish(group, index, ending, value)
        except (UpdateFinishedTrialError, ValueError):
            if not storage_of(self.study).get_trial(trial_id(trial)).state.is_finished():
                raise
            # Another worker failed it as stale while this one was stopped, and queued its retry.
            self.beats.ids.discard(trial_id(trial))
            self.listener.warn(f"trial {trial.number} was taken over by another worker while this one was "
                               "stopped (past the grace period); dropped it, going on")

    def _finish(self, group: FusedGroup, index: int, ending: Ending, value: float | None = None) -> None:
        member = group.members[index]
        trial: optuna.Trial = member.key
        extra = {"n_params": member.n_params, "fused_group_size": self.group_size, "threads": torch.get_num_threads()}
        set_user_attrs(trial, trial_attributes(self.spec.metric, member.curves, member.epoch_seconds, self.device,
                                               member.resumed_from, extra, ending.reason))
        if ending.end is End.COMPLETE and value is not None and improves(self.study, value):
            self.handle.artifacts.upload(trial, "model.pt", _member_state(group, index).state)
        self.handle.artifacts.remove_checkpoint(member.number)
        frozen = self.study.tell(trial, value if ending.end is End.COMPLETE else None, state=ending.end.state)
        self.beats.ids.discard(trial_id(trial))
        self.listener.trial_finished(self.study, frozen)

    def train(self, group: FusedGroup, reports: list[tuple[optuna.Trial, float, int]]) -> dict[int, float] | None:
        """One epoch of one group: {member index: value} for the members whose loss is finite, each
        added to `reports` for its trial. A group that raises (out of memory, say) ends at once."""
        try:
            t0 = time.perf_counter()
            losses = group.train_epoch().tolist()
            val_split = group.data.val
            assert isinstance(val_split, Split), "a fused group trains on resident data"
            vals = group.evaluate(val_split)
            group.after_epoch([v["loss"] for v in vals])
            seconds = time.perf_counter() - t0
        except Exception as e:
            self.fail_group(group, e)
            return None
        metric = self.spec.metric
        values: dict[int, float] = {}
        for i, (m, loss, val) in enumerate(zip(group.members, losses, vals)):
            value = metric_value(metric, val)
            # The same metrics, under the same names, as hpo's own loop reports one at a time.
            for name, v in ((metric, value), ("train_loss", loss), ("val_loss", val["loss"])):
                if name != "val_loss" or metric != "val_loss":
                    m.curves.setdefault(name, []).append(v)
            m.epoch_seconds.append(seconds)
            m.epoch += 1
            if math.isfinite(loss) and math.isfinite(val["loss"]):
                values[i] = value
                reports.append((m.key, value, m.epoch - 1))
                self.listener.epoch_done(m.key.number, m.epoch - 1, value)
        return values

    def fail_group(self, group: FusedGroup, e: Exception) -> None:
        """End every member of a group whose epoch raised (out of memory, an error)."""
        ending = Ending.out_of_memory(self.device, f"a fused group of {len(group)}") if is_oom(e) else Ending.error(e)
        for i, m in enumerate(group.members):
            m.key.set_user_attr("traceback", traceback.format_exc()[-4000:])
            self.finish(group, i, ending)
        group.remove(list(range(len(group))))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def decide(self, group: FusedGroup, values: dict[int, float], snapshot: Snapshot) -> None:
        """End the members that are done (diverged, finished, out of time, pruned); checkpoint the rest."""
        done: list[int] = []
        for i, m in enumerate(group.members):
            trial: optuna.Trial = m.key
            epoch = m.epoch - 1
            if i in values and m.epoch >= m.epochs:
                ending: Ending | None = Ending(End.COMPLETE)
            else:
                ending = _verdict(m, i in values, epoch, self.limits[trial.number])
            if ending is None and self.study.pruner.prune(snapshot, snapshot.frozen(trial_id(trial))):  # type: ignore[arg-type]
                ending = Ending.pruned(self.spec.pruner.name, epoch)
            if ending is not None:
                self.finish(group, i, ending, values.get(i))
                done.append(i)
            elif self.policy.due(m.last_checkpoint, len(group)):
                # K members' checkpoints together take at most ~5% of the group's time.
                t0 = time.monotonic()
                self.handle.artifacts.save_checkpoint(m.number, _member_state(group, i).to_dict())
                m.last_checkpoint = time.monotonic()
                self.policy.cost = m.last_checkpoint - t0
                m.checkpoint_epoch = m.epoch
        group.remove(done)


def _stop_groups(groups: Iterable[FusedGroup], result: WorkerResult, why: str) -> int:
    """End every member in flight as FAIL and queue its retry (resuming from its last checkpoint)."""
    members = [m for g in groups for m in g.members]
    for m in members:
        trial: optuna.Trial = m.key
        study = trial.study
        try:
            study.tell(trial, state=TrialState.FAIL)
        except Exception:
            pass  # already told (the interrupt came while it was being finished)
        requeue(study, trial_id(trial), f"{why} in epoch {m.epoch}")
    if members:
        result.interrupted_trial = members[0].key.number
        result.resumes_from_epoch = members[0].checkpoint_epoch
    return len(members)


def _verdict(m: Any, finite: bool, epoch: int, limit: Deadlines) -> Ending | None:
    """A member's ending decided by hpo.runtime.endings' rules (diverged, its time limit), or None."""
    if not finite:
        loss = m.curves["train_loss"][-1]
        name, value = ("train_loss", loss) if not math.isfinite(loss) else ("val_loss", m.curves["val_loss"][-1])
        return Ending.diverged(name, value, epoch)
    try:
        limit.check(m.epoch)
    except Stop as e:
        return e.ending
    return None


def _member_state(group: FusedGroup, i: int) -> Envelope:
    """Member i's checkpoint in the one format (hpo.runtime.checkpoints): its training state in the
    portable form an unfused Trainer reads too, so it resumes fused or not."""
    m = group.members[i]
    fold = {
        "epoch": m.epoch,
        "model": group.member_state_dict(i),
        "optimizer": {"steps": float(group.steps[i]), "lr": m.lr, "state": group.member_optimizer_state(i)},
        "schedule": m.schedule.state_dict(),
        "generator": m.generator.get_state(),
    }
    return Envelope(m.epoch, {"folds": [fold], "params": m.params.to_dict()}, m.curves, m.epoch_seconds)


def _resume(group: FusedGroup, i: int, envelope: Envelope | None) -> None:
    """Put a retried member back where its last checkpoint (fused or not) left it."""
    if envelope is None:
        return
    m = group.members[i]
    fold = envelope.state["folds"][0]
    opt = fold["optimizer"]
    group.load_member(i, fold["model"], opt["state"], opt["steps"])
    m.schedule.load_state_dict(fold["schedule"])
    for g in m.lr_holder.param_groups:
        g["lr"] = float(opt["lr"])
    m.generator.set_state(fold["generator"].cpu())
    m.epoch = m.checkpoint_epoch = m.resumed_from = envelope.epoch
    m.curves = {k: list(v) for k, v in envelope.curves.items()}
    m.epoch_seconds = list(envelope.epoch_seconds)
