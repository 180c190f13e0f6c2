"""Large studies (issue 46): what a worker does per trial does not grow with the study.

A worker's ledger (hpo.storage.ledger) counts what a pass over every trial counts, looking only
at the trials new or unfinished since its last read; the sampler and the pruner read a bounded
history; and a worker's trials at depth 20,000 cost about what they cost at depth 500.
"""

from __future__ import annotations

import math
import random
import statistics
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import env_without_storage


def _check(ledger, study, since: float) -> None:
    from hpo.search.budget import count_budget, ledger_budget, resumed_numbers
    from hpo.search.failures import verdict, verdict_of

    trials = study.get_trials(deepcopy=False)
    ledger.read(since=since)
    assert ledger_budget(ledger, 40) == count_budget(trials, 40)
    assert ledger.resumed == resumed_numbers(trials)
    assert verdict_of(ledger.ended(), ledger.retried, 4) == verdict(trials, since, 4)
    try:
        best = study.best_value
    except ValueError:
        best = None
    assert ledger.best_value() == best


@pytest.mark.parametrize("backend_url", ["sqlite", "postgresql", "redis"], indirect=True)
def test_a_workers_ledger_counts_what_a_pass_over_every_trial_counts(backend_url) -> None:
    """Another worker (its own study object) completes, prunes, fails, retries and queues
    trials, some read while running and finished later; after each step this worker's ledger
    agrees with the counts, the verdict and the best value read from every trial."""
    from hpo.storage.backends import open_storage
    from hpo.storage.ledger import ledger_of
    from hpo.storage.retry import queue_retry, requeue

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    since = time.time() - 1
    mine = optuna.create_study(study_name="big", storage=open_storage(backend_url), direction="maximize")
    other = optuna.load_study(study_name="big", storage=open_storage(backend_url))
    ledger = ledger_of(mine)
    rng = random.Random(0)
    running: list[optuna.Trial] = []
    for step in range(60):
        roll = rng.random()
        if roll < 0.35 or not running:
            trial = other.ask()
            trial.suggest_float("x", 0, 1)
            running.append(trial)
        else:
            trial = running.pop(rng.randrange(len(running)))
            state = rng.choice([TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL])
            if state == TrialState.COMPLETE:
                trial.set_constraint("size", rng.choice([-1.0, -1.0, 0.5]))  # some infeasible
                other.tell(trial, rng.random())
            else:
                if state == TrialState.FAIL:
                    trial.set_user_attr("reason", "ValueError: boom")
                other.tell(trial, state=state)
                if state == TrialState.FAIL and roll > 0.9:
                    requeue(other, trial._trial_id, "interrupted (SIGINT) in epoch 1")
                elif state == TrialState.FAIL and roll > 0.8:
                    queue_retry(other, other.trials[trial.number], "hpo retry: again", inherit=False)
        _check(ledger, mine, since)
    assert ledger.count == len(mine.trials) > 30


def test_the_sampler_reads_the_recent_trials_and_the_best_once_the_study_is_large(monkeypatch, tmp_path) -> None:
    """Past RECENT + BEST trials the history is the RECENT most recent and the BEST best older
    complete ones; below it, every trial (sampling unchanged on small studies); TPE samples
    from it through hpo's sampler."""
    from hpo.search.samplers import TrialSeeded
    from hpo.storage import ledger as ledger_module

    monkeypatch.setattr(ledger_module, "RECENT", 20)
    monkeypatch.setattr(ledger_module, "BEST", 5)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", storage=f"sqlite:///{tmp_path / 'hpo.db'}")
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    values = [float(v) for v in range(24)]
    study.add_trials([optuna.trial.create_trial(params={"x": v / 100}, distributions=dist, value=v) for v in values])
    ledger = ledger_module.ledger_of(study)
    assert [t.number for t in ledger.read().history()] == list(range(24))  # 24 < 25: all of them
    study.add_trials([optuna.trial.create_trial(params={"x": 0.5}, distributions=dist, value=100.0 + i)
                      for i in range(40)])
    kept = [t.number for t in ledger.read().history()]
    assert kept == [0, 1, 2, 3, 4, *range(44, 64)]  # the 5 best (lowest) older ones, the 20 most recent

    sampler = TrialSeeded(optuna.samplers.TPESampler(n_startup_trials=5, seed=0), seed=0, bounded=True)
    study.sampler = sampler
    trial = study.ask()
    x = trial.suggest_float("x", 0, 1)
    assert 0 <= x <= 1
    assert [t.number for t in sampler._view(study, trial).get_trials(deepcopy=False)] == \
        [0, 1, 2, 3, 4, *range(45, 65)]  # the trial just asked is the most recent


def _curves(study: optuna.Study, rng: random.Random, n: int, low: float, high: float) -> None:
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    trials = []
    for _ in range(n):
        steps = rng.randint(1, 6)  # some stopped early: they report fewer steps
        curve = {s: (math.nan if rng.random() < 0.05 else rng.uniform(low, high)) for s in range(steps)}
        state = rng.choice([TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED])
        trials.append(optuna.trial.create_trial(params={"x": rng.random()}, distributions=dist, state=state,
                                                value=rng.uniform(low, high) if state == TrialState.COMPLETE else None,
                                                intermediate_values=curve))
    study.add_trials(trials)


def test_a_median_pruner_in_a_large_study_judges_a_trial_against_every_complete_trial(monkeypatch, tmp_path) -> None:
    """Past the sampler's bound the pruner still compares with the whole study, as Optuna's own
    does: a trial better than the study's median at an epoch but worse than the recent trials'
    runs on (the recent trials alone, better than the early ones, pruned it)."""
    from hpo.runtime.pruning import Pruning
    from hpo.storage import ledger as ledger_module

    monkeypatch.setattr(ledger_module, "RECENT", 20)
    monkeypatch.setattr(ledger_module, "BEST", 5)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", storage=f"sqlite:///{tmp_path / 'hpo.db'}",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1))
    rng = random.Random(0)
    _curves(study, rng, 60, 0.1, 0.4)  # the early trials
    _curves(study, rng, 40, 0.8, 0.9)  # the recent ones, better
    trial = study.ask()
    values = {0: 0.5, 1: 0.5}
    frozen = optuna.trial.FrozenTrial(number=trial.number, state=TrialState.RUNNING, value=None,
                                      datetime_start=trial.datetime_start, datetime_complete=None, params={},
                                      distributions={}, user_attrs={}, system_attrs={}, intermediate_values=values,
                                      trial_id=trial._trial_id)
    assert not study.pruner.prune(study, frozen)  # Optuna, over every trial: above the median
    assert not Pruning(trial, "maximize").should_prune(values)


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_hpo_prunes_as_optunas_percentile_pruners_do_over_the_whole_study(direction, tmp_path) -> None:
    """hpo's percentile decision from the ledger agrees with Optuna's PercentilePruner and
    MedianPruner over the whole study, for their settings, nan values and trials that stopped
    early, on many trials as the study grows."""
    from hpo.runtime.pruning import percentile_prunes
    from hpo.storage.ledger import Ledger

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruners = [optuna.pruners.MedianPruner(), optuna.pruners.MedianPruner(n_startup_trials=30, n_warmup_steps=2),
               optuna.pruners.PercentilePruner(25.0, n_startup_trials=0, interval_steps=2),
               optuna.pruners.PercentilePruner(80.0, n_warmup_steps=1, n_min_trials=40)]
    study = optuna.create_study(direction=direction, storage=f"sqlite:///{tmp_path / 'hpo.db'}")
    ledger = Ledger(study)
    rng = random.Random(1)
    agreed = pruned = 0
    for _ in range(8):
        _curves(study, rng, 10, 0.0, 1.0)
        ledger.read()
        for _ in range(40):
            steps = rng.randint(1, 6)
            values = {s: (math.nan if rng.random() < 0.05 else rng.uniform(0.0, 1.0)) for s in range(steps)}
            frozen = optuna.trial.FrozenTrial(number=10_000, state=TrialState.RUNNING, value=None,
                                              datetime_start=None, datetime_complete=None, params={},
                                              distributions={}, user_attrs={}, system_attrs={},
                                              intermediate_values=values, trial_id=10_000)
            for pruner in pruners:
                theirs = pruner.prune(study, frozen)
                assert percentile_prunes(pruner, ledger, frozen, direction == "maximize") == theirs, (pruner, values)
                agreed += 1
                pruned += theirs
    assert agreed == 8 * 40 * 4 and 0 < pruned < agreed  # both decisions were tried


@pytest.mark.slow
def test_a_workers_trials_at_depth_20000_cost_about_what_they_cost_at_depth_1000(tmp_path) -> None:
    """`hpo worker` on a fast `train`: the median time between its trial starts at depth 20,000
    within 1.5x of at depth 1,000."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import scale
    finally:
        sys.path.pop(0)
    gaps = {}
    for size in (1000, 20000):
        folder = tmp_path / str(size)
        folder.mkdir()
        url = f"sqlite:///{folder / 'big.db'}"
        scale.seed_study(url, folder)
        scale.grow(url, size)
        env = dict(env_without_storage(), HPO_SLOTS_DIR=str(tmp_path / "slots"))
        runs = [scale.per_trial(url, folder, 40, env=env)[1] for _ in range(2)]
        gaps[size] = statistics.median(runs)
    assert gaps[20000] <= 1.5 * gaps[1000], gaps



def test_a_second_run_in_one_process_counts_only_its_own_failures(tmp_path) -> None:
    """hpo.run() twice in a notebook: the second run's failure verdict starts from its own start."""
    from hpo.search.failures import verdict_of
    from hpo.storage.ledger import ledger_of

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'hpo.db'}")
    first = time.time() - 1
    for _ in range(3):
        trial = study.ask()
        trial.set_user_attr("reason", "ValueError: boom")
        study.tell(trial, state=TrialState.FAIL)
    ledger = ledger_of(study).read(since=first)
    assert verdict_of(ledger.ended(), ledger.retried, 10) is not None  # three alike: the first run stops
    second = time.time() + 1
    ledger = ledger_of(study).read(since=second)
    assert ledger.ended() == [] and verdict_of(ledger.ended(), ledger.retried, 10) is None
