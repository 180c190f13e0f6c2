"""The search a study gets when it names none (issue 42): a time budget that turns what pruning
saves into more trials, priors and a sound first configuration, the default pruner."""

from __future__ import annotations

import re

import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import invoke, small_spec


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("10m", 600), ("1h30m", 5400), ("1.5h", 5400), (45, 45),
                                          ("2m 30s", 150)])
def test_a_time_budget_is_seconds_or_a_duration_and_needs_no_trial_count(write_spec, text, seconds) -> None:
    from hpo.spec.loading import load_spec

    spec = load_spec(write_spec(small_spec(budget={"time": text, "epochs": 3})))
    assert spec.budget.timeout == seconds and spec.budget.n_trials is None
    assert spec.budget.describe().startswith("trials for ")
    both = load_spec(write_spec(small_spec(budget={"time": text, "n_trials": 7})))
    assert both.budget.n_trials == 7  # whichever comes first


@pytest.mark.parametrize("budget,said", [
    ({"time": "ten minutes"}, "budget.time: must be seconds or a duration such as 90s, 10m or 1h30m, not 'ten minutes'"),
    ({"time": "5x"}, "budget.time: must be seconds or a duration"),
    ({"time": -3}, "budget.time: must be > 0"),
    ({"time": "10m", "timeout": 600}, "budget.time: give time or timeout (its older name), not both"),
])
def test_a_bad_time_budget_is_one_line(write_spec, runner, tmp_path, budget, said) -> None:
    result = invoke(runner, "validate", write_spec(small_spec(budget=budget)))
    assert result.exit_code == 1 and said in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_time_budget_runs_trials_until_the_time_is_spent_and_says_what_is_left(write_spec, runner,
                                                                                 storage_url) -> None:
    spec = write_spec(small_spec(budget={"time": "4s", "epochs": 2}, pruner={"name": "none"}))
    assert "trials for 4s x 2 epochs" in invoke(runner, "validate", spec).output
    result = invoke(runner, "run", spec, "--storage", storage_url)
    assert result.exit_code == 0, result.output
    assert "Study small: trials for 4s x 2 epochs" in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("trial ")]
    assert lines and all(re.search(r"\| [0-9.hms]+ left", line) for line in lines)  # the status line counts down
    assert "/" not in lines[0].split("]")[0]  # no trial count to show: [12], not [12/1000000]
    assert "Stopped: timeout of 4 s reached" in result.stderr  # the time ended it, not a count
    trials = optuna.load_study(study_name="small", storage=storage_url).trials
    assert sum(t.state == TrialState.COMPLETE for t in trials) >= 2
