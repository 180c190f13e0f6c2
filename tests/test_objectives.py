"""Several objectives, constraints and warm starts: the Pareto front with pruning, infeasible
trials kept off it, known configurations run first and once, and every bad input in one line."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hpo.cli import cli
from hpo.runtime.pruning import dominates
from tests.conftest import env_without_storage, invoke, small_spec

ENQUEUED = [{"lr": 0.01, "width": 16, "depth": 1, "batch_size": 32}, {"lr": 0.003, "width": 40, "depth": 2}]

# val_accuracy against n_params on 12 features / 3 classes: widths 8..64 and 1-2 layers give
# 131 to 5,187 parameters; the constraint makes the larger half infeasible, whatever they score.
PARETO = small_spec(
    name="pareto",
    metric=["val_accuracy", {"name": "n_params", "direction": "minimize"}],
    constraints=[{"metric": "n_params", "max": 1000}],
    enqueue=ENQUEUED,
    pruner={"name": "median", "n_startup_trials": 2, "n_warmup_steps": 1},
    budget={"n_trials": 12, "epochs": 4},
)


def n_params(t: optuna.trial.FrozenTrial) -> float:
    return float(t.user_attrs["n_params"])


@pytest.fixture
def pareto(write_spec, runner, storage_url) -> optuna.Study:
    result = invoke(runner, "run", write_spec(PARETO), "--storage", storage_url)
    assert result.exit_code == 0, result.output
    return optuna.load_study(study_name="pareto", storage=storage_url)


def test_a_pareto_study_prunes_keeps_infeasible_trials_off_the_front_and_scores_it(pareto, runner,
                                                                                  storage_url, tmp_path) -> None:
    trials = pareto.trials
    assert [d.name for d in pareto.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert pareto.metric_names == ["val_accuracy", "n_params"]
    assert len(trials) == 12
    # Pruning works with two objectives: trials stopped early, their curve recorded.
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned and all(0 < len(t.intermediate_values) < 4 for t in pruned)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert all(t.values[1] == n_params(t) for t in done)
    infeasible = [t for t in done if n_params(t) > 1000]
    feasible = [t for t in done if n_params(t) <= 1000]
    assert infeasible and feasible
    assert all(t.constraints == {"n_params<=1000": n_params(t) - 1000} for t in done)
    front = pareto.best_trials
    assert {t.number for t in front}.isdisjoint(t.number for t in infeasible)
    # The front is exactly the feasible trials no other feasible trial dominates.
    expected = {t.number for t in feasible
                if not any(dominates(u.values, t.values, pareto.directions) for u in feasible)}
    assert {t.number for t in front} == expected
    # `hpo trials` says which trials broke a constraint.
    listed = json.loads(invoke(runner, "trials", "pareto", "--storage", storage_url, "--format", "json").output)
    assert {r["number"] for r in listed if r["feasible"] is False} == {t.number for t in infeasible}
    assert "feasible" in invoke(runner, "trials", "pareto", "--storage", storage_url).output.splitlines()[0]
    # `hpo best`: the front, every trial of it scored once on the test split.
    shown = json.loads(invoke(runner, "best", "pareto", "--storage", storage_url, "--format", "json").output)
    assert [o["name"] for o in shown["objectives"]] == ["val_accuracy", "n_params"]
    assert {t["trial"] for t in shown["front"]} == expected
    assert all(t["test"]["metric"] == "test_accuracy" and 0 <= t["test"]["value"] <= 1 for t in shown["front"])
    text = invoke(runner, "best", "pareto", "--storage", storage_url).output
    assert f"Pareto front: {len(expected)} trials" in text and "test_accuracy" in text
    assert all(f"#{n}" in text for n in expected)
    # `hpo report` draws the front.
    out = tmp_path / "report"
    assert invoke(runner, "report", "pareto", "--storage", storage_url, "--out", out).exit_code == 0
    assert (out / "pareto_front.png").stat().st_size > 10_000
    assert "## Pareto front" in (out / "summary.md").read_text()


def test_enqueued_configurations_run_first_and_once(pareto, write_spec, runner, storage_url) -> None:
    trials = sorted(pareto.trials, key=lambda t: t.number)
    for config, trial in zip(ENQUEUED, trials):
        assert {k: trial.params[k] for k in config} == config
    assert sum(1 for t in trials if all(t.params.get(k) == v for k, v in ENQUEUED[0].items())) == 1
    # A re-run with a larger budget does not queue them again.
    assert invoke(runner, "run", write_spec(PARETO), "--storage", storage_url, "--n-trials", "14").exit_code == 0
    again = optuna.load_study(study_name="pareto", storage=storage_url).trials
    assert len(again) == 14
    assert sum(1 for t in again if "fixed_params" in t.system_attrs) == len(ENQUEUED)


@pytest.mark.slow  # over ~13 s on 2 cores
def test_two_workers_on_postgresql_queue_each_configuration_once(pg_url, write_spec, tmp_path) -> None:
    spec = write_spec(small_spec(name="warm", enqueue=ENQUEUED, budget={"n_trials": 6, "epochs": 3}))
    cmd = [sys.executable, "-m", "hpo", "run", str(spec), "--storage", pg_url, "--workers", "1"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env_without_storage(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    trials = optuna.load_study(study_name="warm", storage=pg_url).trials
    assert len(trials) == 6 and all(t.state.is_finished() for t in trials)
    queued = [t for t in trials if "fixed_params" in t.system_attrs]
    assert sorted(t.number for t in queued) == [0, 1]  # queued once, before any sampled trial
    first_sampled = min(t.datetime_start for t in trials if t.number >= 2)
    assert all(t.datetime_start <= first_sampled for t in queued)
    # Re-run with a larger budget: nothing is queued again.
    again = subprocess.run([*cmd, "--n-trials", "8"], check=False, cwd=tmp_path, env=env_without_storage(), capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    trials = optuna.load_study(study_name="warm", storage=pg_url).trials
    assert len(trials) == 8 and sum(1 for t in trials if "fixed_params" in t.system_attrs) == 2


def test_hpo_enqueue_and_warm_start_from_another_study(pareto, write_spec, runner, storage_url) -> None:
    bad = invoke(runner, "enqueue", "pareto", "lr=5", "--storage", storage_url)
    assert bad.exit_code != 0 and bad.output.strip().splitlines() == [
        "Error: hpo enqueue pareto: enqueue.lr: 5 is outside the range 0.0001..0.1"]
    spent = invoke(runner, "enqueue", "pareto", "lr=0.02", "width=9", "--storage", storage_url)
    assert spent.exit_code == 1 and len(spent.output.strip().splitlines()) == 1, spent.output
    assert spent.output.startswith("Error: study 'pareto' has spent its budget of 12 trials (12 finished, 0 running, "
                                   "0 queued): raise it") and "--past-budget" in spent.output
    assert len(optuna.load_study(study_name="pareto", storage=storage_url).trials) == 12  # nothing queued
    ok = invoke(runner, "enqueue", "pareto", "lr=0.02", "width=9", "--storage", storage_url, "--past-budget")
    assert ok.exit_code == 0 and "Queued trial 12" in ok.output
    assert "not queued again" in invoke(runner, "enqueue", "pareto", "lr=0.02", "width=9",
                                        "--storage", storage_url, "--past-budget").output
    # warm_start: the other study's front, best first, queued ahead of this study's own trials.
    front = sorted(pareto.best_trials, key=lambda t: -t.values[0])
    spec = small_spec(name="follow", warm_start={"study": "pareto", "top": 2}, budget={"n_trials": 4, "epochs": 2})
    assert invoke(runner, "run", write_spec(spec), "--storage", storage_url).exit_code == 0
    follow = sorted(optuna.load_study(study_name="follow", storage=storage_url).trials, key=lambda t: t.number)
    assert [t.params for t in follow[:2]] == [t.params for t in front[:2]]
    missing = invoke(runner, "run", write_spec(dict(spec, name="x", warm_start={"study": "nope"})),
                     "--storage", storage_url)
    assert missing.exit_code != 0 and "warm_start.study: no study named 'nope'" in missing.output
    assert "x" not in optuna.get_all_study_names(storage_url)  # nothing written


def test_the_dashboard_names_every_objective(pareto, storage_url, tmp_path) -> None:
    from tests.test_dashboard import Dashboard

    dash = Dashboard(storage_url, tmp_path)
    try:
        study_id = dash.get("/api/studies")["study_summaries"][0]["study_id"]
        assert dash.get(f"/api/studies/{study_id}")["objective_names"] == ["val_accuracy", "n_params"]
    finally:
        dash.close()


def test_a_train_function_reports_its_own_objectives_and_measures_latency(write_spec, runner, storage_url,
                                                                        tmp_path) -> None:
    code = tmp_path / "outside" / "mytrain.py"
    code.parent.mkdir()
    code.write_text(textwrap.dedent("""
        import torch

        def train(trial):
            torch.manual_seed(trial.seed)
            model = torch.nn.Linear(4, trial.params["width"])
            for epoch in range(trial.start_epoch, trial.epochs):
                trial.report(epoch, score=1.0 - 1.0 / (epoch + 2) - trial.params["width"] / 1000)
            trial.measure(model, torch.randn(2, 4))
    """))
    spec = {"name": "own", "train": str(code) + ":train",
            "metric": [{"name": "score", "direction": "maximize"}, "latency_ms"],
            "constraints": [{"metric": "n_params", "max": 150}], "latency_batch_size": 8,
            "space": {"width": {"low": 2, "high": 60}}, "sampler": "random", "pruner": "none",
            "budget": {"n_trials": 5, "epochs": 3}}
    result = invoke(runner, "run", write_spec(spec), "--storage", storage_url)
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="own", storage=storage_url)
    for t in study.trials:
        assert t.state == TrialState.COMPLETE
        assert t.values[1] == t.user_attrs["latency_ms"] > 0
        assert t.user_attrs["n_params"] == 5 * t.params["width"]
        assert (t.constraints["n_params<=150"] <= 0) == (t.params["width"] <= 30)


BAD = [
    ({"metric": ["val_accuracy", "speed"]}, "metric[1]: unknown objective 'speed'"),
    ({"metric": ["val_accuracy", {"name": "n_params", "direction": "maximize"}]},
     "metric[1].direction: n_params can only be minimized"),
    ({"metric": ["val_accuracy", "n_params"], "prune_on": "n_params"},
     "prune_on: n_params is measured once after training, not reported per epoch"),
    ({"metric": ["val_accuracy", "n_params"], "prune_on": "val_f1"}, "prune_on: unknown metric 'val_f1'"),
    ({"constraints": [{"metric": "latency", "max": 2}]},
     "constraints[0].metric: unknown metric 'latency'; did you mean 'latency_ms'?"),
    ({"constraints": [{"metric": "n_params"}]}, "constraints[0]: needs min or max"),
    ({"enqueue": [{"lr": 5}]}, "enqueue[0].lr: 5 is outside the range 0.0001..0.1"),
    ({"enqueue": [{"batch_size": "big"}]}, "enqueue[0].batch_size: 'big' is not one of the choices [32, 64]"),
    ({"enqueue": [{"width": 9.5}]}, "enqueue[0].width: must be an integer, not a number"),
    ({"enqueue": [{"momentum": 0.9}]}, "enqueue[0].momentum: unknown key"),
    ({"warm_start": {"study": "small"}}, "warm_start.study: names this study itself"),
    ({"metric": ["val_accuracy", "n_params"], "sampler": {"name": "cmaes"}},
     "sampler.name: cmaes optimizes one objective"),
    ({"metric": ["val_accuracy", "n_params"], "pruner": {"name": "hyperband"}},
     "pruner.name: hyperband cannot prune a study with several objectives"),
]


@pytest.mark.parametrize("change, message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_each_bad_input_gets_one_line_naming_its_key(change, message, write_spec, runner, storage_url) -> None:
    path = write_spec(small_spec(**change))
    result = invoke(runner, "run", path, "--storage", storage_url)
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output
    assert not Path(storage_url.removeprefix("sqlite:///")).exists() or not optuna.get_all_study_names(storage_url)


def test_one_objective_as_a_list_is_the_same_study_as_before(write_spec) -> None:
    from hpo.spec.loading import load_spec

    plain = load_spec(write_spec(small_spec(), "a.yaml"))
    listed = load_spec(write_spec(small_spec(metric=["val_accuracy"]), "b.yaml"))
    assert listed == plain and listed.plain and not listed.multi_objective
    assert list(plain.to_dict()) == ["name", "description", "metric", "direction", "seed", "model", "data", "space",
                                     "sampler", "pruner", "budget", "execution"]


def test_a_small_model_is_pruned_only_against_models_no_larger() -> None:
    """Median pruning on val_accuracy in a two-objective study: a small model behind the large
    ones is stopped by the plain median rule, not when judged against models no larger."""
    from hpo._private import trial_id
    from hpo.runtime.pruning import Pruning, comparable

    study = optuna.create_study(directions=["maximize", "minimize"], pruner=optuna.pruners.MedianPruner(
        n_startup_trials=2, n_warmup_steps=0))
    for size, acc in [(5000, 0.95), (6000, 0.96), (7000, 0.97), (400, 0.70)]:
        t = study.ask()
        for step in range(3):
            t.storage.set_trial_intermediate_value(trial_id(t), step, acc - 0.1 * (2 - step))
        t.set_user_attr("n_params", size)
        study.tell(t, [acc, size])
    small = study.ask()
    pruning = Pruning(small, "maximize")
    behind = {0: 0.55, 1: 0.65}  # ahead of the other small model, behind every large one
    assert pruning.should_prune(behind) is True
    assert pruning.should_prune(behind, peers=comparable({"n_params": ("minimize", 500)})) is False
    # The rule's own settings hold among peers: one peer is under its n_startup_trials of 2, so a
    # hopeless small model waits; a larger one with peers enough is stopped.
    assert pruning.should_prune({0: 0.2, 1: 0.3}, peers=comparable({"n_params": ("minimize", 500)})) is False
    assert pruning.should_prune({0: 0.2, 1: 0.3}, peers=comparable({"n_params": ("minimize", 8000)})) is True


def test_a_front_member_is_exported_and_loaded_by_choice(pareto, runner, storage_url, tmp_path) -> None:
    """With several objectives `hpo export` and `hpo.load_best` take a member of the Pareto front;
    without one (or with another trial) they say which trials are on it."""
    import torch

    import hpo
    from hpo.search.summary import front

    members = [t.number for t in front(pareto)]
    unchosen = runner.invoke(cli, ["export", "pareto", "--storage", storage_url, "--out", str(tmp_path / "m.pt")])
    assert unchosen.exit_code == 1
    assert f"choose a trial of its Pareto front ({', '.join(map(str, members))})" in unchosen.output
    off = next(t.number for t in pareto.trials if t.number not in members)
    assert runner.invoke(cli, ["export", "pareto", "--storage", storage_url, "--out", str(tmp_path / "m.pt"),
                               "--trial", str(off)]).exit_code == 1
    last = members[-1]
    assert invoke(runner, "export", "pareto", "--storage", storage_url, "--out", tmp_path / "m.pt",
                  "--trial", last).exit_code == 0
    saved = torch.load(tmp_path / "m.pt", weights_only=True)
    chosen = next(t for t in pareto.trials if t.number == last)
    assert saved["trial"] == last and saved["values"] == {"val_accuracy": chosen.values[0],
                                                          "n_params": chosen.values[1]}
    model = hpo.load_best("pareto", storage=storage_url, trial=last)
    assert sum(p.numel() for p in model.parameters()) == chosen.values[1]
