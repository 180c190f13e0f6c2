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
import time
from collections.abc import Callable
from typing import Any

import optuna
import torch

from hpo._private import trial_id
from hpo.data.splits import DataCache, Split
from hpo.errors import DiskFullError
from hpo.execution.worker import Interrupted, WorkerResult, reclaim
from hpo.runtime import stopping
from hpo.runtime.checkpoints import Envelope
from hpo.runtime.endings import CheckpointPolicy, Deadlines, End, Ending, Stop, is_oom
from hpo.runtime.lifecycle import (
    Attempt,
    Lifecycle,
    Outcome,
    TakenOver,
    trial_attributes,
)
from hpo.runtime.listener import Listener
from hpo.runtime.pruning import Snapshot
from hpo.runtime.trial import trial_seed
from hpo.search.budget import wait_for_running
from hpo.search.samplers import effective_n_trials
from hpo.search.slots import TrialSlots
from hpo.search.study import StudyHandle
from hpo.spec.params import Params
from hpo.spec.space import suggest
from hpo.storage.resilient import report_all
from hpo.training.fused import PADDED, SHARED, FusedGroup
from hpo.training.trainer import configure_device, metric_value


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
        worker.stop_groups(f"interrupted ({stopping.requested() or 'stopped'})")
        raise Interrupted(worker.result) from None
    except DiskFullError as e:  # no space for a checkpoint or a model: every member resumes on the next run
        worker.stop_groups(str(e))
        raise
    finally:
        worker.life.close()
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
        self.slots = TrialSlots(self.study, self.total, self.since, self.spec.budget.failure_limit, listener.warn)
        self.life = Lifecycle(self.study, handle.artifacts, listener)
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
                queued = self.stop_groups("study timeout")
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

    def stop_groups(self, why: str) -> int:
        """End every member in flight and queue its retry (resuming from its last checkpoint)."""
        members = [m for g in self.groups.values() for m in g.members]
        for m in members:
            self.life.abandon(m.key.trial, f"{why} in epoch {m.epoch}")
        if members:
            self.result.interrupted_trial = members[0].key.trial.number
            self.result.resumes_from_epoch = members[0].checkpoint_epoch
        return len(members)

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

    def fill(self) -> None:
        """Refill every free slot from the sampler (one slot call for them all); each trial joins
        the group of its structure."""
        if self.in_flight() >= self.group_size or not self.can_start():
            return
        self.before_fill()  # this worker's share of the host's CPUs, read again
        with stopping.shielded():  # each new trial joins a group (which a stop queues) before a signal is raised
            taken = self.slots.take(self.group_size - self.in_flight(), self.can_start, self.start)
        if taken.stopped:
            self.result.stopped, self.result.failure = taken.stopped, taken.failure
            self.result.budget_reached = taken.budget_reached

    def start(self, trial: optuna.Trial) -> None:
        attempt = self.life.start(trial)
        params = suggest(trial, self.spec)
        key = _structure(params, self.key_names)
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = FusedGroup(self.data.folds(params.scaling)[0], self.device)
        member = group.add(attempt, params, trial_seed(self.spec.seed, attempt.number), self.spec.budget.epochs,
                           attempt.number)
        _resume(group, len(group) - 1, attempt.envelope)
        self.result.ran += 1
        self.limits[trial.number] = Deadlines.start(self.spec.budget.trial_timeout, None)
        self.listener.trial_started(trial.number, params.to_dict(), member.epoch, attempt.retry_of)

    def finish(self, group: FusedGroup, index: int, ending: Ending, value: float | None = None,
               error: BaseException | None = None) -> None:
        member = group.members[index]
        attempt: Attempt = member.key
        extra = {"n_params": member.n_params, "fused_group_size": self.group_size, "threads": torch.get_num_threads()}
        attributes = trial_attributes(self.spec.metric, member.curves, member.epoch_seconds, self.device,
                                      member.resumed_from, extra, ending.reason)
        complete = ending.end is End.COMPLETE and value is not None
        outcome = Outcome(ending, attributes, [value] if complete and value is not None else None, error=error,
                          model=lambda: _member_state(group, index).state)
        try:
            self.life.end(attempt, outcome)
        except TakenOver as e:
            self.listener.warn(str(e))

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
                reports.append((m.key.trial, value, m.epoch - 1))
                self.listener.epoch_done(m.key.trial.number, m.epoch - 1, value)
        return values

    def fail_group(self, group: FusedGroup, e: Exception) -> None:
        """End every member of a group whose epoch raised (out of memory, an error)."""
        ending = Ending.out_of_memory(self.device, f"a fused group of {len(group)}") if is_oom(e) else Ending.error(e)
        for i in range(len(group)):
            self.finish(group, i, ending, error=e)
        group.remove(list(range(len(group))))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def decide(self, group: FusedGroup, values: dict[int, float], snapshot: Snapshot) -> None:
        """End the members that are done (diverged, finished, out of time, pruned); checkpoint the rest."""
        done: list[int] = []
        for i, m in enumerate(group.members):
            trial: optuna.Trial = m.key.trial
            epoch = m.epoch - 1
            if i in values and m.epoch >= m.epochs:
                ending: Ending | None = Ending(End.COMPLETE)
            else:
                ending = _verdict(m, i in values, epoch, self.limits[trial.number])
            if ending is None and snapshot.prunes(snapshot.frozen(trial_id(trial))):
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
