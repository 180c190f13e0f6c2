"""Every trial counts: no configuration proposed twice across re-runs, resumes and workers started
by hand; failures bounded and reported; a process that ends under a trial never passes for
success; stop requests obeyed; paths and ownership that hold. User code is a package created
outside the repository; storages are real SQLite, PostgreSQL and Redis."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hpo.storage.backends import open_storage
from tests.conftest import (
    env_without_storage,
    invoke,
    user_package,
    wait_for,
)

# A user's package: a small digits MLP trained for real, full batch (a trial takes ~20 ms), with a
# misbehaviour picked by $MODE at epoch 1 of the trials named by $AT (all when unset).
PACKAGE = '''
import os, signal, sys, time
import torch
from torch import nn
from sklearn.datasets import load_digits
import hpo

_x, _y = load_digits(return_X_y=True)
X = torch.tensor(_x, dtype=torch.float32) / 16.0
Y = torch.tensor(_y)


def train(trial: hpo.Trial):
    at = os.environ.get("AT")
    mode = os.environ.get("MODE", "") if at is None or int(at) == trial.number else ""
    torch.manual_seed(trial.seed % 2**31)
    if os.environ.get("SEEN"):  # what the code sees of its trial
        with open(os.environ["SEEN"], "a") as f:
            f.write(f"{trial.number} {trial.first_number} {trial.seed}\\n")
    p = trial.params
    model = nn.Sequential(nn.Linear(64, p["hidden"]), nn.ReLU(), nn.Linear(p["hidden"], 10))
    opt = torch.optim.SGD(model.parameters(), lr=p["lr"], momentum=p["momentum"])
    state = trial.load_checkpoint()
    if state:
        model.load_state_dict(state["model"])
    if mode == "chdir":
        os.chdir(os.environ["ELSEWHERE"])
    for epoch in range(trial.start_epoch, trial.epochs):
        if epoch == 1 and mode in ("hold", "swallow"):  # epoch 0 is reported and checkpointed
            with open(os.environ["MARKER"], "a") as f:
                f.write(f"{os.getpid()}\\n")
            while True:
                try:
                    time.sleep(0.01)
                    trial.report(epoch, val_acc=0.1) if mode == "swallow" else trial.check()
                except BaseException:
                    if mode == "hold":
                        raise
        for _ in range(5):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[:1200]), Y[:1200]).backward()
            opt.step()
        with torch.no_grad():
            acc = (model(X[1200:]).argmax(1) == Y[1200:]).float().mean().item()
        if epoch == 1:
            if mode == "raise" or (mode == "wide" and p["hidden"] > 24):
                raise ValueError(f"bad batch shape {tuple(X.shape)}")
            if mode == "exit":
                sys.exit(0)
            if mode == "os_exit":
                os._exit(0)
            if mode == "sigkill":  # as the out-of-memory killer would
                os.kill(os.getpid(), signal.SIGKILL)
            if mode == "kbint":
                raise KeyboardInterrupt
        trial.report(epoch, val_acc=acc)
        trial.save_checkpoint({"model": model.state_dict()})
'''


@pytest.fixture
def user_pkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("MODE", "AT", "MARKER", "SEEN"):
        monkeypatch.delenv(name, raising=False)
    return user_package(tmp_path, monkeypatch, "fastpkg", {"digits": PACKAGE})


def spec(name: str = "fast", n_trials: int = 6, **overrides) -> dict:
    doc = {
        "name": name,
        "train": "fastpkg.digits:train",
        "metric": "val_acc",
        "direction": "maximize",
        "seed": 0,
        "space": {
            "lr": {"type": "float", "low": 1e-3, "high": 0.5, "log": True},
            "momentum": {"type": "float", "low": 0.0, "high": 0.95},
            "hidden": {"type": "int", "low": 8, "high": 64, "log": True},
        },
        "sampler": {"name": "tpe", "n_startup_trials": 10},
        "pruner": {"name": "none"},
        "budget": {"n_trials": n_trials, "epochs": 3},
    }
    doc.update(overrides)
    return doc


def hpo(*args: str, env: dict | None = None, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpo", *map(str, args)], env=env or env_without_storage(),
                          cwd=cwd, capture_output=True, text=True, timeout=300, **kwargs)


def start(*args: str, env: dict, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hpo", *map(str, args)], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def trials(url: str, name: str = "fast") -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=url).trials


def key(t: optuna.trial.FrozenTrial) -> tuple:
    return tuple(sorted(t.params.items()))


def sampled(url: str, name: str = "fast") -> list[tuple]:
    """The configurations the sampler proposed, in order (retries carry their trial's)."""
    return [key(t) for t in trials(url, name) if "failed_trial" not in t.system_attrs]


# ---- 1. no configuration proposed twice ------------------------------------------------------


@pytest.mark.parametrize("backend_url", ["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)], indirect=True)
def test_a_raised_budget_proposes_new_configurations_the_same_as_one_run(user_pkg, write_spec, runner,
                                                                        tmp_path, backend_url) -> None:
    url = backend_url
    path, once_path = write_spec(spec()), write_spec(spec(name="once"), "once.yaml")
    for n in ("3", "6"):
        assert invoke(runner, "run", path, "--storage", url, "--n-trials", n).exit_code == 0
    once = url if url.startswith("postgresql") else f"sqlite:///{tmp_path / 'once.db'}"
    assert invoke(runner, "run", once_path, "--storage", once).exit_code == 0
    resumed = sampled(url)
    assert len(resumed) == len(set(resumed)) == 6
    assert resumed == sampled(once, "once")  # one worker, same seed: resumed or not, the same trials


@pytest.mark.slow
@pytest.mark.parametrize("backend_url", ["sqlite", "postgresql"], indirect=True)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_a_run_stopped_in_a_trial_resumes_with_the_trials_of_an_uninterrupted_one(user_pkg, write_spec, tmp_path,
                                                                                 backend_url, sig) -> None:
    path = write_spec(spec())
    url = backend_url
    env = env_without_storage() | {"MODE": "hold", "AT": "2", "MARKER": str(tmp_path / "marker"),
                                   "HPO_CHECKPOINT_INTERVAL": "0"}
    proc = start("run", path, "--storage", url, "--workers", "1", env=env, cwd=tmp_path)
    wait_for(lambda: (tmp_path / "marker").exists() or proc.poll() is not None, "trial 2 in epoch 1")
    if sig == signal.SIGKILL:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole run, as a machine that goes away
    else:
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "Interrupted (SIGINT): trial 2 is queued and resumes from epoch 1" in err, err
        stopped = trials(url)[2]
        assert stopped.state == TrialState.FAIL
        assert stopped.user_attrs["reason"] == "interrupted (SIGINT) in epoch 1; queued to resume from epoch 1"
    env.pop("MODE")
    done = hpo("run", path, "--storage", url, "--workers", "1", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    retry = next(t for t in trials(url) if "failed_trial" in t.system_attrs)
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["resumed_from_epoch"] == 1
    assert retry.user_attrs["retry_reason"].startswith("resumes trial 2: ")
    once = f"sqlite:///{tmp_path / 'once.db'}" if url.startswith("sqlite") else url
    once_path = write_spec(spec(name="once"), "once.yaml")
    assert hpo("run", once_path, "--storage", once, "--workers", "1", env=env, cwd=tmp_path).returncode == 0
    assert sampled(url) == sampled(once, "once") and len(set(sampled(url))) == 6


@pytest.mark.slow
def test_workers_started_by_hand_and_runs_at_once_on_postgresql_propose_distinct_configurations(
        user_pkg, write_spec, runner, pg_url, tmp_path) -> None:
    path = write_spec(spec(n_trials=12))
    assert invoke(runner, "create", path, "--storage", pg_url).exit_code == 0
    env = env_without_storage() | {"HPO_STORAGE": pg_url, "OMP_NUM_THREADS": "1"}
    procs = [start("worker", "fast", "--threads", "1", "--quiet", env=env, cwd=tmp_path)]
    procs += [start("run", path, "--workers", "1", env=env, cwd=tmp_path) for _ in range(2)]  # several runs at once
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    configs = [key(t) for t in trials(pg_url)]
    assert len(configs) == 12 and len(set(configs)) == 12


@pytest.mark.slow
def test_workers_through_the_proxy_propose_distinct_configurations(user_pkg, write_spec, runner, proxy_url,
                                                                    storage_url, tmp_path) -> None:
    path = write_spec(spec(n_trials=9))
    assert invoke(runner, "create", path, "--storage", storage_url).exit_code == 0
    env = env_without_storage() | {"HPO_STORAGE": proxy_url}
    procs = [start("worker", "fast", "--threads", "1", "--quiet", env=env, cwd=tmp_path) for _ in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    configs = [key(t) for t in trials(storage_url)]
    assert len(configs) == 9 and len(set(configs)) == 9


# A user's `train` that costs nothing: what 64 workers then measure is hpo, the proxy and the storage.
LIGHT = '''
import hpo


def train(trial: hpo.Trial):
    p = trial.params
    for epoch in range(trial.start_epoch, trial.epochs):
        trial.report(epoch, val_acc=1.0 - (p["lr"] - 0.05) ** 2 - (p["momentum"] - 0.5) ** 2 - 1e-4 * p["hidden"])
'''


@pytest.mark.slow
# 64 worker processes on 2 cores: 16 min on a Xeon, over 25 min on a CI VM (the default stops a test at 300 s)
@pytest.mark.timeout(3600)
def test_64_workers_through_the_proxy_on_postgresql_fill_5000_trials_exactly(tmp_path, monkeypatch, write_spec, runner,
                                                                              pg_url) -> None:
    """Many light workers, one proxy: the budget is filled exactly (no trial over it, none lost,
    none left running or failed) and no configuration is proposed twice."""
    from tests.conftest import grpc_proxy

    user_package(tmp_path, monkeypatch, "lightpkg", {"light": LIGHT})
    path = write_spec(spec(name="many", train="lightpkg.light:train", budget={"n_trials": 5000, "epochs": 1}))
    assert invoke(runner, "create", path, "--storage", pg_url).exit_code == 0
    with grpc_proxy(pg_url, tmp_path) as url:
        env = env_without_storage() | {"HPO_STORAGE": url}
        procs = [start("worker", "many", "--threads", "1", "--quiet", env=env, cwd=tmp_path) for _ in range(64)]
        deadline = time.monotonic() + 3300  # for all of them together
        for p in procs:
            _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            assert p.returncode == 0, err
    done = trials(pg_url, "many")
    assert len(done) == 5000 and {t.state for t in done} == {TrialState.COMPLETE}
    assert sorted(t.number for t in done) == list(range(5000))
    assert len({key(t) for t in done}) == 5000


# ---- 2. a failure policy a user can predict ---------------------------------------------------


def test_a_bug_stops_the_run_in_three_trials_and_a_rerun_after_the_fix_produces_the_results(
        user_pkg, write_spec, runner, storage_url, monkeypatch) -> None:
    path = write_spec(spec(n_trials=8))
    monkeypatch.setenv("MODE", "raise")
    seen = storage_url.removeprefix("sqlite:///") + ".seen"
    monkeypatch.setenv("SEEN", seen)
    result = invoke(runner, "run", path, "--storage", storage_url)
    assert result.exit_code == 1
    assert "Stopped: the first 3 trials of this run failed with the same error: ValueError: bad batch shape " \
           "(1797, 64)" in result.stderr
    assert 'fastpkg/digits.py", line' in result.stderr and "in train" in result.stderr  # the user's frame
    assert "hpo/" not in result.stderr.split("Stopped:")[1]  # ... and none of hpo's
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: study fast stopped on failures; failed trials do not count against the budget: fix the cause "
        "and run again, or queue the failed configurations again with: hpo retry fast")
    assert [t.state for t in trials(storage_url)] == [TrialState.FAIL] * 3
    monkeypatch.delenv("MODE")  # the fix
    assert invoke(runner, "retry", "fast", "--storage", storage_url).stdout.startswith(
        "Queued 3 failed trials again (#0 as #3, #1 as #4, #2 as #5)")
    again = invoke(runner, "run", path, "--storage", storage_url)
    assert again.exit_code == 0, again.output
    numbers = [line.split() for line in Path(seen).read_text().splitlines()]
    # The code sees each retry's own number (hpo's lines, `hpo trials` and the dashboard say #3),
    # the attempt it retries, and that attempt's seed.
    assert [(n, first) for n, first, _ in numbers[:6]] == [("0", "0"), ("1", "1"), ("2", "2"),
                                                            ("3", "0"), ("4", "1"), ("5", "2")]
    seeds = {n: seed for n, _, seed in numbers}
    assert [seeds["3"], seeds["4"], seeds["5"]] == [seeds["0"], seeds["1"], seeds["2"]]
    done = trials(storage_url)
    assert sum(t.state == TrialState.COMPLETE for t in done) == 8  # the budget counts results
    assert [key(t) for t in done[3:6]] == [key(t) for t in done[:3]]  # retried with their parameters


def test_failures_past_max_failures_stop_the_run_and_exit_non_zero(user_pkg, write_spec, runner, storage_url,
                                                                   monkeypatch) -> None:
    monkeypatch.setenv("MODE", "wide")  # only trials with more than 24 hidden units fail
    doc = spec(n_trials=30, budget={"n_trials": 30, "epochs": 3, "max_failures": 4})
    result = invoke(runner, "run", write_spec(doc), "--storage", storage_url)
    assert result.exit_code == 1
    assert "Stopped: 4 trials of this run failed (budget.max_failures is 4); the last: ValueError" in result.stderr
    done = trials(storage_url)
    assert sum(t.state == TrialState.FAIL for t in done) == 4 and len(done) < 30


def test_forked_workers_say_a_bug_once_with_the_users_frames(user_pkg, write_spec, tmp_path) -> None:
    env = env_without_storage() | {"MODE": "raise"}
    result = hpo("run", write_spec(spec(n_trials=8)), "--workers", "2", env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.count("Stopped: the first 3 trials of this run failed with the same error") == 1
    assert result.stderr.count('fastpkg/digits.py", line') == 1
    assert [ln for ln in result.stderr.splitlines() if ln.startswith("Error:")] == [
        "Error: study fast stopped on failures; failed trials do not count against the budget: fix the cause "
        "and run again, or queue the failed configurations again with: hpo retry fast"]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_mistake_in_the_training_code_is_one_line_in_forked_workers_too(user_pkg, write_spec, tmp_path) -> None:
    doc = spec(n_trials=4, metric="val_loss", direction="minimize")  # never reported
    result = hpo("run", write_spec(doc), "--workers", "2", cwd=tmp_path)
    assert result.returncode == 1
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("Error:")]
    assert lines == ["Error: train: fastpkg.digits:train: report() needs the study's metric 'val_loss' (got "
                     "val_acc)"], result.stderr


# ---- 3. a process that ends under a trial never passes for success ---------------------------


SLOW = pytest.mark.slow  # the default suite keeps one case of each kind


@pytest.mark.parametrize(("mode", "reason", "workers"), [
    pytest.param("exit", r"train: fastpkg\.digits:train: called sys\.exit\(0\) in epoch 1", "2", marks=SLOW),
    pytest.param("exit", r"train: fastpkg\.digits:train: called sys\.exit\(0\) in epoch 1", "1", marks=SLOW),
    ("os_exit", "exited with status 0 during the trial", "1"),
    # With two workers the other one may take the trial back first: it sees the process gone, not how.
    pytest.param("os_exit", r"(exited with status 0|ended) during the trial", "2", marks=SLOW),
    pytest.param("kbint", r"KeyboardInterrupt raised by the training code \(no stop was requested\)", "2",
                 marks=SLOW),
    pytest.param("kbint", r"KeyboardInterrupt raised by the training code \(no stop was requested\)", "1",
                 marks=SLOW),
])
def test_a_process_that_ends_under_a_trial_fails_it_with_the_reason_and_a_non_zero_exit(
        user_pkg, write_spec, tmp_path, mode, reason, workers) -> None:
    env = env_without_storage() | {"MODE": mode}
    result = hpo("run", write_spec(spec(n_trials=4)), "--workers", workers, env=env, cwd=tmp_path)
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr
    done = trials(f"sqlite:///{tmp_path / 'hpo.db'}")
    assert not [t for t in done if t.state == TrialState.RUNNING]
    assert not [t for t in done if t.state == TrialState.COMPLETE]
    failed = [t for t in done if t.state == TrialState.FAIL]
    assert failed and all(re.search(reason, t.user_attrs["reason"]) for t in failed), [t.user_attrs for t in failed]


def test_a_worker_killed_under_a_trial_whose_retry_finishes_in_the_run_is_told_and_the_run_succeeds(
        user_pkg, write_spec, tmp_path) -> None:
    """The study lost nothing, so the run ends as a success; the death is still said (it may be
    the out-of-memory killer). Nor did it run a trial over: the dead worker's trial is failed and
    queued again under the budget lock, so the other worker never sees its place free between the
    two (it started a fifth trial about one run in six on a loaded machine)."""
    env = env_without_storage() | {"MODE": "sigkill", "AT": "1", "HPO_CHECKPOINT_INTERVAL": "0"}
    result = hpo("run", write_spec(spec(n_trials=4)), "--workers", "2", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    said = result.stdout + result.stderr
    assert re.search(r"a worker process was killed by SIGKILL under trial 1, which resumed from its checkpoint and "
                     r"finished in this run", said), said
    assert "Error" not in said and "Traceback" not in said
    done = trials(f"sqlite:///{tmp_path / 'hpo.db'}")
    assert sum(t.state == TrialState.COMPLETE for t in done) == 4
    retry = next(t for t in done if t.system_attrs.get("failed_trial") == 1)
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["resumed_from_epoch"] == 1


def _alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            out.append(pid)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_code_that_swallows_the_stop_is_killed_after_the_grace_period_and_its_trial_queued(
        user_pkg, write_spec, tmp_path, workers) -> None:
    marker = tmp_path / "marker"
    env = env_without_storage() | {"MODE": "swallow", "MARKER": str(marker), "HPO_STOP_GRACE": "2"}
    proc = start("run", write_spec(spec(n_trials=2)), "--workers", workers, env=env, cwd=tmp_path)
    wait_for(lambda: marker.exists() and len(marker.read_text().split()) == int(workers), "every worker in epoch 1")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    wait_for(lambda: not _alive([int(p) for p in marker.read_text().split()]), "the workers gone", limit=10)
    done = trials(f"sqlite:///{tmp_path / 'hpo.db'}")
    assert not [t for t in done if t.state == TrialState.RUNNING], err
    assert sum(t.state == TrialState.WAITING for t in done) == int(workers)  # queued to resume


@pytest.mark.slow
def test_no_forked_worker_outlives_a_killed_run(user_pkg, write_spec, tmp_path) -> None:
    marker = tmp_path / "marker"
    env = env_without_storage() | {"MODE": "swallow", "MARKER": str(marker), "HPO_STOP_GRACE": "2"}
    proc = start("run", write_spec(spec(n_trials=2)), "--workers", "2", env=env, cwd=tmp_path)
    wait_for(lambda: marker.exists() and len(marker.read_text().split()) == 2, "both workers in epoch 1")
    workers = [int(p) for p in marker.read_text().split()]
    run = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                          text=True).stdout.split()]
    for pid in [proc.pid, *(p for p in run if p not in workers)]:  # `hpo run` (and its supervisor), not the workers
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    wait_for(lambda: not _alive(workers), "the orphaned workers gone", limit=15)
    again = hpo("run", write_spec(spec(n_trials=2)), "--workers", "1", cwd=tmp_path)
    assert again.returncode == 0, again.stderr  # not refused: the file's writer is gone
    assert sum(t.state == TrialState.COMPLETE for t in trials(f"sqlite:///{tmp_path / 'hpo.db'}")) == 2


# ---- 4. hpo stop ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("backend_url", ["sqlite", "postgresql", "redis"], indirect=True)
def test_hpo_stop_stops_every_worker_which_queues_its_trial_and_the_next_run_resumes(
        user_pkg, write_spec, runner, tmp_path, backend_url) -> None:
    url = backend_url
    path = write_spec(spec(n_trials=3))
    marker = tmp_path / "marker"
    env = env_without_storage() | {"MODE": "hold", "MARKER": str(marker), "HPO_STORAGE": url,
                                   "HPO_ARTIFACTS": str(tmp_path / "artifacts"), "HPO_CHECKPOINT_INTERVAL": "0"}
    if url.startswith("sqlite"):
        procs = [start("run", path, "--workers", "2", env=env, cwd=tmp_path)]
    else:
        assert invoke(runner, "create", path, "--storage", url, "--artifacts", tmp_path / "artifacts").exit_code == 0
        procs = [start("worker", "fast", "--threads", "1", env=env, cwd=tmp_path) for _ in range(2)]
    wait_for(lambda: marker.exists() and len(marker.read_text().split()) == 2, "two trials in epoch 1")
    said = invoke(runner, "stop", "fast", "--storage", url)
    assert said.exit_code == 0 and "(2 trials running)" in said.stdout
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0 and "Stopped by hpo stop" in err, err
    stopped = optuna.load_study(study_name="fast", storage=open_storage(url)).trials
    assert sorted(t.state.name for t in stopped) == ["FAIL", "FAIL", "WAITING", "WAITING"]
    env.pop("MODE")
    done = hpo("worker", "fast", "--threads", "1", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    final = optuna.load_study(study_name="fast", storage=open_storage(url)).trials
    resumed = [t for t in final if "failed_trial" in t.system_attrs]
    assert [t.state for t in resumed] == [TrialState.COMPLETE] * 2
    assert all(t.user_attrs["resumed_from_epoch"] == 1 for t in resumed)
    assert sum(t.state == TrialState.COMPLETE for t in final) == 3


# ---- 5. paths and ownership ------------------------------------------------------------------------


def test_training_code_that_changes_directory_keeps_writing_the_studys_artifacts(user_pkg, write_spec, runner,
                                                                                 tmp_path, monkeypatch) -> None:
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "hpo-artifacts").mkdir(parents=True)  # a folder of the same name where it moves
    monkeypatch.setenv("MODE", "chdir")
    monkeypatch.setenv("ELSEWHERE", str(elsewhere))
    result = invoke(runner, "run", write_spec(spec(n_trials=2)), "--checkpoint-interval", "0")
    os.chdir(tmp_path)
    assert result.exit_code == 0, result.output
    assert all(t.state == TrialState.COMPLETE for t in trials(f"sqlite:///{tmp_path / 'hpo.db'}"))
    assert not list((elsewhere / "hpo-artifacts").iterdir())
    assert list((tmp_path / "hpo-artifacts").iterdir())


@pytest.mark.slow
def test_a_sqlite_file_reached_through_a_symlink_is_the_same_file(user_pkg, write_spec, tmp_path) -> None:
    marker = tmp_path / "marker"
    env = env_without_storage() | {"MODE": "hold", "MARKER": str(marker)}
    path = write_spec(spec(n_trials=2))
    proc = start("run", path, "--workers", "1", env=env, cwd=tmp_path)
    try:
        wait_for(lambda: marker.exists() or proc.poll() is not None, "a trial in epoch 1")
        (tmp_path / "link.db").symlink_to(tmp_path / "hpo.db")
        other = hpo("worker", "fast", "--storage", "sqlite:///link.db", cwd=tmp_path)
        assert other.returncode == 1
        assert f"Error: study fast in {tmp_path / 'hpo.db'} is being run by another hpo process (pid " in other.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)


def test_a_frozen_holder_of_the_sqlite_budget_lease_loses_it_after_the_hold_limit(tmp_path) -> None:
    from hpo.storage.backends import open_storage
    from hpo.storage.budget_lock import BudgetLock

    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    storage = open_storage(url)
    study = optuna.create_study(study_name="s", storage=storage)
    BudgetLock.hold_limit = 1.5  # as a test may: the class attribute both processes read
    try:
        holder = os.fork()
        if holder == 0:  # takes the lease, then freezes as SIGSTOP (a debugger, a paused container) would
            lock = BudgetLock(storage, study._study_id)
            lock.acquire()
            os.kill(os.getpid(), signal.SIGSTOP)
            os._exit(0)
        wait_for(lambda: Path(f"/proc/{holder}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T", "frozen")
        t0 = time.monotonic()
        mine = BudgetLock(storage, study._study_id)
        mine.acquire()
        waited = time.monotonic() - t0
        mine.release()
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)
        assert waited < 1.5 + 1.0, waited
        again = BudgetLock(storage, study._study_id)  # a holder that is gone frees it at once
        t0 = time.monotonic()
        again.acquire()
        assert time.monotonic() - t0 < 0.5
    finally:
        BudgetLock.hold_limit = 15.0


def test_a_trial_owned_in_another_pid_namespace_is_left_to_its_heartbeats(tmp_path) -> None:
    """Containers with host networking share the host name: a pid from another PID namespace is
    no proof of anything here, so the trial is not taken back before its grace period."""
    from hpo.runtime.lifecycle import end_orphans
    from hpo.storage.backends import open_storage
    from hpo.storage.retry import OWNER_ATTR, _machine, owner

    storage = open_storage(f"sqlite:///{tmp_path / 'hpo.db'}")
    study = optuna.create_study(study_name="s", storage=storage)
    host, boot, _ = _machine().split("/")
    dead = 2**22 + 17  # no such pid here
    for recorded in (f"{host}/{boot}/pid=[1]:{dead}:1", f"{_machine()}:{dead}:1"):
        trial = study.ask()
        storage.set_trial_system_attr(trial._trial_id, OWNER_ATTR, recorded)
    assert owner().startswith(_machine() + ":")
    assert end_orphans(study).queued == (1,)  # only the one from this namespace, whose pid is gone
    assert [t.state for t in study.trials] == [TrialState.RUNNING, TrialState.FAIL, TrialState.WAITING]


def test_the_python_api_raises_when_a_run_stops_on_failures(user_pkg, storage_url, tmp_path, monkeypatch) -> None:
    import hpo
    from hpo.errors import HpoError

    monkeypatch.setenv("MODE", "raise")
    with pytest.raises(HpoError, match="stopped on failures: the first 3 trials of this run failed with the same "
                                       "error: ValueError: bad batch shape"):
        hpo.run(spec(n_trials=4), storage=storage_url, quiet=True, artifacts=str(tmp_path / "art"))
    monkeypatch.delenv("MODE")
    result = hpo.run(spec(n_trials=4), storage=storage_url, quiet=True, artifacts=str(tmp_path / "art"))
    assert result.summary.counts == {"COMPLETE": 4, "FAIL": 3}


def test_hpo_enqueue_refuses_a_parameter_its_branch_does_not_use(user_pkg, write_spec, runner, storage_url) -> None:
    """`momentum` applies only with SGD: queued with Adam it would be dropped without a word."""
    space = {"optimizer": ["sgd", "adam"], "lr": {"type": "float", "low": 1e-3, "high": 0.5, "log": True},
             "momentum": {"type": "float", "low": 0.0, "high": 0.95, "when": {"optimizer": "sgd"}},
             "hidden": 16}
    assert invoke(runner, "create", write_spec(spec(space=space)), "--storage", storage_url).exit_code == 0
    bad = invoke(runner, "enqueue", "fast", "optimizer=adam", "momentum=0.9", "--storage", storage_url)
    assert bad.exit_code != 0 and bad.output.strip().splitlines() == [
        "Error: hpo enqueue fast: enqueue.momentum: does not apply when optimizer=adam (only when optimizer is sgd); "
        "leave it out"]
    assert trials(storage_url) == []
    ok = invoke(runner, "enqueue", "fast", "optimizer=sgd", "momentum=0.9", "--storage", storage_url)
    assert ok.exit_code == 0 and "Queued trial 0" in ok.output
