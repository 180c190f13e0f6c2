"""One trial at a time: sample its parameters, run the training function (the user's `train` or
hpo's own loop) with an `hpo.Trial`, and end it through the trial lifecycle (hpo.runtime.lifecycle)
as hpo.runtime.endings decides."""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import optuna
import torch
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial

from hpo.data import seeding
from hpo.errors import DiskFullError, is_storage_failure
from hpo.runtime import stopping
from hpo.runtime.endings import End, Ending, Stop, is_oom
from hpo.runtime.lifecycle import Attempt, Lifecycle, Outcome
from hpo.runtime.output import TrialOutput
from hpo.runtime.ranks import (
    RankFailure,
    RankGroup,
    RankSetup,
    pack_checkpoint,
    rank_device,
)
from hpo.runtime.trial import Trial, TrialContext, TrialPruned, TrialRecord, trial_seed
from hpo.spec.space import sample
from hpo.spec.user_code import UserCodeError, registered
from hpo.storage.files import as_disk_full, is_disk_full


@dataclass
class TrialRunner:
    """Runs the trials a worker hands it, one at a time. Raises, after ending the trial: a
    UserCodeError (a mistake every trial would repeat), KeyboardInterrupt (a stop: the trial is
    queued to resume), Stop (the study's timeout: queued too), TakenOver, a storage error."""

    ctx: TrialContext
    life: Lifecycle
    train_fn: Callable[[Trial], Any]
    current: TrialRecord | None = None  # the trial in flight
    took: optuna.Trial | None = None  # the last trial handed to run(): its ending is the runner's
    resumes_from: int | None = None  # the epoch the last requeued trial resumes from
    output: TrialOutput | None = None  # the log of the trial in flight

    def run(self, ot: optuna.Trial) -> FrozenTrial:
        self.current, self.resumes_from, self.output = None, None, None
        try:
            self.took = ot  # from here on, this runner ends the trial however it stops
            with TrialOutput(self.ctx.artifacts, ot, self.ctx.label_output, self.ctx.listener.warn) as self.output:
                with self.life.owned(ot):
                    return self._run(ot)
        except KeyboardInterrupt:
            # A stop outside the training code (sampling, a storage write): queued all the same.
            if self.resumes_from is None:
                self._finish_output()
                record = self.current
                why = f"interrupted ({stopping.requested() or 'stopped'})"
                if self.life.abandon(ot, f"{why} in epoch {record.epoch_in_flight() if record else 0}",
                                     record.checkpointed_epoch if record else 0):
                    self.resumes_from = record.checkpointed_epoch if record else 0
            raise
        except Exception as e:
            if not is_disk_full(e):
                raise
            raise self._disk_full(ot, as_disk_full(e)) from None

    def _disk_full(self, ot: optuna.Trial, full: DiskFullError) -> DiskFullError:
        """No space left for a file of this trial (its checkpoint, log or model, or the training
        code's own): not a verdict on its parameters. The trial is queued to resume from its last
        checkpoint, and the worker stops with the one line that says where space is missing."""
        record = self.current
        try:
            self._finish_output()
        except DiskFullError:
            pass  # its log stays in the live file, where `hpo logs` reads it
        if record is not None:
            record.close()  # the retry inherits every epoch reported
        epoch = record.epoch_in_flight() if record is not None else 0
        if self.life.abandon(ot, f"{full} (in epoch {epoch})", record.checkpointed_epoch if record else 0):
            self.resumes_from = record.checkpointed_epoch if record is not None else 0
        return full

    def _run(self, ot: optuna.Trial) -> FrozenTrial:
        ctx = self.ctx
        attempt = self.life.start(ot)
        params = sample(ot, ctx.spec)
        until = attempt.segment.end if attempt.segment is not None else None
        record = self.current = TrialRecord(ctx, attempt.number, ot, attempt.envelope, attempt.inherited, until=until)
        seeding.seed_all(trial_seed(ctx.spec.seed, attempt.number))
        if attempt.envelope is not None and attempt.envelope.rng is not None:
            seeding.restore(attempt.envelope.rng)  # the streams as they were when the checkpoint was saved
        record.attrs["threads"] = torch.get_num_threads()  # the worker's share of its host when it started
        ctx.listener.trial_started(ot.number, params, record.start_epoch, attempt.retry_of)
        group = self._group(attempt, record, params)
        try:
            if group is not None:
                group.start()
                record.attrs["threads"] = torch.get_num_threads()  # each rank's
                record.last_report = time.monotonic()  # the first epoch's time leaves out the ranks' start
            returned = self.train_fn(Trial(record, params, group))
            stopping.raise_if_requested()  # the code swallowed the stop (except BaseException): obey it now
            if group is not None and (failed := group.close(completed=True)) is not None:
                return self.rank_failed(attempt, record, failed)  # another rank failed after rank 0 was done
            values = record.objective_values(returned)
            constraints = record.constraint_values()
            if attempt.segment is not None:  # a member's segment: the next ones start from its state
                record.keep_segment()
        except BaseException as e:
            for kind, decide in ENDED_BY:  # the first row that matches says how the trial ends
                if isinstance(e, kind):
                    return decide(self, e, _Where(attempt, record, params, group))
            raise
        finally:
            if group is not None:
                group.close()
        record.close()
        self._finish_output()
        model = record.final_state if record.state is not None else None
        return self.life.end(attempt, Outcome(Ending(End.COMPLETE), record.attributes(None), values, constraints,
                                              model))

    def end_early(self, attempt: Attempt, record: TrialRecord, ending: Ending,
             error: BaseException | None = None) -> FrozenTrial:
        """End the trial early, with why in its log (a requeued one: queued to resume)."""
        if self.output is not None:
            if error is not None and ending.end is End.ERROR:
                self.output.note("".join(traceback.format_exception(error)))
            self.output.footnote(f"[hpo] trial {record.number}: {ending.reason or ending.end.value}")
        record.close()
        self._finish_output()
        why = ""
        if ending.end is End.STUDY_TIMEOUT:
            why = f"study timeout in epoch {record.epoch_in_flight()}"
        elif ending.end is End.INTERRUPTED:
            why = f"interrupted ({stopping.requested() or 'stopped'}) in epoch {record.epoch_in_flight()}"
        elif ending.end is End.RANK_LOST:
            why = (ending.reason or "").split(";")[0]
        frozen = self.life.end(attempt, Outcome(ending, record.attributes(ending.reason), error=error,
                                                requeue_why=why, checkpoint_epoch=record.checkpointed_epoch))
        if ending.end.requeued:
            self.resumes_from = record.checkpointed_epoch
        return frozen


    def _group(self, attempt: Attempt, record: TrialRecord, params: dict[str, Any]) -> RankGroup | None:
        """The other processes of a trial of several (execution.processes_per_trial), to start."""
        ctx, world = self.ctx, self.ctx.spec.execution.processes_per_trial
        if world == 1:
            return None
        if ctx.resolve is None:
            raise UserCodeError(f"{ctx.who}: this worker cannot run trials of several processes")
        record.attrs["processes"] = world
        envelope = attempt.envelope
        checkpoint = pack_checkpoint(envelope.state if envelope else None, envelope.rng if envelope else None)
        log = str(self.output.path) if self.output is not None else os.devnull
        label = f"[trial {record.number} rank " if ctx.label_output else "[rank "
        resolve, given, spec = ctx.resolve, registered(ctx.spec.train) if ctx.spec.train else None, ctx.spec

        def setup(rank: int, port: int, threads: int) -> RankSetup:
            return RankSetup(spec, resolve, given, rank, world, port, str(rank_device(ctx.device, rank)), threads,
                             dict(params), record.number, record.first_number, record.start_epoch, checkpoint, log,
                             f"{label}{rank}] ", os.getpid(), dict(os.environ))

        return RankGroup(world, ctx.device, setup, record.epoch_in_flight)

    def rank_failed(self, attempt: Attempt, record: TrialRecord, failed: RankFailure) -> FrozenTrial:
        """End the trial as another of its ranks failed: its error, or lost (retried)."""
        frozen = self.end_early(attempt, record, failed.ending, failed.error)
        if failed.user_code:
            raise UserCodeError(f"{self.ctx.who}: {failed.ending.reason}")
        return frozen

    def _finish_output(self) -> None:
        if self.output is not None:
            self.output.finish()


@dataclass
class _Where:
    """The trial the training code stopped in, for the row of ENDED_BY that ends it."""

    attempt: Attempt
    record: TrialRecord
    params: dict[str, Any]
    group: RankGroup | None


def _stopped(run: TrialRunner, e: BaseException, w: _Where) -> FrozenTrial:
    assert isinstance(e, Stop)
    frozen = run.end_early(w.attempt, w.record, e.ending)
    if e.ending.end.requeued:
        raise e  # the study's timeout: the worker stops, the trial resumes on the next run
    return frozen


def _pruned(run: TrialRunner, e: BaseException, w: _Where) -> FrozenTrial:
    reason = str(e) if isinstance(e, TrialPruned) else f"pruned by {run.ctx.who}: {e}".rstrip(": ")
    return run.end_early(w.attempt, w.record, Ending(End.PRUNED, reason))


def _passed_on(run: TrialRunner, e: BaseException, w: _Where) -> FrozenTrial:
    raise e  # not the trial's to end here: taken over (the lifecycle says so), or the interpreter's own


def _code_mistake(run: TrialRunner, e: BaseException, w: _Where) -> FrozenTrial:
    run.end_early(w.attempt, w.record, Ending(End.ERROR, str(e)))
    raise e  # a mistake in the code, not in these parameters: every trial would fail the same way


def _exited(run: TrialRunner, e: BaseException, w: _Where) -> FrozenTrial:
    assert isinstance(e, SystemExit)
    if why := stopping.requested():  # a framework that exits on Ctrl-C (Lightning): the stop, obeyed
        run.end_early(w.attempt, w.record, _interrupted(w.record, why))
        raise KeyboardInterrupt from None
    epoch, who = w.record.epoch_in_flight(), run.ctx.who
    run.end_early(w.attempt, w.record, Ending(End.ERROR, f"{who}: called sys.exit({e.code!r}) in epoch {epoch}"))
    raise UserCodeError(f"{who}: called sys.exit({e.code!r}) in epoch {epoch}; a training function returns (or "
                        "raises) instead of exiting") from None


def _interrupted_by(run: TrialRunner, e: BaseException, w: _Where) -> FrozenTrial:
    if why := stopping.requested():  # a stop (Ctrl-C, SIGTERM, hpo stop): the trial is queued
        run.end_early(w.attempt, w.record, _interrupted(w.record, why))
        raise e
    return run.end_early(w.attempt, w.record, Ending(End.ERROR, "KeyboardInterrupt raised by the training code (no "
                                                           "stop was requested)"), e)


def _raised(run: TrialRunner, e: BaseException, w: _Where) -> FrozenTrial:
    if is_storage_failure(e) or is_disk_full(e):
        raise e  # the worker's problem (retry or stop), not a verdict on the trial
    if w.group is not None and (failed := w.group.explain(e)) is not None:
        return run.rank_failed(w.attempt, w.record, failed)
    ending = Ending.out_of_memory(run.ctx.device, _sizes(w.params)) if is_oom(e) else Ending.error(e)
    return run.end_early(w.attempt, w.record, ending, e)


# How what stopped the training code ends its trial, read top down (as hpo.runtime.endings says
# what each ending records): a row ends the trial and returns it, or raises to stop the worker.
ENDED_BY: tuple[tuple[type[BaseException], Callable[[TrialRunner, BaseException, _Where], FrozenTrial]], ...] = (
    (Stop, _stopped),  # a time limit or a diverged metric: its own ending; the study's timeout stops the worker
    (optuna.TrialPruned, _pruned),  # the pruner's rule, or the training code's own
    (UpdateFinishedTrialError, _passed_on),  # another worker took the trial over
    (UserCodeError, _code_mistake),  # a misuse of the trial API: every trial would repeat it
    (SystemExit, _exited),  # sys.exit() in training code, or a framework's exit on Ctrl-C
    (KeyboardInterrupt, _interrupted_by),  # a stop asked of this process, or the code's own raise
    (Exception, _raised),  # an error: the trial fails with it (out of memory, a lost rank)
    (BaseException, _passed_on),
)


def _interrupted(record: TrialRecord, why: str) -> Ending:
    return Ending(End.INTERRUPTED, f"interrupted ({why}) in epoch {record.epoch_in_flight()}; queued to resume "
                                   f"from epoch {record.checkpointed_epoch}")


def _sizes(params: Mapping[str, Any]) -> str:
    """The parameters that size a model, for an out-of-memory reason."""
    keys = [k for k in ("batch_size", "width", "depth") if k in params] or list(params)[:6]
    return ", ".join(f"{k}={params[k]}" for k in keys)
