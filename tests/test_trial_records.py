"""What a trial did, and getting it back (issue 27): seeded user code that repeats and resumes
its random streams, per-trial logs, `hpo logs` and `hpo show`, the best model back in Python.

User code lives in a package created outside the repository and runs through the real CLI in
fresh processes (a second run in the same process would share torch's state)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from hpo.cli import cli
from tests.conftest import (
    env_without_storage,
    invoke,
    need_module,
    user_package,
    wait_for,
)

# Draws from Python's random, NumPy and torch, and from a DataLoader that shuffles with 0 or 2
# loader processes (each item carries a draw made in the process that loaded it). MODE=die ends
# the process under trial 0 once, right after its checkpoint of epoch 1.
RANDOMNESS = '''
import os, random
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


class Noise(Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        return torch.tensor(float(i)), torch.rand(())


def draws(loader_workers):
    loader = DataLoader(Noise(), batch_size=4, shuffle=True, num_workers=loader_workers)
    index, noise = next(iter(loader))
    return float(index[0]), float(noise[0])


def train(trial):
    for epoch in range(trial.start_epoch, trial.epochs):
        i0, n0 = draws(0)
        i2, n2 = draws(2)
        values = dict(py=random.random(), np=float(np.random.rand()), torch=float(torch.rand(())),
                      index0=i0, noise0=n0, index2=i2, noise2=n2)
        trial.report(epoch, score=sum(values.values()) * trial.params["scale"], **values)
        trial.save_checkpoint({"epoch": epoch})
        marker = os.environ.get("DIE_MARKER")
        if marker and trial.first_number == 0 and epoch == 1 and not os.path.exists(marker):
            open(marker, "w").close()
            print(f"trial {trial.number} ends its process", flush=True)
            os._exit(3)
'''

NAMES = ("py", "np", "torch", "index0", "noise0", "index2", "noise2")


def _spec(tmp_path: Path) -> Path:
    spec = {"name": "draws", "train": "drawpkg.code:train", "metric": "score", "direction": "maximize",
            "seed": 7, "space": {"scale": {"type": "float", "low": 0.5, "high": 2.0}},
            "pruner": {"name": "none"}, "budget": {"n_trials": 3, "epochs": 4}}  # every trial runs its 4 epochs
    path = tmp_path / "draws.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _run(spec: Path, db: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hpo", "run", str(spec), "--storage", f"sqlite:///{db}",
                           "--workers", "1", "--checkpoint-interval", "0"],
                          cwd=spec.parent, env={**env_without_storage(), **(env or {})}, capture_output=True,
                          text=True, timeout=300)


def _curves(db: Path) -> dict[int, tuple[dict[str, list[float]], float]]:
    """Each trial's first number -> its drawn curves and its value."""
    study = optuna.load_study(study_name="draws", storage=f"sqlite:///{db}")
    out = {}
    for t in study.get_trials(states=[optuna.trial.TrialState.COMPLETE]):
        first = t.system_attrs.get("retry_history", [t.number])[0] if t.system_attrs.get("retry_history") else t.number
        out[first] = ({name: t.user_attrs[name] for name in NAMES}, t.value)
    return out


@pytest.mark.slow
def test_user_code_repeats_its_draws_and_a_resumed_trial_continues_them(tmp_path, monkeypatch):
    """One worker, the same seed: two fresh runs draw the same values from random, NumPy, torch
    and a DataLoader with 0 and 2 loader processes; a trial whose process died after epoch 1
    resumes from its checkpoint and draws what the uninterrupted trial drew."""
    user_package(tmp_path, monkeypatch, "drawpkg", {"code": RANDOMNESS})
    spec = _spec(tmp_path)
    first, second, crashed = tmp_path / "a.db", tmp_path / "b.db", tmp_path / "c.db"
    for db in (first, second):
        done = _run(spec, db)
        assert done.returncode == 0, done.stderr
    runs = _curves(first), _curves(second)
    assert len(runs[0]) == 3
    assert runs[0] == runs[1]
    values = [v for curves, _ in runs[0].values() for name in ("py", "np", "torch") for v in curves[name]]
    assert len(set(values)) == len(values)  # every draw differs: epochs and trials have streams of their own

    died = _run(spec, crashed, {"DIE_MARKER": str(tmp_path / "died")})
    assert died.returncode == 3, died.stderr
    # What the dead process's trial printed is still there (its live log, never uploaded).
    logs = subprocess.run([sys.executable, "-m", "hpo", "logs", "draws", "0", "--storage", f"sqlite:///{crashed}"],
                          cwd=tmp_path, env=env_without_storage(), capture_output=True, text=True, timeout=120)
    assert logs.stdout == "trial 0 ends its process\n", logs.stderr
    resumed = _run(spec, crashed)
    assert resumed.returncode == 0, resumed.stderr
    assert "resum" in resumed.stderr
    # Trial 0 came back as a retry (the later trials' numbers, and so their draws, moved on).
    assert _curves(crashed)[0] == runs[0][0]


# A training function that talks: to stdout, to stderr, through `warnings`, and (for large
# learning rates) fails. WAIT_FOR (a file) holds trial 0 at its first epoch until it exists.
TALKER = '''
import os, sys, time, warnings


def train(trial):
    print(f"hello from trial {trial.number} lr={trial.params['lr']}")
    for epoch in range(trial.start_epoch, trial.epochs):
        print(f"epoch {epoch} of trial {trial.number}", file=sys.stderr)
        marker = os.environ.get("WAIT_FOR")
        if marker and trial.number == 0:
            print("waiting", flush=True)
            while not os.path.exists(marker):
                time.sleep(0.05)
        if trial.params["lr"] > 0.5:
            warnings.warn("that learning rate is large")
            raise ValueError(f"lr {trial.params['lr']} is too large")
        trial.report(epoch, score=trial.params["lr"] * (epoch + 1))
'''


def _talker_spec(tmp_path: Path, n_trials: int = 4) -> Path:
    spec = {"name": "talk", "train": "talkpkg.code:train", "metric": "score", "direction": "maximize",
            "space": {"lr": [0.1, 0.9, 0.2, 0.3]}, "sampler": {"name": "grid"},
            "budget": {"n_trials": n_trials, "epochs": 2, "max_failures": 10}}
    path = tmp_path / "talk.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_each_trial_keeps_what_it_printed_and_hpo_show_tells_it_whole(tmp_path, monkeypatch, runner):
    from optuna.artifacts import get_all_artifact_meta

    user_package(tmp_path, monkeypatch, "talkpkg", {"code": TALKER})
    spec = _talker_spec(tmp_path)
    result = invoke(runner, "run", spec)
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="talk", storage=f"sqlite:///{tmp_path / 'hpo.db'}")
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 1 and failed[0].params["lr"] == 0.9
    for t in study.trials:
        names = [m.filename for m in get_all_artifact_meta(t, storage=study._storage)]
        assert names.count("log.txt") == 1, (t.number, names)
    assert not list((tmp_path / "hpo-artifacts").glob("*.log"))  # live logs are gone once uploaded

    bad = failed[0].number
    log = invoke(runner, "logs", "talk", str(bad)).output
    assert f"hello from trial {bad} lr=0.9" in log
    assert f"epoch 0 of trial {bad}" in log
    assert "UserWarning: that learning rate is large" in log
    assert "ValueError: lr 0.9 is too large" in log
    assert all(f"trial {n} " not in log for n in range(5) if n != bad)  # only this trial's lines

    shown = invoke(runner, "show", "talk", str(bad)).output
    assert f"Trial {bad} of study talk: FAIL" in shown
    assert "Reason: ValueError: lr 0.9 is too large" in shown
    where, full = shown.index("Where in your code"), shown.index("Traceback")
    assert where < full and "talkpkg/code.py" in shown[where:full]  # the user's frames first
    assert shown.index("Log") > full and "hello from trial" in shown.split("\nLog")[-1]

    good = next(t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.params["lr"] == 0.3)
    shown = invoke(runner, "show", "talk", str(good.number)).output
    assert "Curves (per epoch)" in shown and "0.6" in shown  # score 0.3 * 2 at epoch 1
    assert "lr  0.3" in shown
    # The log is the trial's artifact: optuna-dashboard lists it and serves it.
    from tests.test_dashboard import Dashboard

    dash = Dashboard(f"sqlite:///{tmp_path / 'hpo.db'}", tmp_path)
    try:
        sid = dash.get("/api/studies")["study_summaries"][0]["study_id"]
        shown = next(t for t in dash.get(f"/api/studies/{sid}")["trials"] if t["number"] == bad)
        meta = next(a for a in shown["artifacts"] if a["filename"] == "log.txt")
        assert "ValueError: lr 0.9 is too large" in dash.text(f"/artifacts/{sid}/{shown['trial_id']}/"
                                                             f"{meta['artifact_id']}")
    finally:
        dash.close()
    missing = runner.invoke(cli, ["show", "talk", "99"])  # 4 results and the failed trial: 0-4
    assert missing.exit_code == 1 and "Error: study talk has no trial 99 (trials 0-4)" in missing.output


@pytest.mark.slow
def test_workers_label_their_lines_and_logs_follow_a_running_trial(tmp_path, monkeypatch):
    """Two local workers: every line a trial prints on the terminal says its number; `hpo logs
    --follow` prints a running trial's output as it comes and ends with the trial."""
    root = user_package(tmp_path, monkeypatch, "talkpkg", {"code": TALKER})
    spec, marker = _talker_spec(tmp_path), tmp_path / "go"
    env = {**env_without_storage(), "WAIT_FOR": str(marker), "PYTHONPATH": str(root)}
    run = subprocess.Popen([sys.executable, "-m", "hpo", "run", str(spec), "--workers", "2"], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        db = f"sqlite:///{tmp_path / 'hpo.db'}"
        wait_for(lambda: (tmp_path / "hpo.db").exists() and any(
            "waiting" in p.read_text() for p in (tmp_path / "hpo-artifacts").glob("*.log")), "trial 0 to wait")
        follow = subprocess.Popen([sys.executable, "-m", "hpo", "logs", "talk", "0", "--follow", "--storage", db],
                                  cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)
        assert follow.stdout is not None
        first = follow.stdout.readline()
        assert first.startswith("hello from trial 0")  # the live log, while trial 0 runs
        marker.touch()
        rest = follow.stdout.read()
        assert follow.wait(timeout=120) == 0
        out, err = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            import os
            import signal

            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 0, err
    assert "epoch 1 of trial 0" in rest  # followed to the trial's end
    printed = [line for line in (out + err).splitlines() if "of trial" in line or "hello from" in line]
    assert printed and all(line.startswith("[trial ") for line in printed)
    for line in printed:
        number = line.split("]")[0].removeprefix("[trial ")
        assert f"trial {number}" in line.split("] ", 1)[1]


# A model factory with a parameter of the user's own (`hidden`) beside hpo's (`lr`, `batch_size`).
FACTORY = '''
import numpy as np
from torch import nn


def build(params, input_shape, n_outputs):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), params["hidden"]), nn.ReLU(),
                         nn.Linear(params["hidden"], n_outputs))


def train(trial):
    import torch
    model = build(trial.params, (64,), 10)
    for epoch in range(trial.start_epoch, trial.epochs):
        trial.report(epoch, score=trial.params["hidden"] + epoch)
        trial.save_checkpoint({"model": model.state_dict(), "epoch": epoch})
'''

# In a fresh process: the best model from the study and from the exported file, scored on the
# study's test split (raw inputs), against the test score hpo recorded.
CHECK = '''
import json, sys
import torch
import hpo
from hpo.data.folds import load_raw
from hpo.spec.loading import spec_from_mapping

url, out = sys.argv[1], sys.argv[2]
model = hpo.load_best("fac", storage=url)
export = torch.load(out, weights_only=True)
spec = spec_from_mapping(export["spec"], "export")
raw = load_raw(spec.builtin_data, spec.seed)
x, y = torch.as_tensor(raw.x_test), torch.as_tensor(raw.y_test)
with torch.no_grad():
    accuracy = [(m(x).argmax(1) == y).double().mean().item() for m in (model, hpo.load_best(out))]
print(json.dumps({"kind": type(model).__name__, "training": model.training, "accuracy": accuracy,
                  "recorded": export["test"]["accuracy"], "params": export["params"], "values": export["values"]}))
'''


@pytest.mark.parametrize("folds", [0, 3], ids=["holdout", "cv3"])
def test_the_best_model_comes_back_in_a_fresh_process_with_its_exact_test_score(folds, tmp_path, monkeypatch,
                                                                                  runner):
    user_package(tmp_path, monkeypatch, "facpkg", {"models": FACTORY})
    data: dict[str, object] = {"dataset": "digits"}
    if folds:
        data["cv_folds"] = folds
    spec = {"name": "fac", "model": "facpkg.models:build", "metric": "val_accuracy", "seed": 1, "data": data,
            "space": {"hidden": [16, 48], "lr": {"type": "float", "low": 3e-3, "high": 3e-2, "log": True},
                      "batch_size": 64},
            "budget": {"n_trials": 3, "epochs": 3}}
    path = tmp_path / "fac.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert invoke(runner, "run", path).exit_code == 0
    out = tmp_path / "exported" / "best.pt"
    said = invoke(runner, "export", "fac", "--out", out)
    assert said.exit_code == 0 and f"Wrote {out}: the model of trial" in said.output
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    done = subprocess.run([sys.executable, "-c", CHECK, url, str(out)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path / "exported", env={**env_without_storage(), "PYTHONPATH": str(tmp_path / "site")})
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["kind"] == "Predictor" and got["training"] is False
    assert got["accuracy"] == [got["recorded"], got["recorded"]]  # exactly the score hpo reported
    study = optuna.load_study(study_name="fac", storage=url)
    assert got["params"]["hidden"] == study.best_params["hidden"]  # the user's own parameter is there
    assert got["params"]["batch_size"] == 64  # fixed values too, which Optuna's params leave out
    assert got["values"] == {"val_accuracy": study.best_value}


def test_load_best_of_a_train_study_gives_the_final_state_and_every_parameter(tmp_path, monkeypatch, runner):
    import hpo

    user_package(tmp_path, monkeypatch, "facpkg", {"models": FACTORY})
    spec = {"name": "own", "train": "facpkg.models:train", "metric": "score", "direction": "maximize",
            "space": {"hidden": [4, 8], "fixed": 7}, "budget": {"n_trials": 2, "epochs": 2}}
    path = tmp_path / "own.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert invoke(runner, "run", path).exit_code == 0
    best = hpo.load_best("own", storage=f"sqlite:///{tmp_path / 'hpo.db'}")
    assert isinstance(best, hpo.BestState)
    assert best.params == {"hidden": 8, "fixed": 7} and best.values == {"score": 9.0}
    assert best.state["epoch"] == 1 and best.state["model"]["3.weight"].shape == (10, 8)
    assert invoke(runner, "export", "own", "--out", tmp_path / "own.pt").exit_code == 0
    assert hpo.load_best(str(tmp_path / "own.pt")).params == best.params
    wrong = runner.invoke(cli, ["export", "own", "--out", str(tmp_path / "x.pt"), "--trial", "5"])
    assert wrong.exit_code == 1 and "trial 5 is not the best trial of study own" in wrong.output
    assert not (tmp_path / "x.pt").exists()


def test_each_trials_curves_are_written_as_tensorboard_event_files(write_spec, runner, storage_url,
                                                                   tmp_path) -> None:
    """`execution: {tensorboard: true}`: every reported metric of every trial, read back with
    TensorBoard's own reader, equals what the study holds."""
    need_module("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.conftest import small_spec

    spec = small_spec(execution={"tensorboard": True}, budget={"n_trials": 3, "epochs": 3})
    assert invoke(runner, "run", write_spec(spec), "--storage", storage_url).exit_code == 0
    study = optuna.load_study(study_name="small", storage=storage_url)
    base = tmp_path / "hpo-artifacts" / "tensorboard" / "small"
    assert sorted(p.name for p in base.iterdir()) == [f"trial-{t.number}" for t in study.trials]
    for t in study.trials:
        events = EventAccumulator(str(base / f"trial-{t.number}"))
        events.Reload()
        assert {"val_accuracy", "val_loss", "train_loss", "epoch_seconds"} <= set(events.Tags()["scalars"])
        got = {e.step: e.value for e in events.Scalars("val_accuracy")}
        assert got == pytest.approx(t.intermediate_values, rel=1e-6)  # float32 in the event file
        losses = [e.value for e in events.Scalars("train_loss")]
        assert losses == pytest.approx(t.user_attrs["train_loss"], rel=1e-5)


def test_tensorboard_without_its_package_is_one_line_before_anything_runs(write_spec, runner, storage_url,
                                                                          tmp_path, monkeypatch) -> None:
    import importlib.util

    from tests.conftest import small_spec

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    path = write_spec(small_spec(execution={"tensorboard": True}))
    result = runner.invoke(cli, ["run", str(path), "--storage", storage_url])
    assert result.exit_code == 1
    assert result.output.strip() == (f"Error: {path}: execution.tensorboard: needs the tensorboard package: pip "
                                     "install 'hpo[tensorboard]' (or pip install tensorboard)")
    assert not (tmp_path / "hpo.db").exists()
