"""User code through hpo.Trial: a package created outside the repository, its own nn.Module,
Dataset and DataLoader loop, tuned by `train: module:function`, on real SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import env_without_storage, invoke, small_spec, user_package, wait_for

# The user's package: a digits classifier with its own Dataset, model and loop. `MODE` (an
# environment variable) picks a misbehaviour for the ending tests.
PACKAGE = '''
import json, os, math, time
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from sklearn.datasets import load_digits

import hpo


class Digits(Dataset):
    def __init__(self, part):
        d = load_digits()
        x = torch.tensor(d.data / 16.0, dtype=torch.float32)
        y = torch.tensor(d.target, dtype=torch.int64)
        cut = int(0.8 * len(x))
        self.x, self.y = (x[:cut], y[:cut]) if part == "train" else (x[cut:], y[cut:])

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class Net(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x):
        return self.body(x)


def build(params, input_shape, n_outputs):
    """A model factory for hpo's own loop."""
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), params["hidden"]), nn.ReLU(),
                         nn.Linear(params["hidden"], n_outputs))


def evaluate(model, data):
    model.eval()
    with torch.no_grad():
        out = model(data.x)
        loss = nn.functional.cross_entropy(out, data.y).item()
        acc = (out.argmax(1) == data.y).float().mean().item()
    model.train()
    return acc, loss


def train(trial: hpo.Trial):
    mode = os.environ.get("MODE", "")
    p = trial.params
    torch.manual_seed(trial.seed % 2**31)
    model = Net(p["hidden"]).to(trial.device)
    if p["optimizer"] == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=p["lr"], momentum=p["momentum"])
    else:
        assert "momentum" not in p, "momentum applies to sgd only"
        opt = torch.optim.Adam(model.parameters(), lr=p["lr"])
    state = trial.load_checkpoint()
    if state:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
    train_set, val_set = Digits("train"), Digits("val")
    loader = DataLoader(train_set, batch_size=64, shuffle=True)
    for epoch in range(trial.start_epoch, trial.epochs):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            if mode == "error" and epoch == 1:
                explode(x)
            if mode == "oom" and epoch == 1:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        acc, loss = evaluate(model, val_set)
        if mode == "nan" and epoch == 2:
            acc = float("nan")
        if mode == "killed" and epoch == 1:  # as the kernel's out-of-memory killer would
            os.kill(os.getpid(), 9)
        trial.report(epoch, val_acc=acc, val_loss=loss)
        trial.save_checkpoint({"model": model.state_dict(), "opt": opt.state_dict()})
        if mode == "marker" and epoch == 2:  # epoch 2 is reported and checkpointed: hold here until
            open(os.environ["MARKER"], "a").close()  # the test interrupts or kills this process
            while not os.path.exists(os.environ["MARKER"] + ".never"):
                time.sleep(0.01)


def explode(x):
    raise ValueError(f"bad batch of {len(x)}")


class Blobs(Dataset):
    """Generated data: three Gaussian blobs in 16 dimensions."""

    classes = [0, 1, 2]

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        centers = torch.randn(3, 16, generator=torch.Generator().manual_seed(0)) * 2
        self.y = torch.randint(0, 3, (n,), generator=g)
        self.x = centers[self.y] + torch.randn(n, 16, generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def blobs():
    return {"train": Blobs(1200, 1), "val": Blobs(300, 2), "test": Blobs(300, 3)}


def blob_arrays():
    d = Blobs(1800, 4)
    return d.x.numpy(), d.y.numpy()


def blob_tuple():
    return Blobs(1200, 1), Blobs(300, 2), Blobs(300, 3)


def blob_pair():
    return Blobs(1200, 1), Blobs(300, 2)


def blob_one():
    return Blobs(1800, 4)


class Signal(Dataset):
    """1-D signals of one channel: items of shape (1, 16), as a Conv1d takes them."""

    classes = [0, 1, 2]

    def __init__(self, n, seed):
        self.blobs = Blobs(n, seed)

    def __len__(self):
        return len(self.blobs)

    def __getitem__(self, i):
        x, y = self.blobs[i]
        return x[None], y


def signals():
    return {"train": Signal(1200, 1), "val": Signal(300, 2), "test": Signal(300, 3)}


def conv1d(params, input_shape, n_outputs):
    channels, length = input_shape  # the shape of one item, as the batches bring it
    return nn.Sequential(nn.Conv1d(channels, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * length, n_outputs))


def not_data():
    return 42


def not_a_module(params, input_shape, n_outputs):
    return [input_shape]


def test(trial: hpo.Trial):
    """Scores the best trial once; leaves a line in TEST_LOG so the test can count the calls."""
    state = trial.load_checkpoint()
    model = Net(trial.params["hidden"])
    model.load_state_dict(state["model"])
    acc, loss = evaluate(model, Digits("val"))
    time.sleep(float(os.environ.get("TEST_SLEEP", "0")))  # a long test set: other workers end meanwhile
    with open(os.environ["TEST_LOG"], "a") as f:
        f.write(json.dumps({"number": trial.number, "params": trial.params}) + "\\n")
    return {"test_acc": acc, "test_loss": loss}
'''


@pytest.fixture
def user_pkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`userpkg` in a folder outside the repository, importable through PYTHONPATH as a user's
    package would be (an installed package works the same way)."""
    monkeypatch.setenv("TEST_LOG", str(tmp_path / "test_calls.jsonl"))
    monkeypatch.delenv("MODE", raising=False)
    return user_package(tmp_path, monkeypatch, "userpkg", {"digits": PACKAGE})


def user_spec(**overrides) -> dict:
    spec = {
        "name": "mine",
        "train": "userpkg.digits:train",
        "test": "userpkg.digits:test",
        "metric": "val_acc",
        "direction": "maximize",
        "seed": 1,
        "space": {
            "hidden": {"type": "int", "low": 8, "high": 64, "log": True},
            "optimizer": ["sgd", "adam"],
            "lr": {"type": "float", "low": 1e-3, "high": 0.3, "log": True},
            "momentum": {"type": "float", "low": 0.5, "high": 0.95, "when": {"optimizer": "sgd"}},
        },
        "sampler": {"name": "random"},
        "pruner": {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 1},
        "budget": {"n_trials": 10, "epochs": 5},
    }
    spec.update(overrides)
    return spec


def load(url: str, name: str = "mine") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=url)


def test_a_train_function_study_runs_prunes_and_scores_the_best_once(user_pkg, write_spec, runner, storage_url,
                                                                     tmp_path) -> None:
    result = invoke(runner, "run", write_spec(user_spec()), "--storage", storage_url)
    assert result.exit_code == 0, result.output
    study = load(storage_url)
    trials = study.trials
    states = [t.state for t in trials]
    assert len(trials) == 10 and TrialState.COMPLETE in states and TrialState.PRUNED in states
    for t in trials:
        # Custom parameters, sampled only where they apply.
        assert {"hidden", "optimizer", "lr"} <= set(t.params)
        assert ("momentum" in t.params) == (t.params["optimizer"] == "sgd")
        # The curve of the study's metric, and the other metric kept per epoch.
        epochs = len(t.intermediate_values)
        assert sorted(t.intermediate_values) == list(range(epochs))
        assert len(t.user_attrs["val_loss"]) == epochs and len(t.user_attrs["epoch_seconds"]) == epochs
    for t in trials:
        if t.state == TrialState.PRUNED:
            assert t.user_attrs["reason"].startswith("pruned by the median rule")
    # The test function ran once, on the best trial, with its final state; its score is shown.
    calls = [json.loads(line) for line in (tmp_path / "test_calls.jsonl").read_text().splitlines()]
    assert len(calls) == 1 and calls[0]["number"] == study.best_trial.number
    assert calls[0]["params"] == study.best_trial.params
    test = study.user_attrs["test"]
    assert test["metric"] == "test_acc" and 0.5 < test["value"] <= 1.0
    assert "Test acc of the best model" in result.stdout
    best = invoke(runner, "best", "mine", "--storage", storage_url, "--format", "json")
    assert json.loads(best.stdout)["test"]["value"] == test["value"]
    # Running again changes nothing and does not score again.
    assert invoke(runner, "run", write_spec(user_spec()), "--storage", storage_url).exit_code == 0
    assert len((tmp_path / "test_calls.jsonl").read_text().splitlines()) == 1


@pytest.mark.slow
def test_workers_started_by_hand_score_the_test_set_once_and_report_the_same_score(
        user_pkg, write_spec, runner, pg_url, tmp_path, monkeypatch) -> None:
    """Two `hpo worker` end together; the first to finish scores, the other reports its record."""
    assert invoke(runner, "create", write_spec(user_spec(budget={"n_trials": 6, "epochs": 3})),
                  "--storage", pg_url).exit_code == 0
    env = env_without_storage() | {"TEST_SLEEP": "3"}
    procs = [subprocess.Popen([sys.executable, "-m", "hpo", "worker", "mine", "--storage", pg_url, "--threads", "1"],
                              env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    calls = (tmp_path / "test_calls.jsonl").read_text().splitlines()
    assert len(calls) == 1, calls
    scored = [next(ln for ln in out.splitlines() if "of the best model" in ln) for out, _ in outs]
    assert scored[0] == scored[1], scored


@pytest.mark.parametrize(
    ("mode", "state", "reason"),
    [
        ("nan", TrialState.PRUNED, "diverged: val_acc is nan at epoch 2"),
        ("oom", TrialState.FAIL, "out of memory on cpu (hidden="),
        ("error", TrialState.FAIL, "ValueError: bad batch of 64"),
    ],
)
def test_user_code_endings(user_pkg, write_spec, runner, storage_url, monkeypatch, mode, state, reason) -> None:
    monkeypatch.setenv("MODE", mode)
    spec = user_spec(budget={"n_trials": 2, "epochs": 4}, pruner={"name": "none"})
    spec.pop("test")
    result = invoke(runner, "run", write_spec(spec), "--storage", storage_url)
    # A pruned trial is a result; a run whose every trial failed alike stops and exits non-zero.
    assert result.exit_code == (0 if state == TrialState.PRUNED else 1), result.output
    for t in load(storage_url).trials:
        assert t.state == state and t.user_attrs["reason"].startswith(reason), t.user_attrs
        # ... and the progress line says why, not only the trial's record
        line = next(ln for ln in result.stderr.splitlines() if ln.startswith(f"trial {t.number:>4} {state.name}"))
        assert f"({reason}" in line, line
    if mode == "error":  # the user's own frame is in the traceback
        assert "in explode" in t.user_attrs["traceback"] and "digits.py" in t.user_attrs["traceback"]


def test_trial_timeout_and_study_timeout_stop_user_code_at_its_next_report(user_pkg, write_spec, runner,
                                                                           storage_url) -> None:
    spec = user_spec(budget={"n_trials": 1, "epochs": 400, "trial_timeout": 0.5}, pruner={"name": "none"})
    spec.pop("test")
    assert invoke(runner, "run", write_spec(spec), "--storage", storage_url).exit_code == 0
    (t,) = load(storage_url).trials
    assert t.state == TrialState.PRUNED and t.user_attrs["reason"].startswith("trial_timeout: stopped after 0.5 s")
    assert 0 < len(t.intermediate_values) < 400

    spec = user_spec(name="long", budget={"n_trials": 1, "epochs": 400}, pruner={"name": "none"})
    spec.pop("test")
    path = write_spec(spec, "long.yaml")
    result = invoke(runner, "run", path, "--storage", storage_url, "--timeout", "4", "--checkpoint-interval", "0")
    assert result.exit_code == 0 and "is queued and resumes from epoch" in result.output
    first = load(storage_url, "long").trials[0]
    assert first.state == TrialState.FAIL and 1 < len(first.intermediate_values) < 400
    again = invoke(runner, "run", path, "--storage", storage_url, "--timeout", "2", "--checkpoint-interval", "0")
    assert again.exit_code == 0
    retry = load(storage_url, "long").trials[1]
    assert retry.user_attrs["resumed_from_epoch"] > 0
    assert sorted(retry.intermediate_values) == list(range(len(retry.intermediate_values)))  # no gap


@pytest.mark.slow  # over ~13 s on 2 cores
def test_ctrl_c_requeues_a_user_trial_and_the_rerun_resumes_it(user_pkg, write_spec, tmp_path, storage_url) -> None:
    spec = user_spec(budget={"n_trials": 1, "epochs": 6}, pruner={"name": "none"})
    spec.pop("test")
    path = write_spec(spec)
    env = env_without_storage() | {"MODE": "marker", "MARKER": str(tmp_path / "marker")}
    cmd = [sys.executable, "-m", "hpo", "run", str(path), "--storage", storage_url, "--checkpoint-interval", "0"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    wait_for(lambda: (tmp_path / "marker").exists() or proc.poll() is not None, "epoch 2")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "is queued and resumes from epoch" in err
    env.pop("MODE")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    trials = load(storage_url).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].user_attrs["resumed_from_epoch"] == 3
    assert sorted(trials[1].intermediate_values) == list(range(6))


@pytest.mark.postgres
@pytest.mark.slow  # over ~13 s on 2 cores
def test_kill_9_on_postgresql_retries_from_the_checkpoint(user_pkg, write_spec, tmp_path, pg_url) -> None:
    spec = user_spec(budget={"n_trials": 1, "epochs": 8}, pruner={"name": "none"})
    spec.pop("test")
    path = write_spec(spec)
    env = env_without_storage() | {"MODE": "marker", "MARKER": str(tmp_path / "marker")}
    cmd = [sys.executable, "-m", "hpo", "run", str(path), "--storage", pg_url, "--checkpoint-interval", "0",
           "--heartbeat-interval", "1", "--grace-period", "3", "--artifacts", str(tmp_path / "art")]
    # Its own process group: `hpo run` and the process that trains under it go down together.
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL, cwd=tmp_path, start_new_session=True)
    wait_for(lambda: (tmp_path / "marker").exists() or proc.poll() is not None, "epoch 2")
    wait_for(lambda: len(load(pg_url).trials[0].intermediate_values) >= 3, "epoch 2 in the storage")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    env.pop("MODE")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    trials = load(pg_url).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    retry = trials[1]
    assert retry.user_attrs["resumed_from_epoch"] > 0
    # Killed on this machine: seen as gone at once, without waiting out the grace period.
    assert retry.user_attrs["retry_reason"].startswith("resumes trial 0: its process (pid ")
    assert sorted(retry.intermediate_values) == list(range(8))  # no gap, no duplicate
    assert retry.user_attrs["val_loss"] and len(retry.user_attrs["epoch_seconds"]) == 8


def test_a_model_factory_study_trains_the_users_module_in_hpos_loop(user_pkg, write_spec, runner,
                                                                   storage_url) -> None:
    spec = {
        "name": "factory",
        "model": "userpkg.digits:build",
        "data": {"dataset": "digits"},
        "space": {"hidden": [16, 32], "lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True}},
        "pruner": {"name": "none"},  # every trial trains to the end
        "budget": {"n_trials": 3, "epochs": 3},
    }
    result = invoke(runner, "run", write_spec(spec), "--storage", storage_url)
    assert result.exit_code == 0, result.output
    study = load(storage_url, "factory")
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    hidden = study.best_trial.params["hidden"]
    assert study.best_trial.user_attrs["n_params"] == 64 * hidden + hidden + hidden * 10 + 10
    assert "Test accuracy of the best model" in result.stdout


@pytest.mark.parametrize(
    ("data", "streamed"),
    [
        ({"dataset": "userpkg.digits:blobs"}, False),
        ({"dataset": "userpkg.digits:blobs", "max_resident_mb": 0.01, "loader_workers": 0}, True),
        ({"dataset": "userpkg.digits:blob_arrays", "split": {"train": 0.6, "val": 0.2, "test": 0.2}}, False),
        ({"dataset": "userpkg.digits:blob_tuple"}, False),
        ({"dataset": "userpkg.digits:blob_one", "max_resident_mb": 0.01, "loader_workers": 0,
          "split": {"train": 0.6, "val": 0.2, "test": 0.2}}, True),
        ({"dataset": "userpkg.digits:signals", "max_resident_mb": 0.01, "loader_workers": 0}, True),
    ],
    ids=["datasets, resident", "datasets, streamed", "arrays, split by hpo", "a (train, val, test) tuple",
         "one dataset, streamed, split by hpo", "1-d signals, streamed, to a Conv1d factory"],
)
def test_user_data_trains_in_hpos_loop(user_pkg, write_spec, runner, storage_url, data, streamed) -> None:
    conv = data["dataset"].endswith("signals")
    spec = {
        "name": "blobs",
        "data": data,
        "space": {"lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True}, "width": 32, "depth": 1,
                  "scaling": "none"},
        "pruner": {"name": "none"},
        "budget": {"n_trials": 2, "epochs": 3},
    }
    if conv:
        spec["model"] = "userpkg.digits:conv1d"
    result = invoke(runner, "run", write_spec(spec), "--storage", storage_url)
    assert result.exit_code == 0, result.output
    study = load(storage_url, "blobs")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert study.best_value > 0.8 and study.user_attrs["test"]["value"] > 0.8
    n_params = (1 * 4 * 3 + 4 + 4 * 16 * 3 + 3) if conv else (16 * 32 + 32 + 32 * 3 + 3)
    assert study.best_trial.user_attrs["n_params"] == n_params
    assert ("data streamed through a DataLoader" in result.output) == streamed
    if "split" in data and streamed:  # hpo split the one Dataset by index: 60/20/20 of 1,800, no item twice
        import torch

        from hpo.data.user import load_user_data
        from hpo.spec.loading import load_spec

        user = load_user_data(load_spec(write_spec(spec)).data, torch.device("cpu"), seed=3)
        assert user.streams is not None
        sets = {k: set(v.dataset.indices) for k, v in user.streams.items()}
        assert {k: len(v) for k, v in sets.items()} == {"train": 1080, "val": 360, "test": 360}
        assert len(sets["train"] | sets["val"] | sets["test"]) == 1800


def test_a_data_function_returning_train_and_val_only_is_told_in_one_line(user_pkg, write_spec, runner,
                                                                           storage_url) -> None:
    spec = {"name": "bad", "data": {"dataset": "userpkg.digits:blob_pair"}, "space": {"lr": [0.1, 0.01]}}
    line = _bad(user_pkg, write_spec, runner, storage_url, spec)
    assert line == ("Error: data.dataset: userpkg.digits:blob_pair returned 2 sets (train, val); hpo also needs a "
                    "test set, scored once on the best model: return (train, val, test), or one set for hpo to split")


def test_a_factory_that_returns_no_module_stops_with_one_line(user_pkg, write_spec, runner, storage_url) -> None:
    spec = {"name": "bad", "model": "userpkg.digits:not_a_module", "data": {"dataset": "digits"},
            "space": {"lr": [0.1, 0.01]}}
    line = _bad(user_pkg, write_spec, runner, storage_url, spec, before_run=False)
    assert line == "Error: model: userpkg.digits:not_a_module returned a list, not a torch.nn.Module"


def test_data_function_mistakes_are_one_line(user_pkg, write_spec, runner, storage_url) -> None:
    spec = {"name": "bad", "data": {"dataset": "userpkg.digits:not_data"}, "space": {"lr": [0.1, 0.01]}}
    line = _bad(user_pkg, write_spec, runner, storage_url, spec)
    assert "data.dataset: userpkg.digits:not_data returned a int for the returned set" in line


def test_python_api_runs_a_function_object(user_pkg, storage_url, tmp_path) -> None:
    from userpkg.digits import train

    import hpo

    spec = user_spec(budget={"n_trials": 2, "epochs": 2})
    for key in ("train", "test"):
        spec.pop(key)
    result = hpo.run(spec, train=train, storage=storage_url, quiet=True, artifacts=str(tmp_path / "art"))
    assert result.summary.counts == {"COMPLETE": 2} and result.best_value is not None
    assert load(storage_url).user_attrs["spec"]["train"] == "userpkg.digits:train"


# ---- one line for each mistake, nothing written --------------------------------------------


def _bad(user_pkg, write_spec, runner, storage_url, spec: dict, source: str = "", before_run: bool = True) -> str:
    """The run ends with exit 1 and one `Error:` line, no traceback; a mistake found before the run
    is the only line printed."""
    if source:
        (user_pkg / "userpkg" / "broken.py").write_text(textwrap.dedent(source))
    result = invoke(runner, "run", write_spec(spec), "--storage", storage_url)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("Error: ") and "Traceback" not in result.output, result.output
    assert len(lines) == 1 or not before_run, result.output
    return lines[-1]


@pytest.mark.parametrize(
    ("train", "source", "message"),
    [
        ("nowhere.mod:train", "", "train: cannot import 'nowhere.mod': no module named 'nowhere'"),
        ("userpkg.digits:missing", "", "train: 'userpkg.digits' has no 'missing'"),
        ("userpkg.digits:PACKAGE_NAME", "", "train: 'userpkg.digits' has no 'PACKAGE_NAME'"),
        ("userpkg.broken:train", "x = 1\ndef train(trial):\n    return (\n", "broken.py, line 3"),
        ("userpkg.broken:train", "train = 3\n", "train: userpkg.broken:train is a int, not a function"),
        ("userpkg/digits", "", "train: must be module:function or path/to/file.py:function"),
    ],
)
def test_a_train_reference_that_does_not_resolve_is_one_line_and_writes_nothing(
        user_pkg, write_spec, runner, storage_url, tmp_path, train, source, message) -> None:
    line = _bad(user_pkg, write_spec, runner, storage_url, user_spec(train=train), source)
    assert message in line
    assert not (tmp_path / "hpo.db").exists() or not optuna.get_all_study_summaries(storage_url)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("def train(trial):\n    trial.report(0, accuracy=0.5)\n",
         "report() needs the study's metric 'val_acc' (got accuracy)"),
        ("def train(trial):\n    trial.report(0, val_acc='high')\n", "report(): val_acc must be a number, not str"),
        ("def train(trial):\n    trial.report(1, val_acc=0.5)\n    trial.report(1, val_acc=0.6)\n",
         "report(epoch=1) after epoch 1: each epoch is reported once, in increasing order"),
        ("def train(trial):\n    trial.report(0, val_acc=0.5)\n    trial.save_checkpoint({'f': open})\n",
         "save_checkpoint(): state['f'] is a builtins.builtin_function_or_method"),
        ("def train(trial):\n    return None\n", "finished without reporting 'val_acc'"),
    ],
)
def test_api_misuse_fails_the_trial_and_stops_with_one_line(user_pkg, write_spec, runner, storage_url,
                                                           source, message) -> None:
    spec = user_spec(train="userpkg.broken:train", budget={"n_trials": 3, "epochs": 2})
    spec.pop("test")
    line = _bad(user_pkg, write_spec, runner, storage_url, spec, source, before_run=False)
    assert f"train: userpkg.broken:train: {message}" in line
    (t,) = load(storage_url).trials  # one failed trial says why; no others were started
    assert t.state == TrialState.FAIL and message in t.user_attrs["reason"]


def test_spec_mistakes_with_user_code_are_one_line(user_pkg, write_spec, runner, storage_url) -> None:
    no_direction = user_spec()
    no_direction.pop("direction")
    cases = [
        (no_direction, "direction: is required for the metric 'val_acc' (maximize or minimize)"),
        (user_spec(data={"dataset": "digits"}), "data: does not apply with train:"),
        (user_spec(space={"hidden": {"low": 64, "high": 8}}), "space.hidden.low: must be < high"),
        (user_spec(space={"opt": ["sgd"], "m": {"low": 0.1, "high": 0.9, "when": {"opt": "adam"}}}),
         "space.m.when.opt: opt never takes 'adam', so m would never be used"),
        (user_spec(space={"m": {"low": 0.1, "high": 0.9, "when": {"opt": "adam"}}, "opt": ["adam"]}),
         "space.m.when.opt: is not a parameter listed before m in space"),
        (user_spec(execution={"mode": "fused"}), "a train function cannot be fused"),
    ]
    fuse = invoke(runner, "run", write_spec(user_spec()), "--storage", storage_url, "--fuse", "2")
    assert fuse.exit_code == 1 and fuse.output.strip() == (
        "Error: --fuse: fused training runs hpo's own MLP loop; a train function cannot be fused")
    for spec, message in cases:
        assert message in _bad(user_pkg, write_spec, runner, storage_url, spec)
    assert not Path(storage_url.removeprefix("sqlite:///")).exists()


def test_a_worker_that_cannot_import_the_function_says_so_and_takes_no_trial(user_pkg, write_spec, runner,
                                                                             storage_url, tmp_path) -> None:
    assert invoke(runner, "create", write_spec(user_spec()), "--storage", storage_url).exit_code == 0
    env = env_without_storage()
    env.pop("PYTHONPATH", None)  # a machine without the user's package
    done = subprocess.run([sys.executable, "-m", "hpo", "worker", "mine", "--storage", storage_url],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "Error: train: cannot import 'userpkg.digits': no module named 'userpkg' "
        "(install the package, or add its folder to PYTHONPATH)"]
    assert load(storage_url).trials == []


def test_the_dashboard_shows_a_user_studys_curves_metrics_and_params(user_pkg, write_spec, runner, storage_url,
                                                                     tmp_path) -> None:
    from tests.test_dashboard import Dashboard

    spec = user_spec(budget={"n_trials": 4, "epochs": 3})
    assert invoke(runner, "run", write_spec(spec), "--storage", storage_url).exit_code == 0
    dash = Dashboard(storage_url, tmp_path)
    try:
        study_id = dash.get("/api/studies")["study_summaries"][0]["study_id"]
        detail = dash.get(f"/api/studies/{study_id}")
    finally:
        dash.close()
    assert detail["objective_names"] == ["val_acc"]  # the dashboard labels its plots with the metric
    for shown, t in zip(sorted(detail["trials"], key=lambda d: d["number"]), load(storage_url).trials):
        assert [v["value"] for v in shown["intermediate_values"]] == [t.intermediate_values[e] for e in
                                                                      sorted(t.intermediate_values)]
        attrs = {a["key"]: a["value"] for a in shown["user_attrs"]}
        assert attrs["val_loss"] == str(t.user_attrs["val_loss"]) and len(t.user_attrs["val_loss"]) == len(
            t.intermediate_values)  # the other metric, per epoch, on the trial's page
        assert {p["name"] for p in shown["params"]} == set(t.params) and "hidden" in set(t.params)


@pytest.mark.slow
def test_a_trial_killed_more_times_than_the_retry_cap_is_announced_and_cleaned_up(user_pkg, write_spec,
                                                                                  storage_url, tmp_path) -> None:
    spec = user_spec(budget={"n_trials": 1, "epochs": 4}, pruner={"name": "none"})
    spec.pop("test")
    path = write_spec(spec)
    env = env_without_storage() | {"MODE": "killed"}
    art = tmp_path / "art"
    cmd = [sys.executable, "-m", "hpo", "run", str(path), "--storage", storage_url, "--checkpoint-interval", "0",
           "--heartbeat-interval", "1", "--grace-period", "1", "--artifacts", str(art)]
    for attempt in range(4):  # the first attempt and its 3 retries all die
        died = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
        # `hpo run` ends as its process did, and takes the trial back at once, saying so.
        assert died.returncode == -signal.SIGKILL, died.stderr
        assert f"Error: the worker process was killed by SIGKILL while running trial {attempt}" in died.stderr
        if attempt < 3:
            assert list(art.glob("*.ckpt"))  # the checkpoint the retry resumes from
    assert "hpo: trial 3 lost its worker 4 times" in died.stderr and "not retried again" in died.stderr
    assert "queued to resume" not in died.stderr, died.stderr  # the last attempt is not said to come back
    trials = load(storage_url).trials
    assert [t.state for t in trials] == [TrialState.FAIL] * 4
    assert [t.user_attrs.get("retry_reason", "")[:16] for t in trials] == [
        "", "resumes trial 0:", "resumes trial 1:", "resumes trial 2:"]
    assert trials[3].user_attrs["reason"].endswith("not retried again (the limit is 3 retries)")
    assert not list(art.glob("*.ckpt"))  # nothing left behind for a trial that never resumes


def _free(path: Path) -> bool:
    import fcntl

    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


def test_a_second_run_of_a_study_on_one_sqlite_file_is_refused_until_the_first_is_gone(user_pkg, write_spec, runner,
                                                                                storage_url, tmp_path) -> None:
    spec = user_spec(budget={"n_trials": 2, "epochs": 4}, pruner={"name": "none"})
    spec.pop("test")
    path = write_spec(spec)
    env = env_without_storage() | {"MODE": "marker", "MARKER": str(tmp_path / "marker")}
    first = subprocess.Popen([sys.executable, "-m", "hpo", "run", str(path), "--storage", storage_url], env=env,
                             cwd=tmp_path, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for(lambda: (tmp_path / "marker").exists() or first.poll() is not None, "the first run's epoch 2")
    second = invoke(runner, "run", path, "--storage", storage_url)
    assert second.exit_code == 1
    # The pid of the process that trains (under the `hpo run` started): the one to stop.
    trainer = int(subprocess.run(["pgrep", "-P", str(first.pid)], capture_output=True, text=True).stdout)
    assert second.output.strip().splitlines() == [
        f"Error: study mine in {tmp_path / 'hpo.db'} is being run by another hpo process (pid {trainer}): on a "
        "SQLite file a study is run by one hpo run at a time, which runs its own workers (as many as its workers "
        "setting says). Wait for it, or use a server storage (postgresql://, mysql+pymysql://) to add workers from "
        "elsewhere"]
    assert invoke(runner, "trials", "mine", "--storage", storage_url).exit_code == 0  # readers are welcome
    # Another study on the same file runs to its end meanwhile.
    other = invoke(runner, "run", write_spec(small_spec(name="other", budget={"n_trials": 2, "epochs": 2}),
                                             "other.yaml"), "--storage", storage_url)
    assert other.exit_code == 0, other.output
    assert len(load(storage_url, "other").trials) == 2
    os.killpg(first.pid, signal.SIGKILL)  # a killed process lets go of the file
    first.wait()
    locks = list(tmp_path.glob(".hpo.db.mine-*.writer"))
    assert len(locks) == 1
    wait_for(lambda: _free(locks[0]), "the killed trainer's threads to be gone with its lock")
    monkeypatched = dict(os.environ)
    assert "MODE" not in monkeypatched
    again = invoke(runner, "run", path, "--storage", storage_url, "--grace-period", "2", "--heartbeat-interval", "1")
    assert again.exit_code == 0, again.output
    assert [t.state for t in load(storage_url).trials].count(TrialState.COMPLETE) == 2
