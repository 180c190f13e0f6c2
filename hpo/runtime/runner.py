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
            with TrialOutput(self.ctx.artifacts, ot, self.ctx.label_output) as self.output:
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
        record = self.current = TrialRecord(ctx, attempt.number, ot, attempt.envelope, attempt.inherited)
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
                return self._rank_failed(attempt, record, failed)  # another rank failed after rank 0 was done
            values = record.objective_values(returned)
            constraints = record.constraint_values()
        except Stop as e:
            frozen = self._end(attempt, record, e.ending)
            if e.ending.end.requeued:
                raise  # the study's timeout: the worker stops, the trial resumes on the next run
            return frozen
        except optuna.TrialPruned as e:
            reason = str(e) if isinstance(e, TrialPruned) else f"pruned by {ctx.who}: {e}".rstrip(": ")
            return self._end(attempt, record, Ending(End.PRUNED, reason))
        except UpdateFinishedTrialError:
            raise  # taken over: the lifecycle says so
        except UserCodeError as e:
            self._end(attempt, record, Ending(End.ERROR, str(e)))
            raise  # a mistake in the code, not in these parameters: every trial would fail the same way
        except SystemExit as e:
            if why := stopping.requested():  # a framework that exits on Ctrl-C (Lightning): the stop, obeyed
                self._end(attempt, record, _interrupted(record, why))
                raise KeyboardInterrupt from None
            epoch = record.epoch_in_flight()
            self._end(attempt, record, Ending(End.ERROR, f"{ctx.who}: called sys.exit({e.code!r}) in epoch {epoch}"))
            raise UserCodeError(f"{ctx.who}: called sys.exit({e.code!r}) in epoch {epoch}; a training function "
                                "returns (or raises) instead of exiting") from None
        except KeyboardInterrupt as e:
            if why := stopping.requested():  # a stop (Ctrl-C, SIGTERM, hpo stop): the trial is queued
                self._end(attempt, record, _interrupted(record, why))
                raise
            return self._end(attempt, record, Ending(End.ERROR, "KeyboardInterrupt raised by the training code "
                                                                "(no stop was requested)"), e)
        except Exception as e:
            if is_storage_failure(e) or is_disk_full(e):
                raise  # the worker's problem (retry or stop), not a verdict on the trial
            if group is not None and (failed := group.explain(e)) is not None:
                return self._rank_failed(attempt, record, failed)
            ending = Ending.out_of_memory(ctx.device, _sizes(params)) if is_oom(e) else Ending.error(e)
            return self._end(attempt, record, ending, e)
        finally:
            if group is not None:
                group.close()
        record.close()
        self._finish_output()
        model = record.final_state if record.state is not None else None
        return self.life.end(attempt, Outcome(Ending(End.COMPLETE), record.attributes(None), values, constraints,
                                              model))

    def _end(self, attempt: Attempt, record: TrialRecord, ending: Ending,
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

    def _rank_failed(self, attempt: Attempt, record: TrialRecord, failed: RankFailure) -> FrozenTrial:
        """End the trial as another of its ranks failed: its error, or lost (retried)."""
        frozen = self._end(attempt, record, failed.ending, failed.error)
        if failed.user_code:
            raise UserCodeError(f"{self.ctx.who}: {failed.ending.reason}")
        return frozen

    def _finish_output(self) -> None:
        if self.output is not None:
            self.output.finish()


def _interrupted(record: TrialRecord, why: str) -> Ending:
    return Ending(End.INTERRUPTED, f"interrupted ({why}) in epoch {record.epoch_in_flight()}; queued to resume "
                                   f"from epoch {record.checkpointed_epoch}")


def _sizes(params: Mapping[str, Any]) -> str:
    """The parameters that size a model, for an out-of-memory reason."""
    keys = [k for k in ("batch_size", "width", "depth") if k in params] or list(params)[:6]
    return ", ".join(f"{k}={params[k]}" for k in keys)
