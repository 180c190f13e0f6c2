"""The search a study gets when it names none (issue 42): a time budget that turns what pruning
saves into more trials, priors and a sound first configuration, the default pruner."""

from __future__ import annotations

import math
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


@pytest.mark.parametrize("seconds,shown", [
    (4.2e-05, "0s"), (0.0004, "0s"), (0.004, "0s"), (0.05, "0.05s"), (3.837, "3.84s"), (12.5, "12.5s"),
    (59.97, "1m"), (90, "1m30s"), (3600, "1h"),
])
def test_time_left_reads_as_a_person_writes_it_down_to_the_last_millisecond(seconds, shown) -> None:
    # The status line's "| 3.84s left" near the end of a time budget read "| 4.2e-05s left".
    from hpo.spec.schema import duration
    assert duration(seconds) == shown


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
    print(result.stderr[:2000])
    assert lines and all(re.search(r"\| [0-9.hms]+ left", line) for line in lines)  # the status line counts down
    assert "/" not in lines[0].split("]")[0]  # no trial count to show: [12], not [12/1000000]
    assert "Stopped: timeout of 4 s reached" in result.stderr  # the time ended it, not a count
    trials = optuna.load_study(study_name="small", storage=storage_url).trials
    assert sum(t.state == TrialState.COMPLETE for t in trials) >= 2


# ---- priors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry,said", [
    ({"type": "float", "low": 1e-4, "high": 1e-1, "log": True, "prior": 0.5}, "space.lr.prior: 0.5 is outside the range"),
    ({"type": "float", "low": 1e-4, "high": 1e-1, "prior": "fast"}, "space.lr.prior: must be a number, not text"),
    ({"type": "int", "low": 8, "high": 64, "prior": 12.5}, "space.lr.prior: must be an integer, not a number"),
    ({"choices": ["adam", "sgd"], "prior": "adamw"}, "space.lr.prior: 'adamw' is not one of the choices (adam, sgd)"),
    ({"type": "float", "low": 1e-4, "high": 1e-1, "prior": {"value": 1e-3, "confidence": "sure"}},
     "space.lr.prior.confidence: unknown value 'sure' (expected one of: low, medium, high)"),
    ({"type": "float", "low": 1e-4, "high": 1e-1, "prior": {"confidence": "high"}}, "space.lr.prior.value: is required"),
])
def test_a_prior_outside_its_parameter_or_of_the_wrong_type_is_one_line(write_spec, runner, entry, said) -> None:
    spec = {"name": "p", "train": "x.py:train", "metric": "score", "direction": "maximize", "space": {"lr": entry}}
    result = invoke(runner, "validate", write_spec(spec))
    assert result.exit_code == 1 and said in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_the_first_trial_of_a_study_without_priors_is_hpos_built_in_configuration(write_spec, runner,
                                                                                  storage_url) -> None:
    spec = small_spec(space={"lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
                             "width": {"type": "int", "low": 16, "high": 512, "log": True},
                             "depth": {"type": "int", "low": 1, "high": 4},
                             "dropout": {"type": "float", "low": 0.0, "high": 0.5},
                             "optimizer": ["sgd", "adam", "adamw"], "batch_size": [16, 32, 64, 128],
                             "scheduler": ["none", "cosine"], "weight_decay": {"low": 1e-6, "high": 1e-2, "log": True}},
                      budget={"n_trials": 2, "epochs": 1})
    assert invoke(runner, "run", write_spec(spec), "--storage", storage_url).exit_code == 0
    first = optuna.load_study(study_name="small", storage=storage_url).trials[0]
    assert first.params == {"lr": 1e-3, "width": 128, "depth": 2, "dropout": 0.1, "optimizer": "adamw",
                            "batch_size": 64, "scheduler": "cosine", "weight_decay": 1e-4}


def test_a_prior_the_user_gives_is_the_first_trial_and_prior_null_or_priors_false_turn_them_off(
        write_spec, runner, storage_url) -> None:
    space = {"lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True, "prior": 0.02},
             "width": {"type": "int", "low": 16, "high": 512, "log": True, "prior": None}}
    assert invoke(runner, "run", write_spec(small_spec(space=space, budget={"n_trials": 1, "epochs": 1})),
                  "--storage", storage_url).exit_code == 0
    first = optuna.load_study(study_name="small", storage=storage_url).trials[0]
    assert first.params["lr"] == 0.02 and first.params["width"] != 128  # prior: null: no built-in belief
    off = small_spec(name="off", sampler={"name": "tpe", "priors": False}, budget={"n_trials": 1, "epochs": 1},
                     space={"lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True, "prior": 0.02}})
    assert invoke(runner, "run", write_spec(off), "--storage", storage_url).exit_code == 0
    assert optuna.load_study(study_name="off", storage=storage_url).trials[0].params["lr"] != 0.02


# The score peaks at lr = 0.05 and falls by one for every tenfold away from it.
PEAK = '''
import math

def train(trial):
    trial.report(0, score=-abs(math.log10(trial.params["lr"]) - math.log10(0.05)))
'''


@pytest.mark.parametrize("confidence", ["medium", "high"])
def test_a_wrong_prior_still_explores_and_the_search_finds_what_it_hides(write_spec, runner, storage_url,
                                                                         tmp_path, confidence) -> None:
    """A confident prior far from the peak (lr 1e-4, 2.7 decades away): the first trial takes it,
    but the search leaves it; followed blindly, every trial would stay within a few tenths of a
    decade of it."""
    (tmp_path / "peak.py").write_text(PEAK)
    spec = {"name": "peak", "train": "peak.py:train", "metric": "score", "direction": "maximize", "seed": 5,
            "space": {"lr": {"type": "float", "low": 1e-5, "high": 1.0, "log": True,
                             "prior": {"value": 1e-4, "confidence": confidence}}},
            "pruner": {"name": "none"}, "budget": {"n_trials": 40, "epochs": 1}}
    assert invoke(runner, "run", write_spec(spec), "--storage", storage_url).exit_code == 0
    trials = optuna.load_study(study_name="peak", storage=storage_url).trials
    assert trials[0].params["lr"] == 1e-4
    near = [t for t in trials[20:] if abs(math.log10(t.params["lr"]) + 4) < 0.5]
    assert len(near) <= 5, [round(math.log10(t.params["lr"]), 2) for t in trials]  # the prior was let go
    assert max(t.value for t in trials) > -0.25  # within a quarter of a decade of the peak


def test_a_study_made_under_an_earlier_default_pruner_resumes_with_it(write_spec, runner, storage_url) -> None:
    """A file that names no pruner: the study keeps the pruner it was made with, whatever hpo's
    default is now (a changed default never refuses a resume)."""
    from hpo.search.records import SPEC_ATTR

    doc = small_spec(budget={"n_trials": 2, "epochs": 2})
    doc.pop("pruner")
    spec = write_spec(doc)
    assert invoke(runner, "run", spec, "--storage", storage_url).exit_code == 0
    study = optuna.load_study(study_name="small", storage=storage_url)
    stored = dict(study.user_attrs[SPEC_ATTR])
    earlier = {"name": "hyperband", "max_resource": 2}  # as if an earlier version's default had been this
    study.set_user_attr(SPEC_ATTR, {**stored, "pruner": earlier})
    again = invoke(runner, "run", spec, "--storage", storage_url, "--n-trials", "3")
    assert again.exit_code == 0, again.output
    assert optuna.load_study(study_name="small", storage=storage_url).user_attrs[SPEC_ATTR]["pruner"] == earlier
