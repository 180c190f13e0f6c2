"""What failed trials do to a run, decided in one place for every kind of worker.

The budget counts results (complete and pruned trials), so a failure costs no budget and a re-run
after a fix produces what is still missing. Failures are bounded separately: a run stops once it
has seen `budget.max_failures` of them, and at once when its first trials all fail with the same
error, which is a bug in the code rather than bad luck with parameters. A trial that is queued to
come back (interrupted, retried) is not a failure.
"""

from __future__ import annotations

from dataclasses import dataclass

from optuna.trial import FrozenTrial, TrialState

from hpo.storage.keys import ERROR_ATTR
from hpo.search.budget import retried_numbers

EARLY = 3  # a run whose first EARLY trials fail alike stops


@dataclass(frozen=True)
class FailureStop:
    """Why a run stops on failures: one line, and the user's frames of the traceback."""

    reason: str
    frames: str
    failed: int


def _signature(trial: FrozenTrial) -> str:
    error = trial.system_attrs.get(ERROR_ATTR)
    if isinstance(error, dict) and isinstance(error.get("signature"), str):
        return str(error["signature"])
    return str(trial.user_attrs.get("reason") or "failed")


def _frames(trial: FrozenTrial) -> str:
    error = trial.system_attrs.get(ERROR_ATTR)
    return str(error.get("frames") or "") if isinstance(error, dict) else ""


def run_trials(trials: list[FrozenTrial], since: float) -> list[FrozenTrial]:
    """The trials this run finished (started at or after `since`, a time.time()), in the order
    they finished. Timestamps, not datetimes: the RDB storage keeps local naive times, the
    journal aware UTC ones."""
    mine = [t for t in trials if t.state.is_finished() and t.datetime_start is not None
            and t.datetime_start.timestamp() >= since]
    return sorted(mine, key=lambda t: ((t.datetime_complete or t.datetime_start).timestamp(), t.number))  # type: ignore[union-attr]


def failed_in_run(trials: list[FrozenTrial], since: float) -> list[FrozenTrial]:
    retried = retried_numbers(trials)
    return [t for t in run_trials(trials, since) if t.state == TrialState.FAIL and t.number not in retried]


def verdict(trials: list[FrozenTrial], since: float, limit: int) -> FailureStop | None:
    """Whether a run that started at `since` must stop on its failures, and why."""
    return verdict_of(run_trials(trials, since), retried_numbers(trials), limit)


def verdict_of(ended: list[FrozenTrial], retried: set[int], limit: int) -> FailureStop | None:
    """The verdict from the run's finished trials in the order they finished (run_trials) and the
    numbers that live on in a retry (a worker's ledger keeps both: hpo.storage.ledger)."""
    ended = [t for t in ended if not (t.state == TrialState.FAIL and t.number in retried)]
    failed = [t for t in ended if t.state == TrialState.FAIL]
    if not failed:
        return None
    first = ended[:EARLY]
    if len(first) == EARLY and all(t.state == TrialState.FAIL for t in first) \
            and len({_signature(t) for t in first}) == 1:
        reason = first[0].user_attrs.get("reason") or _signature(first[0])
        return FailureStop(f"the first {EARLY} trials of this run failed with the same error: {reason}",
                           _frames(first[-1]), len(failed))
    if len(failed) >= limit:
        last = failed[-1]
        reason = last.user_attrs.get("reason") or _signature(last)
        return FailureStop(f"{len(failed)} trials of this run failed (budget.max_failures is {limit}); the last: "
                           f"{reason}", _frames(last), len(failed))
    return None


def advice(study_name: str) -> str:
    """What to do next, once the cause is fixed."""
    return (f"failed trials do not count against the budget: fix the cause and run again, or queue the failed "
            f"configurations again with: hpo retry {study_name}")


def run_verdict(trials: list[FrozenTrial], since: float, limit: int) -> FailureStop | None:
    """How a run that started at `since` ended, once its workers stopped: on its failures
    (verdict), or with failures and not one result in the study; None when it has something to show."""
    if (stop := verdict(trials, since, limit)) is not None:
        return stop
    failed = failed_in_run(trials, since)
    if not failed or any(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials):
        return None
    last = failed[-1]
    return FailureStop(f"{len(failed)} trial{'s' if len(failed) > 1 else ''} of this run failed and no trial has a "
                       f"result; the last: {last.user_attrs.get('reason') or _signature(last)}", _frames(last),
                       len(failed))
