"""What a trial's draws depend on: the study seed and the trial's place among the trials the
sampler proposed, never the process that asked (hpo.search.samplers, hpo.search.priors)."""

from __future__ import annotations

import numpy as np
import optuna
from optuna.trial import FrozenTrial

from hpo.storage.retry import queued_before


def trial_sampler_seed(seed: int, index: int) -> list[int]:
    """The entropy of the proposals of a study's `index`-th sampled trial."""
    return [int(x) for x in np.random.SeedSequence([seed, index]).generate_state(2)]


def sampled_index(study: optuna.Study, trial: FrozenTrial) -> int:
    """How many trials before `trial` drew from the sampler: its place among the sampled ones.
    Unique across every process of a study, as trial numbers are (worker indices and process
    start-ups are not), and unchanged by the retries and queued configurations an interruption or
    the user adds, which carry their parameters with them (hpo marks each: one read of the study,
    not of every trial)."""
    return trial.number - queued_before(study, trial.number)
