"""Progress hooks between the runtime and a front end, importable without torch (the CLI's
read-only commands use the same front end)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optuna


class Listener:
    """Progress hooks for a front end (the CLI's progress line); the default does nothing."""

    def trial_started(self, number: int, params: Mapping[str, Any], resumed_epoch: int,
                      first: int | None = None) -> None:
        """`first`: the trial this one retries (its first attempt's number), if it is a retry."""

    def epoch_done(self, number: int, epoch: int, value: float) -> None: ...

    def trial_finished(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None: ...

    def note(self, text: str) -> None:
        """A line worth telling the person (a wait, trials taken back)."""

    def warn(self, text: str) -> None:
        """A line every front end shows, a forked worker's too (a trial taken over by another)."""
        self.note(text)
