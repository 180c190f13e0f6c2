"""What a person sees while a study runs and when it ends.

On a terminal one status line is rewritten in place (trial n/N, the epoch in flight, best so far,
pruned and failed so far); in a log or CI one line is printed per finished trial. Progress goes
to stderr so stdout carries only the summary.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

import optuna

from hpo.runtime.listener import Listener
from hpo.search.budget import ledger_budget
from hpo.storage.ledger import ledger_of
from hpo.search.summary import best_trial, front
from hpo.spec.schema import UNLIMITED_TRIALS, duration
from hpo.ui.text import fmt


class Progress(Listener):
    def __init__(
        self, total: int, metric: str, epochs: int, quiet: bool = False, out: TextIO | None = None,
        objectives: tuple[str, ...] = (), time_budget: float | None = None,
    ) -> None:
        self.total, self.metric, self.epochs, self.quiet = total, metric, epochs, quiet
        self.time_budget = time_budget  # seconds this run may take: the status line shows what is left
        self.objectives = objectives if len(objectives) > 1 else ()  # names, with several
        self.out = out or sys.stderr
        self.tty = self.out.isatty()
        self.start = time.monotonic()
        self.status = f"[0/{total}]"
        self.resumed: set[int] = set()  # failed trials a retry resumes, as of the last status
        self._best: tuple[float | None, str] = (None, "best -")  # the best value, the best as shown

    def say(self, text: str) -> None:
        """A line that stays (a message, not the status line)."""
        if not self.quiet:
            self._write(text, final=True)

    def _write(self, text: str, final: bool) -> None:
        if self.quiet:
            return
        if self.tty:
            self.out.write("\r\033[K" + text + ("\n" if final else ""))
        elif final:
            self.out.write(text + "\n")
        self.out.flush()

    def _status(self, study: optuna.Study) -> str:
        """The status after a trial, from the process's ledger of the study (hpo.storage.ledger: it
        looks only at the trials new or unfinished since) and Optuna's best-trial query; it runs
        after every trial, in the run's process, while its workers want the cores."""
        ledger = ledger_of(study).read()
        b = ledger_budget(ledger, self.total)
        self.resumed = ledger.resumed
        if self.objectives:
            best = f"front {len(front(study))} trials"
        elif ledger.best_value() == self._best[0]:  # Optuna's query (it sorts every trial) only for a new best
            best = self._best[1]
        else:
            top = best_trial(study)
            best = f"best {fmt(top.value)} (#{top.number})" if top is not None else "best -"
            self._best = (ledger.best_value(), best)
        elapsed = time.monotonic() - self.start
        running = f" running {b.running} |" if b.running > 1 else ""
        pruned = ledger.pruned
        count = f"[{b.finished}]" if self.total >= UNLIMITED_TRIALS else f"[{b.finished}/{self.total}]"
        left = (f" | {duration(max(0.0, self.time_budget - elapsed))} left" if self.time_budget is not None
                else "")
        return (
            f"{count} {best} |{running} "
            f"pruned {pruned} failed {b.failed} | {elapsed:5.0f}s{left}"
        )

    def trial_started(self, number: int, params: Mapping[str, Any], resumed_epoch: int,
                      first: int | None = None) -> None:
        if resumed_epoch:
            of = f" of trial {first}" if first is not None else ""
            self.say(f"trial {number}: resuming from the checkpoint{of} at epoch {resumed_epoch}")

    def epoch_done(self, number: int, epoch: int, value: float) -> None:
        if self.tty:
            self._write(
                f"{self.status} | trial {number} epoch {epoch + 1}/{self.epochs} "
                f"{self.metric} {fmt(value)}",
                final=False,
            )

    def trial_finished(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.status = self._status(study)
        if self.tty:
            self._write(self.status, final=False)
            return
        if self.objectives:
            values = trial.values or [None] * len(self.objectives)
            shown = "  ".join(f"{n} {fmt(v)}" for n, v in zip(self.objectives, values))
        else:
            shown = f"{self.metric} {fmt(trial.value) if trial.value is not None else '-':<8}"
        # A trial stopped under it (Ctrl-C, hpo stop, a full disk) is queued to resume: not a failure.
        state = "QUEUED" if trial.state.name == "FAIL" and trial.number in self.resumed else trial.state.name
        line = (
            f"trial {trial.number:>4} {state:<8} {shown} "
            f"epochs {len(trial.intermediate_values):>3}  {self.status}"
        )
        if "pbt_member" in trial.user_attrs:  # a population member's segment: whose, and from where
            u = trial.user_attrs
            first, last = (u.get("pbt_epochs") or [0, 0])[:2]
            # An exploit, or a failed segment's replacement, copies a donor member's segment.
            came = f" from member {u['pbt_donor']} (#{u.get('pbt_parent')})" if u.get("pbt_donor") is not None else ""
            line += f"  member {u['pbt_member']} epochs {first}-{last - 1} {u.get('pbt_action')}{came}"
        reason = trial.user_attrs.get("reason") or ""
        # Why a trial failed, or ended early other than by the pruner's rule (diverged, timed out).
        if trial.state.name == "FAIL" or (trial.state.name == "PRUNED" and reason and not reason.startswith("pruned by")):
            line += f"  ({reason[:120]})" if reason else ""
        self._write(line, final=True)

    def note(self, text: str) -> None:
        self.say(text)

    def warn(self, text: str) -> None:
        """Shown even when quiet: something was lost or damaged (a checkpoint that cannot be read)."""
        if self.quiet:
            self.out.write(text + "\n")
            self.out.flush()
        else:
            self._write(text, final=True)

    def close(self) -> None:
        if self.tty and not self.quiet:
            self.out.write("\n")
            self.out.flush()
