"""Population-based training (search.strategy pbt): segments are Optuna trials with their lineage
in the study; a member continues from the checkpoint its lineage names, with the new parameters;
a member that never checkpoints is refused; a killed worker's member is taken back and the
population finishes its budget. User code is a package created outside the repository; storages
are real SQLite and PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from hpo.errors import SpecError
from hpo.search.pbt import checkpoint_of, members
from hpo.storage.lineage import schedule
from hpo.spec.loading import load_spec
from hpo.storage.lineage import Segment
from tests.conftest import env_without_storage, invoke, user_package, wait_for

# A user's train(trial) that checkpoints its model and optimizer and records which checkpoint it
# loaded (the trial number saved in it); $MODE=hold holds trial $AT in its second epoch, $MODE=never
# saves no checkpoint.
PACKAGE = '''
import os, time
import torch
from torch import nn
from sklearn.datasets import load_digits
import hpo

_x, _y = load_digits(return_X_y=True)
X = torch.tensor(_x, dtype=torch.float32) / 16.0
Y = torch.tensor(_y)


def train(trial: hpo.Trial):
    mode = os.environ.get("MODE", "")
    hold = mode == "hold" and int(os.environ.get("AT", "-1")) == trial.number
    torch.manual_seed(trial.seed % 2**31)
    p = trial.params
    model = nn.Sequential(nn.Linear(64, p["hidden"]), nn.ReLU(), nn.Linear(p["hidden"], 10))
    opt = torch.optim.SGD(model.parameters(), lr=p["lr"], momentum=p["momentum"])
    state = trial.load_checkpoint()
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        for group in opt.param_groups:  # this segment's values, not the checkpoint's
            group["lr"], group["momentum"] = p["lr"], p["momentum"]
        trial.set_attr("loaded_from", state["number"])
        trial.set_attr("loaded_epoch", state["epoch"])
    for epoch in range(trial.start_epoch, trial.epochs):
        if hold and epoch == trial.start_epoch + 1:
            with open(os.environ["MARKER"], "a") as f:
                f.write(f"{os.getpid()}\\n")
            while True:
                time.sleep(0.01)
                trial.check()
        for _ in range(5):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[:1200]), Y[:1200]).backward()
            opt.step()
        with torch.no_grad():
            acc = (model(X[1200:]).argmax(1) == Y[1200:]).float().mean().item()
        if mode == "nan" and int(os.environ["AT"]) == trial.number:
            acc = float("nan")
        trial.report(epoch, val_acc=acc)
        if mode != "never":
            trial.save_checkpoint({"model": model.state_dict(), "opt": opt.state_dict(),
                                   "number": trial.first_number, "epoch": epoch + 1})
'''


@pytest.fixture
def user_pkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("MODE", "AT", "MARKER"):
        monkeypatch.delenv(name, raising=False)
    return user_package(tmp_path, monkeypatch, "pbtpkg", {"digits": PACKAGE})


def spec(name: str = "pop", population: int = 4, epochs: int = 6, interval: int = 2, **search) -> dict:
    return {
        "name": name,
        "train": "pbtpkg.digits:train",
        "metric": "val_acc",
        "direction": "maximize",
        "seed": 0,
        "space": {
            "lr": {"type": "float", "low": 1e-3, "high": 0.5, "log": True},
            "momentum": {"type": "float", "low": 0.0, "high": 0.95},
            "hidden": {"type": "int", "low": 8, "high": 64, "log": True},
        },
        "budget": {"epochs": epochs},
        "search": {"strategy": "pbt", "population": population, "interval": interval, **search},
    }


def trials(url: str, name: str = "pop") -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=url).trials


def check_population(done: list[optuna.trial.FrozenTrial], population: int, epochs: int, interval: int) -> None:
    """Every member trained every epoch; each segment started from the checkpoint its lineage names."""
    complete = [t for t in done if t.state == TrialState.COMPLETE]
    assert len(complete) == population * -(-epochs // interval)
    by_member = members(done)
    assert sorted(by_member) == list(range(population))
    by_number = {t.number: t for t in done}
    for m in by_member.values():
        assert sorted(m.done) == list(range(interval, epochs + 1, interval))
    for t in complete:
        seg = Segment.of(t)
        assert seg is not None and t.user_attrs["pbt_member"] == seg.member
        assert sorted(t.intermediate_values) == list(range(seg.start, seg.end))
        if seg.parent is None:
            assert seg.start == 0
            continue
        parent = by_number[seg.parent]
        assert parent.state == TrialState.COMPLETE and Segment.of(parent).end == seg.start  # type: ignore[union-attr]
        if not t.system_attrs.get("retry_history"):  # a retry resumes from its own checkpoint
            assert t.user_attrs["loaded_from"] == checkpoint_of(parent) == seg.checkpoint
            assert t.user_attrs["loaded_epoch"] == seg.start


def test_a_population_trains_in_segments_that_continue_from_their_lineage(user_pkg, write_spec, runner,
                                                                         storage_url) -> None:
    path = write_spec(spec(population=4, epochs=6, interval=2))
    result = invoke(runner, "run", path, "--storage", storage_url, "--workers", "1")
    assert result.exit_code == 0, result.output
    assert "member 3 epochs 4-5" in result.output
    done = trials(storage_url)
    check_population(done, 4, 6, 2)
    exploits = [t for t in done if t.user_attrs.get("pbt_action") == "exploit"]
    assert exploits, "the bottom quantile never copied a top member"
    by_number = {t.number: t for t in done}
    for t in exploits:
        donor = by_number[t.user_attrs["pbt_parent"]]
        assert t.user_attrs["pbt_donor"] == donor.user_attrs["pbt_member"] != t.user_attrs["pbt_member"]
        assert t.params["hidden"] == donor.params["hidden"]  # structure is kept: the checkpoint loads
        assert (t.params["lr"], t.params["momentum"]) != (donor.params["lr"], donor.params["momentum"])
    best = max((t for t in done if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    steps = schedule(done, best.number)
    assert [s["epochs"] for s in steps] == [[0, 2], [2, 4], [4, 6]][:len(steps)] and steps[-1]["trial"] == best.number


def test_a_member_that_never_checkpoints_is_refused_in_one_line(user_pkg, write_spec, runner, storage_url,
                                                                monkeypatch) -> None:
    monkeypatch.setenv("MODE", "never")
    result = invoke(runner, "run", write_spec(spec()), "--storage", storage_url, "--workers", "1")
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "a member continues from its checkpoint, and this one saved none by epoch 2" in lines[0]
    assert "Traceback" not in result.output


@pytest.mark.parametrize("at", [1, 5])
def test_a_diverged_member_is_replaced_and_the_population_finishes(user_pkg, write_spec, runner, storage_url,
                                                                  monkeypatch, at) -> None:
    monkeypatch.setenv("MODE", "nan")
    monkeypatch.setenv("AT", str(at))
    result = invoke(runner, "run", write_spec(spec(population=4, epochs=4, interval=2)), "--storage", storage_url,
                    "--workers", "1")
    assert result.exit_code == 0, result.output
    done = trials(storage_url)
    assert done[at].state == TrialState.PRUNED and "diverged" in done[at].user_attrs["reason"]
    check_population(done, 4, 4, 2)
    member, start = done[at].user_attrs["pbt_member"], done[at].user_attrs["pbt_epochs"][0]
    replaced = [t for t in done if t.number > at and t.user_attrs.get("pbt_member") == member
                and t.user_attrs.get("pbt_action") == "replace"]
    assert replaced and replaced[0].user_attrs["pbt_epochs"][0] == start
    replaced = replaced[0]
    assert replaced.state == TrialState.COMPLETE


@pytest.mark.parametrize("backend_url", ["sqlite", "postgresql"], indirect=True)
def test_a_worker_killed_mid_population_is_taken_back_and_the_population_finishes(user_pkg, write_spec, tmp_path,
                                                                                 backend_url) -> None:
    path = write_spec(spec(population=4, epochs=4, interval=2))
    marker = tmp_path / "marker"
    env = env_without_storage() | {"MODE": "hold", "AT": "5", "MARKER": str(marker), "HPO_CHECKPOINT_INTERVAL": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "hpo", "run", str(path), "--storage", backend_url, "--workers",
                             "1"], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    wait_for(lambda: marker.exists() or proc.poll() is not None, "trial 5 in its second epoch")
    os.killpg(proc.pid, signal.SIGKILL)  # the worker and its run, as a machine that goes away
    proc.communicate(timeout=60)
    held = trials(backend_url)[5]
    assert held.state == TrialState.RUNNING and held.user_attrs["pbt_action"] in ("continue", "exploit")
    env.pop("MODE")
    again = subprocess.run([sys.executable, "-m", "hpo", "run", str(path), "--storage", backend_url, "--workers", "1"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    done = trials(backend_url)
    check_population(done, 4, 4, 2)
    retry = next(t for t in done if t.system_attrs.get("failed_trial") == 5)
    assert retry.state == TrialState.COMPLETE and Segment.of(retry) == Segment.of(held)  # the same segment
    assert retry.user_attrs["resumed_from_epoch"] == 3  # from its own checkpoint of epoch 3


def test_one_of_two_workers_killed_mid_population_its_run_finishes_the_population(user_pkg, write_spec,
                                                                                 tmp_path) -> None:
    path = write_spec(spec(population=4, epochs=4, interval=2))
    marker = tmp_path / "marker"
    env = env_without_storage() | {"MODE": "hold", "AT": "5", "MARKER": str(marker), "HPO_CHECKPOINT_INTERVAL": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "hpo", "run", str(path), "--workers", "2"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(lambda: marker.exists() or proc.poll() is not None, "trial 5 in its second epoch")
    os.kill(int(marker.read_text().split()[0]), signal.SIGKILL)  # that worker only: the other goes on
    out, err = proc.communicate(timeout=120)
    assert "trial 5 was left running by a process on this machine that is gone" in out + err
    done = trials(f"sqlite:///{tmp_path / 'hpo.db'}")
    check_population(done, 4, 4, 2)
    retry = next(t for t in done if t.system_attrs.get("failed_trial") == 5)
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["loaded_from"] == 5  # its own checkpoint


@pytest.mark.parametrize("search, expected", [
    ({"population": 1}, "search.population: must be >= 2"),
    ({"quantile": 0.7}, "search.quantile: must be in (0, 0.5]"),
    ({"resample": 2}, "search.resample: must be in [0, 1]"),
    ({"interval": 6}, "search.interval: is 6 epochs but budget.epochs is 6"),
    ({"explore": ["lr", "widht"]}, "search.explore: 'widht' is not a tuned parameter of space"),
    ({"strategy": "pbt2"}, "search.strategy:"),
])
def test_a_population_is_checked_in_one_line(write_spec, search, expected) -> None:
    doc = spec()
    doc["search"] |= search
    with pytest.raises(SpecError) as err:
        load_spec(write_spec(doc))
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_pbt_refuses_a_pruner_a_trial_count_it_would_not_run_and_fused_trials(write_spec) -> None:
    for extra, expected in [({"pruner": "median"}, "pruner: population-based training replaces pruning"),
                            ({"budget": {"epochs": 6, "n_trials": 10}}, "budget.n_trials: population-based training "
                                                                         "runs population x segments = 4 x 3 = 12"),
                            ({"execution": {"mode": "fused"}}, "execution.mode: population-based training")]:
        with pytest.raises(SpecError) as err:
            load_spec(write_spec(spec() | extra))
        assert expected in str(err.value), err.value
    loaded = load_spec(write_spec(spec()))
    assert loaded.budget.n_trials == 12 and loaded.pruner.name == "none"
    assert load_spec(write_spec(yaml.safe_dump(loaded.to_dict(), sort_keys=False))) == loaded  # the stored form reads back


# ---- hpo's own loop --------------------------------------------------------------------------


def test_new_parameters_apply_over_a_loaded_state_and_the_schedule_goes_on() -> None:
    """ray#62173: loading an optimizer's state brings back the old values; a member's exploit must
    train with its own, where the schedule had got to."""
    from hpo.data.splits import DataCache
    from hpo.spec.params import Params
    from hpo.spec.schema import DataSpec
    from hpo.training.models import build_model
    from hpo.training.trainer import Trainer

    import torch

    cpu = torch.device("cpu")
    cache = DataCache(DataSpec("digits"), seed=0, device=cpu)

    def trainer(p: Params) -> Trainer:
        data = cache.get(p.scaling)
        return Trainer(build_model("mlp", p, data.input_shape, data.n_outputs), p, data, 6, cpu, 0)

    old = Params(optimizer="momentum", lr=0.1, momentum=0.9, weight_decay=0.0, scheduler="cosine", batch_size=64)
    new = Params(optimizer="momentum", lr=0.02, momentum=0.5, weight_decay=1e-4, scheduler="cosine", batch_size=32)
    donor = trainer(old)
    donor.run_epoch()
    donor.run_epoch()
    progress = donor.opt.param_groups[0]["lr"] / 0.1  # where the cosine schedule is after 2 of 6 epochs
    child = trainer(new)
    child.load_state_dict(donor.state_dict())
    assert child.opt.param_groups[0]["lr"] == pytest.approx(0.1 * progress)  # what loading alone gives
    child.retune(old, new)
    group = child.opt.param_groups[0]
    assert group["lr"] == pytest.approx(0.02 * progress)
    assert (group["momentum"], group["weight_decay"], child.batch_size) == (0.5, 1e-4, 32)
    child.run_epoch()
    donor.run_epoch()
    assert child.opt.param_groups[0]["lr"] / 0.02 == pytest.approx(donor.opt.param_groups[0]["lr"] / 0.1)


def test_hpos_own_loop_trains_a_population_with_each_segments_values(write_spec, runner, storage_url,
                                                                     tmp_path) -> None:
    doc = {"name": "own", "metric": "val_accuracy", "data": {"dataset": "digits"}, "seed": 1,
           "space": {"optimizer": "momentum", "scheduler": "none", "width": 32,
                     "lr": {"type": "float", "low": 0.003, "high": 0.3, "log": True},
                     "momentum": {"type": "float", "low": 0.5, "high": 0.95}},
           "budget": {"epochs": 6}, "search": {"strategy": "pbt", "population": 4, "interval": 2}}
    result = invoke(runner, "run", write_spec(doc), "--storage", storage_url, "--workers", "1")
    assert result.exit_code == 0, result.output
    done = trials(storage_url, "own")
    check_population_of_own(done)
    assert any(t.user_attrs.get("pbt_action") == "exploit" for t in done)
    from hpo.search.study import open_existing
    from hpo.storage.backends import open_storage

    handle = open_existing("own", open_storage(storage_url), storage_url)
    for t in done:
        seg = Segment.of(t)
        if seg is None or t.state != TrialState.COMPLETE:
            continue
        raw, _ = handle.artifacts.load_checkpoint(checkpoint_of(t))
        if seg.end < 6:  # every member has gone past it: no segment can start from it any more
            assert raw is None
            continue
        assert raw is not None and raw["epoch"] == seg.end  # each member's last state stays
        optimizer = raw["state"]["folds"][0]["optimizer"]
        assert optimizer["lr"] == pytest.approx(t.params["lr"])  # this segment's lr, not its parent's
    show = invoke(runner, "show", "own", str(max(done, key=lambda t: t.value or 0).number), "--storage", storage_url)
    assert "Lineage (member" in show.output and "epochs  trial  member  how" in show.output
    report = invoke(runner, "report", "own", "--storage", storage_url, "--out", str(tmp_path / "rep"))
    assert report.exit_code == 0, report.output
    assert (tmp_path / "rep" / "population.png").stat().st_size > 10_000
    assert "## Population" in (tmp_path / "rep" / "summary.md").read_text()
    export = invoke(runner, "export", "own", "--storage", storage_url, "--out", str(tmp_path / "best.pt"))
    assert export.exit_code == 0, export.output
    import torch

    steps = torch.load(tmp_path / "best.pt", weights_only=True)["schedule"]
    assert steps[-1]["epochs"][1] <= 6 and steps[0]["epochs"][0] == 0
    assert all(a["epochs"][1] == b["epochs"][0] for a, b in zip(steps, steps[1:]))


def check_population_of_own(done: list[optuna.trial.FrozenTrial]) -> None:
    complete = [t for t in done if t.state == TrialState.COMPLETE]
    assert len(complete) == 12 and all(Segment.of(t) is not None for t in complete)


def test_the_best_members_schedule_replays_as_a_fixed_schedule(user_pkg, write_spec, runner, storage_url,
                                                               tmp_path) -> None:
    """hpo export carries the best trial's schedule; `search: {strategy: schedule, schedule: FILE}`
    trains it again from scratch as one member, segment by segment with its values."""
    assert invoke(runner, "run", write_spec(spec(population=4, epochs=6, interval=2)), "--storage", storage_url,
                  "--workers", "1").exit_code == 0
    out = tmp_path / "best.pt"
    assert invoke(runner, "export", "pop", "--storage", storage_url, "--out", str(out)).exit_code == 0
    import torch

    steps = torch.load(out, weights_only=True)["schedule"]
    replay = spec(name="replay") | {"search": {"strategy": "schedule", "schedule": str(out)}}
    replay["seed"] = 7
    result = invoke(runner, "run", write_spec(replay, "replay.yaml"), "--storage", storage_url, "--workers", "1")
    assert result.exit_code == 0, result.output
    done = [t for t in trials(storage_url, "replay") if t.state == TrialState.COMPLETE]
    assert len(done) == len(steps)
    by_start = {Segment.of(t).start: t for t in done}  # type: ignore[union-attr]
    for step in steps:
        t = by_start[step["epochs"][0]]
        assert t.params == pytest.approx(step["params"]) and Segment.of(t).end == step["epochs"][1]  # type: ignore[union-attr]
        if step["epochs"][0] > 0:  # continued from the segment before, its checkpoint loaded
            assert t.user_attrs["loaded_from"] == by_start[Segment.of(t).start - 2].number  # type: ignore[union-attr]
    shown = yaml.safe_load(yaml.safe_dump(load_spec(tmp_path / "replay.yaml").to_dict()))
    assert shown["search"]["schedule"][0]["epochs"] == steps[0]["epochs"]  # the stored spec holds the schedule


def test_a_schedule_is_checked_in_one_line(write_spec, tmp_path) -> None:
    for schedule, expected in [
        ([{"epochs": [0, 2], "params": {"lr": 0.1}}, {"epochs": [3, 4], "params": {"lr": 0.01}}],
         "search.schedule[1].epochs: must start at epoch 2"),
        ([{"epochs": [0, 2], "params": {"lr": 9.0}}], "search.schedule[0].params.lr: 9.0 is outside the range"),
        (str(tmp_path / "missing.pt"), "search.schedule: no file"),
        ("", "search.schedule: no file"),
    ]:
        doc = spec() | {"search": {"strategy": "schedule", "schedule": schedule}}
        with pytest.raises(SpecError) as err:
            load_spec(write_spec(doc))
        assert expected in str(err.value) and "\n" not in str(err.value), err.value
    ok = spec(epochs=5) | {"search": {"strategy": "schedule", "schedule": [{"epochs": [0, 2], "params": {"lr": 0.1}},
                                                                    {"epochs": [2, 5], "params": {"lr": 0.01}}]}}
    loaded = load_spec(write_spec(ok))
    assert loaded.budget.epochs == 5 and loaded.budget.n_trials == 2
