"""Several trials at once from one `hpo run` on the embedded SQLite file: its worker processes
share the file, the budget is exact, a kill -9 of the whole run loses nothing, and one worker
stays reproducible."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import env_without_storage, small_spec, wait_for

# Synthetic data, one epoch per trial: a study that is all storage traffic, so two workers
# writing one file at the same time are sure to meet.
BUSY = small_spec(name="busy", data={"dataset": "synthetic", "n_samples": 300, "n_features": 8, "n_classes": 2},
                  space={"lr": {"low": 1e-3, "high": 5e-2, "log": True}, "width": {"low": 8, "high": 32}},
                  sampler={"name": "random"}, pruner={"name": "none"}, budget={"n_trials": 24, "epochs": 2})

# Trials long enough (8 epochs of 20,000 rows) to be caught in flight by a kill.
LONG = dict(BUSY, name="long", data={"dataset": "synthetic", "n_samples": 20000, "n_features": 64, "n_classes": 4},
            space={"lr": {"low": 1e-3, "high": 1e-2, "log": True}, "width": 256},
            budget={"n_trials": 4, "epochs": 8})


def run_cmd(spec_path, url: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "hpo", "run", str(spec_path), "--storage", url, *args]


def load(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=url)


def owners(study: optuna.Study) -> set[str]:
    return {t.system_attrs["hpo:owner"] for t in study.trials if "hpo:owner" in t.system_attrs}


@pytest.mark.slow  # over ~13 s on 2 cores
def test_two_workers_share_one_sqlite_file_and_stop_at_the_budget(write_spec, tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    spec = write_spec(BUSY)
    created = subprocess.run([sys.executable, "-m", "hpo", "create", str(spec), "--storage", url], cwd=tmp_path,
                             env=env_without_storage(), capture_output=True, text=True, timeout=300)
    assert created.returncode == 0, created.stderr
    # Opened before the run starts (opening takes longer than the run's trials on a loaded machine),
    # stock Optuna reads the file while both workers write it.
    reader = load(url, "busy")
    proc = subprocess.Popen(run_cmd(spec, url, "--workers", "2"), cwd=tmp_path, text=True,
                            env=env_without_storage(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = []
    while proc.poll() is None:
        seen.append(len(reader.get_trials(deepcopy=False)))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "locked" not in err and "Traceback" not in err
    assert "2 workers (cpu, 1 thread each)" in err
    study = load(url, "busy")
    assert [t.state for t in study.trials].count(TrialState.COMPLETE) == 24 and len(study.trials) == 24
    assert len(owners(study)) == 2, "both workers ran trials"
    assert len(set(seen)) > 2, "a reader should have seen the study grow"
    assert "Study busy: 24 trials (24 complete)" in out
    # The two workers' samplers are seeded apart: alike, they would propose the same trials.
    proposals = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(set(proposals)) == len(proposals)


@pytest.mark.slow  # over ~13 s on 2 cores
def test_a_second_run_on_the_same_file_is_refused_while_the_workers_are_its_own(write_spec, tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    spec = write_spec(dict(LONG, budget={"n_trials": 40, "epochs": 8}))  # far longer than a refusal takes
    first = subprocess.Popen(run_cmd(spec, url, "--workers", "2"), cwd=tmp_path, env=env_without_storage(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(_running(url, "long", 1)) > 0, "the first run's trials")
        second = subprocess.run(run_cmd(spec, url), cwd=tmp_path, env=env_without_storage(), capture_output=True,
                                text=True, timeout=120)
        assert second.returncode == 1
        trainer = subprocess.run(["pgrep", "-P", str(first.pid)], capture_output=True, text=True).stdout.strip()
        assert f"is being run by another hpo process (pid {trainer})" in second.stderr  # the process under `hpo run`
    finally:
        first.send_signal(signal.SIGINT)
        first.wait(timeout=120)
    assert first.returncode == 130


def _made(url: str) -> bool:
    """The run has created the schema and a trial (a reader opening the file earlier would race
    the run to create the schema, as Optuna's load_study creates missing tables)."""
    import sqlite3

    try:
        with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
            return db.execute("SELECT count(*) FROM trials").fetchone()[0] > 0
    except sqlite3.Error:
        return False


def _running(url: str, name: str, epochs: int) -> list[optuna.trial.FrozenTrial]:
    if not _made(url):
        return []
    trials = load(url, name).get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return [t for t in trials if len(t.intermediate_values) >= epochs and "hpo:owner" in t.system_attrs]


@pytest.mark.slow  # ~15 s
def test_kill_9_of_the_whole_run_resumes_every_trial_in_flight_at_once(write_spec, tmp_path) -> None:
    """Both workers and the run itself are killed with two trials in flight; the next run sees
    their processes are gone (same machine), so it takes them back without waiting out the
    grace period (600 s here: waiting would time the test out), and resumes each past epoch 0."""
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    spec = write_spec(LONG)
    args = ("--workers", "2", "--grace-period", "600", "--checkpoint-interval", "0")
    env = env_without_storage()
    run = subprocess.Popen(run_cmd(spec, url, *args), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for(lambda: len(_running(url, "long", 2)) == 2, "two trials two epochs in")
    in_flight = _running(url, "long", 2)
    pids = {int(t.system_attrs["hpo:owner"].split(":")[1]) for t in in_flight}
    assert len(pids) == 2 and run.pid not in pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    os.killpg(run.pid, signal.SIGKILL)  # `hpo run` and the process under it (the workers have sessions of their own)
    run.wait()
    stranded = load(url, "long").get_trials(states=(TrialState.RUNNING,))
    assert {t.number for t in stranded} >= {t.number for t in in_flight}

    again = subprocess.run(run_cmd(spec, url, *args), cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=240)
    assert again.returncode == 0, again.stderr
    assert "were left running by a process on this machine that is gone" in again.stderr
    study = load(url, "long")
    states = [t.state for t in study.trials]
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    finished = [t for t in study.trials if t.state.is_finished() and t.state != TrialState.FAIL]
    assert len(finished) == 4, "exactly the budget"
    for t in in_flight:
        retry = next(r for r in study.trials if t.number in r.system_attrs.get("retry_history", ()))
        assert retry.state == TrialState.COMPLETE
        assert retry.user_attrs["resumed_from_epoch"] >= 2
        assert retry.user_attrs["retry_reason"].startswith(f"resumes trial {t.number}: its process (pid ")
        assert retry.user_attrs["retry_reason"].endswith("ended during the trial")
        assert sorted(retry.intermediate_values) == list(range(8))


@pytest.mark.slow  # over ~13 s on 2 cores
def test_one_worker_repeats_the_same_trials(write_spec, tmp_path) -> None:
    """One worker is exactly reproducible: same seed, same trials, same values, same best."""
    spec = write_spec(dict(BUSY, sampler={"name": "tpe", "n_startup_trials": 3}, budget={"n_trials": 6, "epochs": 2}))
    runs = []
    for attempt in range(2):
        url = f"sqlite:///{tmp_path / f'one{attempt}.db'}"
        done = subprocess.run(run_cmd(spec, url, "--workers", "1", "-q"), cwd=tmp_path, env=env_without_storage(),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        runs.append([(t.params, t.value) for t in load(url, "busy").trials])
    assert runs[0] == runs[1] and len(runs[0]) == 6


def test_worker_processes_hpo_run_starts_get_typed_settings_not_flags(write_spec, tmp_path, monkeypatch) -> None:
    """The `hpo worker` processes `hpo run` starts (one per GPU; here on the CPU) get their
    settings as a typed WorkerSettings in their environment: the artifact folder, threads, fusion
    and checkpoint interval it names are the ones they run with."""
    from hpo.execution.processes import ENV_SETTINGS, WorkerPlan, WorkerSettings, launch

    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    spec = write_spec(small_spec(name="typed", budget={"n_trials": 4, "epochs": 2}))
    created = subprocess.run([sys.executable, "-m", "hpo", "create", str(spec), "--storage", url], cwd=tmp_path,
                             env=env_without_storage(), capture_output=True, text=True, timeout=120)
    assert created.returncode == 0, created.stderr
    art = tmp_path / "elsewhere"
    settings = WorkerSettings(str(art), "cpu", 1, heartbeat_interval=1, grace_period=3, checkpoint_interval=0.0,
                              fuse=2, timeout=None)
    monkeypatch.setattr(os, "environ", env_without_storage())
    procs = launch("typed", url, [WorkerPlan("cpu", 1, {"OMP_NUM_THREADS": "1"})], settings)
    assert ENV_SETTINGS not in os.environ  # given to the child only
    assert [p.wait(timeout=300) for p in procs] == [0]
    study = load(url, "typed")
    assert [t.state for t in study.trials].count(TrialState.COMPLETE) + \
        [t.state for t in study.trials].count(TrialState.PRUNED) == 4
    assert {t.user_attrs.get("fused_group_size") for t in study.trials} == {2}  # fuse=2 reached the worker
    assert {t.user_attrs["threads"] for t in study.trials} == {1}
    assert any(art.iterdir())  # its models went to the folder the settings named
