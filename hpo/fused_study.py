"""The fused worker: Optuna trials trained K at a time as batched models (hpo.fused).

The worker keeps K trials in flight, as K parallel workers would, and asks the sampler for each
one freely: fusion changes how trials run, never which parameters are tried. Trials in flight
that share a structure train together as one fused group; the structure is everything that
changes the update rule or the loop (optimizer, batch size, norm, residual, scaling:
hpo.fused.SHARED) and, unless padding is on (`execution.pad`; by default on a GPU only), width
and depth too. Padded, members of other widths and depths share a group, sized for its largest
(hpo.fused). The groups take turns, one epoch each per round. Every epoch each member reports to
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
from collections.abc import Iterable
from typing import Any

import optuna
import torch
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from hpo._private import storage_of, study_id, trial_id
from hpo.budget import budget_status, is_budget_spent, requeue, wait_for_running
from hpo.checkpoints import Envelope
from hpo.data import DataCache, Split
from hpo.endings import CheckpointPolicy, Deadlines, End, Ending, Stop, is_oom
from hpo.fused import PADDED, SHARED, FusedGroup
from hpo.params import Params
from hpo.samplers import effective_n_trials
from hpo.space import suggest
from hpo.storage import BudgetLock, report_all, set_user_attrs
from hpo.study import StudyHandle
from hpo.train import configure_device, metric_value
from hpo.listener import Listener
from hpo.trial import improves, original_number, trial_attributes, trial_seed
from hpo.worker import Interrupted, WorkerResult


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
            for trial_id in list(self.ids):
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception:
                    pass  # the next beat retries; a dead worker is what staleness is for

    def add(self, trial_id: int) -> None:
        self.ids.add(trial_id)
        if self.interval:
            self.storage.record_heartbeat(trial_id)

    def close(self) -> None:
        self.stop.set()


class _Snapshot:
    """The study as read once this epoch, for the pruner.

    Optuna's Trial.should_prune() re-reads every unfinished trial of the study; for K fused
    members that is K reads of K running trials per epoch. The pruners only need the trials as
    they stand after this epoch's reports, so one read serves the whole group.
    """

    def __init__(self, study: optuna.Study) -> None:
        self._study = study
        self._trials = study.get_trials(deepcopy=False)

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[optuna.trial.FrozenTrial]:
        import copy

        trials = [t for t in self._trials if states is None or t.state in states]
        return copy.deepcopy(trials) if deepcopy else trials

    @property
    def trials(self) -> list[optuna.trial.FrozenTrial]:
        return self.get_trials()

    def frozen(self, tid: int) -> optuna.trial.FrozenTrial:
        return next(t for t in self._trials if trial_id(t) == tid)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


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
) -> WorkerResult:
    study, spec = handle.study, handle.spec
    configure_device(device)
    listener = listener or Listener()
    data = data or DataCache(spec.builtin_data, spec.seed, device, spec.model)
    total = effective_n_trials(spec)
    timeout = timeout if timeout is not None else spec.budget.timeout
    deadline = time.monotonic() + timeout if timeout else None
    epochs = spec.budget.epochs
    lock = BudgetLock(storage_of(study), study_id(study))
    beats = _Heartbeats(study)
    result = WorkerResult()
    # One fused group per structure among the trials in flight; at most `group_size` trials in
    # flight in all, as `group_size` parallel workers would have.
    groups: dict[tuple[Any, ...], FusedGroup] = {}
    key_names = SHARED if spec.execution.pads(device.type) else SHARED + PADDED
    limits: dict[int, Deadlines] = {}  # per trial: budget.trial_timeout, checked every epoch
    policy = CheckpointPolicy(checkpoint_interval)  # its cost is one member's checkpoint

    def in_flight() -> int:
        return sum(len(g) for g in groups.values())

    def can_start() -> bool:
        if n_trials is not None and result.ran >= n_trials:
            result.stopped = f"ran the {n_trials} trials asked of this worker"
            return False
        if deadline is not None and time.monotonic() >= deadline:
            result.stopped = f"timeout of {timeout:g} s reached"
            return False
        return True

    def ask() -> tuple[optuna.Trial, Params, int] | None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "heartbeat is meant for optimize": we beat
                trial = study.ask()
        except Exception as e:
            if not is_budget_spent(e):  # a gRPC proxy gave another worker the last trial
                raise
            result.stopped, result.budget_reached = f"study budget of {total} trials reached", True
            return None
        number = original_number(trial)  # before suggest(), which fills trial.params
        return trial, suggest(trial, spec), number

    def fill() -> None:
        """Refill every free slot from the sampler; each trial joins the group of its structure.

        One budget read serves every trial this fill starts: under the lock no other worker
        starts one, and none of the changes others can make (a trial finishing, failing, or
        coming back as a retry) changes what is left."""
        if in_flight() >= group_size or not can_start():
            return
        lock.acquire()
        try:
            status = budget_status(study, total)
            left = max(0, status.remaining) + status.waiting  # ask() takes a queued trial first
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # experimental
                optuna.storages.fail_stale_trials(study)
            while in_flight() < group_size and can_start():
                if left <= 0:
                    result.stopped, result.budget_reached = f"study budget of {total} trials reached", True
                    return
                asked = ask()
                if asked is None:
                    return
                left -= 1
                start(*asked)
        finally:
            lock.release()

    def start(trial: optuna.Trial, params: Params, number: int) -> None:
        key = _structure(params, key_names)
        group = groups.get(key)
        if group is None:
            group = groups[key] = FusedGroup(data.folds(params.scaling)[0], device)
        member = group.add(trial, params, trial_seed(spec.seed, number), epochs, number)
        _resume(group, len(group) - 1, Envelope.from_dict(handle.artifacts.load_checkpoint(number)))
        beats.add(trial_id(trial))
        result.ran += 1
        limits[trial.number] = Deadlines.start(spec.budget.trial_timeout, None)
        listener.trial_started(trial.number, params.to_dict(), member.epoch)

    def finish(group: FusedGroup, index: int, ending: Ending, value: float | None = None) -> None:
        trial: optuna.Trial = group.members[index].key
        try:
            _finish(group, index, ending, value)
        except (UpdateFinishedTrialError, ValueError):
            if not storage_of(study).get_trial(trial_id(trial)).state.is_finished():
                raise
            # Another worker failed it as stale while this one was stopped, and queued its retry.
            beats.ids.discard(trial_id(trial))
            listener.note(f"trial {trial.number} was taken over by another worker while this one was stopped "
                          "(past the grace period); dropped it, going on")

    def _finish(group: FusedGroup, index: int, ending: Ending, value: float | None = None) -> None:
        member = group.members[index]
        trial: optuna.Trial = member.key
        extra = {"n_params": member.n_params, "fused_group_size": group_size}
        set_user_attrs(trial, trial_attributes(spec.metric, member.curves, member.epoch_seconds, device,
                                               member.resumed_from, extra, ending.reason))
        if ending.end is End.COMPLETE and value is not None and improves(study, value):
            handle.artifacts.upload(trial, "model.pt", _member_state(group, index).state)
        handle.artifacts.remove_checkpoint(member.number)
        frozen = study.tell(trial, value if ending.end is End.COMPLETE else None, state=ending.end.state)
        beats.ids.discard(trial_id(trial))
        listener.trial_finished(study, frozen)

    def train(group: FusedGroup, reports: list[tuple[optuna.Trial, float, int]]) -> dict[int, float] | None:
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
            ending = Ending.out_of_memory(device, f"a fused group of {len(group)}") if is_oom(e) else Ending.error(e)
            for i, m in enumerate(group.members):
                m.key.set_user_attr("traceback", traceback.format_exc()[-4000:])
                finish(group, i, ending)
            group.remove(list(range(len(group))))
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return None
        values: dict[int, float] = {}
        for i, (m, loss, val) in enumerate(zip(group.members, losses, vals)):
            trial: optuna.Trial = m.key
            value = metric_value(spec.metric, val)
            # The same metrics, under the same names, as hpo's own loop reports one at a time.
            for name, v in ((spec.metric, value), ("train_loss", loss), ("val_loss", val["loss"])):
                if name != "val_loss" or spec.metric != "val_loss":
                    m.curves.setdefault(name, []).append(v)
            m.epoch_seconds.append(seconds)
            m.epoch += 1
            if math.isfinite(loss) and math.isfinite(val["loss"]):
                values[i] = value
                reports.append((trial, values[i], m.epoch - 1))
                listener.epoch_done(trial.number, m.epoch - 1, values[i])
        return values

    def decide(group: FusedGroup, values: dict[int, float], snapshot: _Snapshot) -> None:
        """End the members that are done (diverged, finished, out of time, pruned); checkpoint the rest."""
        done: list[int] = []
        for i, m in enumerate(group.members):
            trial: optuna.Trial = m.key
            epoch = m.epoch - 1
            if i in values and m.epoch >= m.epochs:
                ending: Ending | None = Ending(End.COMPLETE)
            else:
                ending = _verdict(m, i in values, epoch, limits[trial.number])
            if ending is None and study.pruner.prune(snapshot, snapshot.frozen(trial_id(trial))):  # type: ignore[arg-type]
                ending = Ending.pruned(spec.pruner.name, epoch)
            if ending is not None:
                finish(group, i, ending, values.get(i))
                done.append(i)
            elif policy.due(m.last_checkpoint, len(group)):
                # K members' checkpoints together take at most ~5% of the group's time.
                t0 = time.monotonic()
                handle.artifacts.save_checkpoint(m.number, _member_state(group, i).to_dict())
                m.last_checkpoint = time.monotonic()
                policy.cost = m.last_checkpoint - t0
                m.checkpoint_epoch = m.epoch
        group.remove(done)

    try:
        while True:
            fill()
            for key in [k for k, g in groups.items() if not len(g)]:
                del groups[key]
            if not groups:
                if result.budget_reached and wait_for_running(study, listener.note):
                    result.stopped, result.budget_reached = "", False
                    continue  # a trial running elsewhere may still come back as a retry
                if not result.stopped:
                    result.stopped = "nothing left to run"
                break
            if deadline is not None and time.monotonic() >= deadline:
                # The study's timeout: the groups stop at an epoch boundary and every member is
                # queued to resume from its last checkpoint, as on Ctrl-C.
                queued = _stop_groups(groups.values(), result)
                result.stopped = (f"timeout of {timeout:g} s reached; {queued} trials are queued and resume on "
                                  "the next run")
                break
            # One round: every group trains one epoch, the round's reports go in one commit, then one
            # read of the study serves every member's pruning decision, as for K workers in step. A
            # group formed by the refill after a round trains from the next, so no trial runs ahead.
            trained: list[tuple[FusedGroup, dict[int, float] | None]] = []
            reports: list[tuple[optuna.Trial, float, int]] = []
            for group in list(groups.values()):
                if deadline is not None and time.monotonic() >= deadline:
                    break
                trained.append((group, train(group, reports)))
            report_all(reports)
            snapshot = _Snapshot(study)
            for group, values in trained:
                if values is not None:
                    decide(group, values, snapshot)
    except KeyboardInterrupt:
        _stop_groups(groups.values(), result)
        raise Interrupted(result) from None
    finally:
        beats.close()
    return result


def _stop_groups(groups: Iterable[FusedGroup], result: WorkerResult) -> int:
    """End every member in flight as FAIL and queue its retry (resuming from its last checkpoint)."""
    members = [m for g in groups for m in g.members]
    for m in members:
        trial: optuna.Trial = m.key
        study = trial.study
        try:
            study.tell(trial, state=TrialState.FAIL)
        except Exception:
            pass  # already told (the interrupt came while it was being finished)
        requeue(study, trial_id(trial))
    if members:
        result.interrupted_trial = members[0].key.number
        result.resumes_from_epoch = members[0].checkpoint_epoch
    return len(members)


def _verdict(m: Any, finite: bool, epoch: int, limit: Deadlines) -> Ending | None:
    """A member's ending decided by hpo.endings' rules (diverged, its time limit), or None."""
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
    """Member i's checkpoint in the one format (hpo.checkpoints): its training state in the
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
