"""Trials of several processes (execution.processes_per_trial): a user's DDP training function
from a package outside the repository, two ranks on gloo, on SQLite and PostgreSQL. Each rank
writes what it saw to a file of its own, so the tests read every rank, not only rank 0."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from optuna.trial import TrialState

from tests.conftest import env_without_storage, invoke, user_package, wait_for

DDP_TRAIN = '''
import json, os, random
import numpy as np, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
import hpo

def _log(trial, **what):
    with open(os.path.join(os.environ["RANKS_OUT"], f"rank{trial.rank}.jsonl"), "a") as f:
        f.write(json.dumps({"trial": trial.number, "rank": trial.rank, "pid": os.getpid(), **what}) + "\\n")

def train(trial: hpo.Trial):
    p = trial.params
    state = trial.load_checkpoint()
    total = torch.tensor([float(trial.rank + 1)])
    dist.all_reduce(total)  # a real collective between the trial's processes
    _log(trial, event="start", world=trial.world_size, main=trial.is_main, params=p, seed=trial.seed,
         start_epoch=trial.start_epoch, dist_rank=dist.get_rank(), dist_world=dist.get_world_size(),
         total=total.item(), draw=[random.random(), float(np.random.rand()), torch.rand(1).item()],
         resumed_state=None if state is None else int(state["epochs_done"]), threads=torch.get_num_threads())
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    if state is not None:
        model.load_state_dict(state["model"])
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(trial.rank))
    marker = os.environ.get("MARKER", "")
    try:
        for epoch in range(trial.start_epoch, trial.epochs):
            opt.zero_grad()
            ddp(x).pow(2).mean().backward()  # gradients averaged over the ranks
            opt.step()
            if (os.environ.get("DIE_RANK") == str(trial.rank) and epoch == 2 and marker
                    and not os.path.exists(marker)):
                open(marker, "w").close()
                if os.environ.get("DIE_HOW") == "raise":
                    raise ValueError(f"rank {trial.rank} broke in epoch {epoch}")
                if os.environ.get("DIE_HOW") == "hang":
                    import time
                    while True:
                        time.sleep(0.05)
                os.kill(os.getpid(), 9)
            if os.environ.get("SLOW"):
                torch.randn(300, 300) @ torch.randn(300, 300)  # some work, the same every epoch
                open(os.environ["SLOW"], "w").write(str(epoch))
            trial.report(epoch, val_score=p["quality"] + 0.01 * epoch)
            _log(trial, event="epoch", epoch=epoch)
            trial.save_checkpoint({"model": model.state_dict(), "epochs_done": epoch + 1})
            _log(trial, event="saved", epoch=epoch)
    except hpo.TrialPruned:
        _log(trial, event="pruned", epoch=epoch)
        raise
    except BaseException as e:  # a stop: Ctrl-C, the study's timeout (rank 0), the stop rank 0 sent (the others)
        _log(trial, event="stopped", epoch=epoch, kind=type(e).__name__)
        raise
    _log(trial, event="complete", weight=model.weight.detach().tolist())
'''


BLOBS = '''
import torch
from torch.utils.data import Dataset

class Blobs(Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.targets = torch.randint(0, 3, (n,), generator=g)
        self.x = torch.randn(n, 12, generator=g) + self.targets[:, None].float()
    def __len__(self):
        return len(self.targets)
    def __getitem__(self, i):
        return self.x[i], self.targets[i]

def load():
    return {"train": Blobs(480, 0), "val": Blobs(120, 1), "test": Blobs(120, 2)}
'''


def ranks_spec(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "ddp",
        "train": "ddppkg.train:train",
        "metric": "val_score",
        "direction": "maximize",
        "seed": 0,
        "space": {"quality": {"type": "float", "low": 0.0, "high": 1.0}},
        "pruner": {"name": "none"},
        "budget": {"n_trials": 1, "epochs": 4},
        "execution": {"processes_per_trial": 2},
    }
    spec.update(overrides)
    return spec


@pytest.fixture
def ddppkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    out = tmp_path / "ranks"
    out.mkdir()
    monkeypatch.setenv("RANKS_OUT", str(out))
    user_package(tmp_path, monkeypatch, "ddppkg", {"train": DDP_TRAIN})
    return out


def events(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for f in sorted(out.glob("rank*.jsonl")) for line in f.read_text().splitlines()]


def load(url: str) -> optuna.Study:
    return optuna.load_study(study_name="ddp", storage=url)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


@pytest.mark.parametrize("backend_url", ["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)],
                         indirect=True)
def test_every_rank_trains_one_trial_and_a_prune_stops_them_all_at_one_epoch(ddppkg, write_spec, runner,
                                                                            backend_url) -> None:
    # Trial 0 completes at 0.9; trial 1 reports 0.1 at epoch 0, under the median: pruned there.
    spec = ranks_spec(budget={"n_trials": 2, "epochs": 4}, enqueue=[{"quality": 0.9}, {"quality": 0.1}],
                      pruner={"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0})
    result = invoke(runner, "run", write_spec(spec), "--storage", backend_url, "--workers", "1")
    assert result.exit_code == 0, result.output
    trials = load(backend_url).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED]
    assert trials[0].user_attrs["processes"] == 2
    seen = events(ddppkg)
    for number in (0, 1):
        starts = [e for e in seen if e["trial"] == number and e["event"] == "start"]
        assert sorted(e["rank"] for e in starts) == [0, 1]
        assert [e["main"] for e in sorted(starts, key=lambda e: e["rank"])] == [True, False]
        assert all(e["world"] == e["dist_world"] == 2 and e["dist_rank"] == e["rank"] for e in starts)
        assert all(e["total"] == 3.0 for e in starts)  # 1 + 2: the collective reached both
        # One trial: the same parameters, seed, start epoch and random streams on every rank.
        assert len({json.dumps([e["params"], e["seed"], e["start_epoch"], e["draw"]]) for e in starts}) == 1
        assert all(e["threads"] == 1 for e in starts)  # this worker's 2 threads, split between its ranks
    complete = [e for e in seen if e["event"] == "complete"]
    assert len(complete) == 2 and complete[0]["weight"] == complete[1]["weight"]  # DDP kept them equal
    pruned = [e for e in seen if e["event"] == "pruned"]
    assert sorted(e["rank"] for e in pruned) == [0, 1] and {e["epoch"] for e in pruned} == {0}
    assert not [e for e in seen if e["trial"] == 1 and e["event"] == "epoch"]  # no rank went on alone
    assert all(gone(e["pid"]) or e["rank"] == 0 for e in seen)  # no rank outlives its trial


def test_an_exception_on_one_rank_fails_the_trial_with_its_message_and_traceback(ddppkg, write_spec, runner,
                                                                                storage_url, tmp_path,
                                                                                monkeypatch) -> None:
    monkeypatch.setenv("DIE_RANK", "1")
    monkeypatch.setenv("DIE_HOW", "raise")
    monkeypatch.setenv("MARKER", str(tmp_path / "marker"))
    result = invoke(runner, "run", write_spec(ranks_spec(budget={"n_trials": 1, "epochs": 4})),
                    "--storage", storage_url, "--workers", "1")
    assert result.exit_code == 0, result.output
    failed, done = load(storage_url).trials
    assert failed.state == TrialState.FAIL and done.state == TrialState.COMPLETE
    assert failed.user_attrs["reason"] == "rank 1: ValueError: rank 1 broke in epoch 2"
    assert "ddppkg/train.py" in failed.user_attrs["traceback"]
    assert "raise ValueError" in failed.user_attrs["traceback"]
    assert "rank 1: ValueError: rank 1 broke in epoch 2" in result.output
    show = invoke(runner, "show", "ddp", "0", "--storage", storage_url)
    assert "processes  2" in show.output and "raise ValueError" in show.output
    pids = {e["pid"] for e in events(ddppkg) if e["rank"] == 1}
    assert pids and all(gone(pid) for pid in pids)


@pytest.mark.parametrize("backend_url", ["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)],
                         indirect=True)
def test_kill_9_of_a_rank_retries_the_trial_and_every_rank_resumes_from_the_checkpoint(
        ddppkg, write_spec, runner, backend_url, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DIE_RANK", "1")
    monkeypatch.setenv("MARKER", str(tmp_path / "marker"))
    result = invoke(runner, "run", write_spec(ranks_spec()), "--storage", backend_url, "--workers", "1",
                    "--checkpoint-interval", "0")
    assert result.exit_code == 0, result.output
    lost, retry = load(backend_url).trials
    assert lost.state == TrialState.FAIL and retry.state == TrialState.COMPLETE
    # Rank 1 dies in epoch 2 before its report; rank 0 may have reported epoch 2 (and checkpointed
    # it: the weights it holds went through that epoch's all-reduce) before its next collective fails.
    assert re.fullmatch(r"rank 1 of 2 \(pid \d+\) was killed by SIGKILL in epoch [23]; the trial is retried from "
                        r"its last checkpoint", lost.user_attrs["reason"])
    assert retry.user_attrs["retry_reason"].startswith("resumes trial 0: rank 1 of 2 (pid ")
    resumed = retry.user_attrs["resumed_from_epoch"]
    assert resumed in (2, 3) and sorted(retry.intermediate_values) == [0, 1, 2, 3]
    starts = [e for e in events(ddppkg) if e["trial"] == 1 and e["event"] == "start"]
    assert sorted(e["rank"] for e in starts) == [0, 1]
    assert all(e["start_epoch"] == resumed and e["resumed_state"] == resumed for e in starts)  # one checkpoint
    assert all(gone(e["pid"]) for e in events(ddppkg) if e["rank"] == 1)


@pytest.mark.slow
def test_kill_9_of_rank_0_ends_the_other_ranks_and_the_next_run_resumes_the_trial(ddppkg, write_spec, tmp_path,
                                                                                   storage_url) -> None:
    path = write_spec(ranks_spec(budget={"n_trials": 1, "epochs": 6}))
    env = env_without_storage() | {"DIE_RANK": "1", "DIE_HOW": "hang", "MARKER": str(tmp_path / "marker"),
                                   "HPO_WORKERS": "1"}
    cmd = [sys.executable, "-m", "hpo", "run", str(path), "--storage", storage_url, "--checkpoint-interval", "0"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL, cwd=tmp_path,
                            start_new_session=True)
    # Rank 1 hangs in epoch 2 (rank 0 waits for it in the next all-reduce): kill -9 rank 0 alone.
    wait_for(lambda: (tmp_path / "marker").exists() or proc.poll() is not None, "rank 1 in epoch 2")
    # ... and rank 0 has saved epoch 2's checkpoint (it is killed waiting in epoch 3's all-reduce).
    wait_for(lambda: any(e["rank"] == 0 and e["event"] == "saved" and e["epoch"] == 2 for e in events(ddppkg))
             or proc.poll() is not None, "rank 0 to checkpoint epoch 2")
    assert proc.poll() is None
    seen = events(ddppkg)
    rank0 = next(e["pid"] for e in seen if e["rank"] == 0)
    others = {e["pid"] for e in seen if e["rank"] == 1}
    os.kill(rank0, signal.SIGKILL)
    wait_for(lambda: all(gone(pid) for pid in others), "the other rank to end with rank 0", limit=10)
    proc.wait()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    lost, retry = load(storage_url).trials
    assert lost.state == TrialState.FAIL and retry.state == TrialState.COMPLETE
    resumed = retry.user_attrs["resumed_from_epoch"]
    assert resumed == 3  # epoch 2's all-reduce went through (rank 1 hangs after it): rank 0 checkpointed it
    starts = [e for e in events(ddppkg) if e["trial"] == 1 and e["event"] == "start"]
    assert sorted(e["rank"] for e in starts) == [0, 1] and all(e["start_epoch"] == resumed for e in starts)


@pytest.mark.slow
def test_the_study_timeout_stops_every_rank_at_one_epoch_and_the_trial_resumes(ddppkg, write_spec, runner,
                                                                              storage_url, tmp_path,
                                                                              monkeypatch) -> None:
    monkeypatch.setenv("SLOW", str(tmp_path / "epoch"))
    path = write_spec(ranks_spec(budget={"n_trials": 1, "epochs": 100000}))
    # The timeout leaves the second rank time to start (its fork server's first start took over 3 s
    # on a slow machine, and a rank stopped before its train() records nothing).
    result = invoke(runner, "run", path, "--storage", storage_url, "--workers", "1", "--timeout", "8",
                    "--checkpoint-interval", "0")
    assert result.exit_code == 0, result.output
    assert "queued and resumes from epoch" in result.output
    stopped = [e for e in events(ddppkg) if e["event"] == "stopped"]
    assert sorted(e["rank"] for e in stopped) == [0, 1]
    assert len({e["epoch"] for e in stopped}) == 1  # the same epoch on both ranks
    assert {e["kind"] for e in stopped} == {"StudyTimeout", "RankStopped"}
    (queued,) = load(storage_url).get_trials(states=(TrialState.WAITING,))
    assert queued.params == load(storage_url).trials[0].params
    assert all(gone(e["pid"]) for e in events(ddppkg) if e["rank"] == 1)


@pytest.mark.slow
def test_ctrl_c_stops_every_rank_and_the_next_run_resumes_the_trial(ddppkg, write_spec, tmp_path,
                                                                    storage_url) -> None:
    path = write_spec(ranks_spec(budget={"n_trials": 1, "epochs": 40}))
    epoch_file = tmp_path / "epoch"
    env = env_without_storage() | {"SLOW": str(epoch_file), "HPO_WORKERS": "1"}
    cmd = [sys.executable, "-m", "hpo", "run", str(path), "--storage", storage_url, "--checkpoint-interval", "0"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, cwd=tmp_path,
                            start_new_session=True, text=True)
    wait_for(lambda: (epoch_file.exists() and epoch_file.read_text() >= "3") or proc.poll() is not None,
             "epoch 3")
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: every process of the group gets it
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Interrupted" in err
    seen = events(ddppkg)
    assert all(gone(e["pid"]) for e in seen)
    stopped = [e for e in seen if e["event"] == "stopped"]
    assert sorted(e["rank"] for e in stopped) == [0, 1]
    env.pop("SLOW")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    trials = load(storage_url).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    starts = [e for e in events(ddppkg) if e["trial"] == 1 and e["event"] == "start"]
    assert sorted(e["rank"] for e in starts) == [0, 1]
    assert len({e["start_epoch"] for e in starts}) == 1 and starts[0]["start_epoch"] >= 3


@pytest.mark.parametrize("streamed", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["resident", "streamed"])
def test_hpos_own_loop_on_two_processes_follows_the_one_process_curve(write_spec, runner, tmp_path, monkeypatch,
                                                                      streamed) -> None:
    """hpo's MLP with DDP: each rank trains on its half of every batch of `batch_size` and the
    gradients are averaged, so the curve is the one process's within float tolerance (resident
    data: the same batches; streamed: a DistributedSampler's own order, so only close)."""
    from tests.conftest import small_spec

    data = {"dataset": "synthetic", "n_samples": 600, "n_features": 12, "n_classes": 3}
    if streamed:  # a user's Dataset, too large for the (tiny) resident budget
        user_package(tmp_path, monkeypatch, "blobpkg", {"data": BLOBS})
        data = {"dataset": "blobpkg.data:load", "max_resident_mb": 0.01, "loader_workers": 0}
    curves = {}
    for procs in (1, 2):
        spec = small_spec(name=f"own{procs}", data=data,
                          space={"lr": [0.01], "width": 32, "depth": 2, "batch_size": 64, "dropout": 0.0},
                          pruner={"name": "none"}, budget={"n_trials": 1, "epochs": 4},
                          execution={"processes_per_trial": procs})
        url = f"sqlite:///{tmp_path / f'own{procs}.db'}"
        result = invoke(runner, "run", write_spec(spec, f"own{procs}.yaml"), "--storage", url, "--workers", "1")
        assert result.exit_code == 0, result.output
        (trial,) = optuna.load_study(study_name=f"own{procs}", storage=url).trials
        assert trial.state == TrialState.COMPLETE
        assert trial.user_attrs.get("processes", 1) == procs
        curves[procs] = (trial.user_attrs["val_loss"], trial.user_attrs["train_loss"])
    (val1, train1), (val2, train2) = curves[1], curves[2]
    if streamed:
        assert val2[-1] < val2[0] and abs(val2[-1] - val1[-1]) < 0.25 * val1[0]  # it learns as much
    else:
        assert val2 == pytest.approx(val1, rel=1e-4)
        assert train2 == pytest.approx(train1, rel=1e-4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_gpus_per_trial_train_hpos_loop_with_nccl(write_spec, runner, tmp_path) -> None:
    from tests.conftest import small_spec

    gpus = ",".join(str(i) for i in range(torch.cuda.device_count() // 2 * 2))
    spec = small_spec(name="gpus", pruner={"name": "none"}, budget={"n_trials": 2, "epochs": 3})
    url = f"sqlite:///{tmp_path / 'gpus.db'}"
    result = invoke(runner, "run", write_spec(spec), "--storage", url, "--gpus", gpus, "--procs-per-trial", "2")
    assert result.exit_code == 0, result.output
    trials = optuna.load_study(study_name="gpus", storage=url).trials
    assert all(t.state == TrialState.COMPLETE and t.user_attrs["processes"] == 2 for t in trials)
    assert all(t.user_attrs["device"].startswith("cuda") for t in trials)


def test_processes_per_trial_mistakes_are_one_line(write_spec, runner, storage_url) -> None:
    bad = invoke(runner, "validate", write_spec(ranks_spec(execution={"processes_per_trial": 0})))
    assert bad.exit_code != 0
    assert bad.output.strip().endswith("execution.processes_per_trial: must be >= 1") or \
        "execution.processes_per_trial" in bad.output.strip().splitlines()[-1]
    fused = {"name": "f", "metric": "val_accuracy", "data": {"dataset": "digits"}, "space": {"lr": [0.01, 0.02]},
             "execution": {"mode": "fused", "processes_per_trial": 2}}
    out = invoke(runner, "validate", write_spec(fused, "f.yaml"))
    assert out.exit_code != 0 and "fused trials run in one process" in out.output
    both = invoke(runner, "run", write_spec(ranks_spec(), "b.yaml"), "--storage", storage_url, "--fuse", "4",
                  "--procs-per-trial", "2")
    assert both.exit_code != 0 and len(both.output.strip().splitlines()) == 1, both.output
