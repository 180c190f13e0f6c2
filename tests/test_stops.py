"""Stops (issue 43): `hpo.run()` returns a result that says it was stopped and why (from a script
and a Jupyter kernel, with local workers), signals are told by name and exit 128 + their number,
and `hpo stop` counts exactly the trials it stops."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import (
    env_without_storage,
    invoke,
    need_module,
    user_package,
    wait_for,
)

# A training function that stops its own study at epoch 1 of the first trial to get there, the way
# STOP_HOW says: `hpo stop` from another process, or a signal to the process that called hpo.run
# (MAIN_PID: Ctrl-C in its terminal, a notebook's interrupt, SIGTERM). Every trial then waits for
# the stop to reach it (a condition, not a duration).
FUNCTIONS = '''
import os, signal, subprocess, sys, time
import torch
import hpo


def train(trial):
    how, marker = os.environ.get("STOP_HOW", ""), os.environ.get("MARKER", "")
    if os.environ.get("FAIL"):
        raise ValueError("this training code always fails")
    for epoch in range(trial.start_epoch, trial.epochs):
        trial.report(epoch, score=trial.params["x"] * (epoch + 1))
        trial.save_checkpoint({"w": torch.full((2,), float(epoch))})
        if how and epoch == 1:
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                if how == "hpo stop":
                    subprocess.run([sys.executable, "-m", "hpo", "stop", os.environ["STUDY"], "--storage",
                                    os.environ["URL"]], check=True, capture_output=True)
                else:
                    os.kill(int(os.environ["MAIN_PID"]), getattr(signal, how))
        if how and marker and os.path.exists(marker):
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                trial.check()  # raises once the stop has reached this process
                time.sleep(0.01)
'''

SPEC = {"name": "stops", "metric": "score", "direction": "maximize", "seed": 2,
        "space": {"x": {"type": "float", "low": 0.1, "high": 1.0}}, "pruner": {"name": "none"},
        "budget": {"n_trials": 6, "epochs": 4}}

SCRIPT = FUNCTIONS + '''
import json
import hpo

if __name__ == "__main__":
    spec, url = json.loads(sys.argv[1]), sys.argv[2]
    os.environ.update(MAIN_PID=str(os.getpid()), URL=url, STUDY=spec["name"])
    out = []
    for how in sys.argv[3:] + [""]:
        os.environ.update(STOP_HOW=how, MARKER=f"marker-{how or 'none'}")
        result = hpo.run(spec, train=train, storage=url, workers=2, quiet=True, checkpoint_interval=0)
        out.append({"how": how, "interrupted": result.interrupted, "stopped": result.stopped,
                    "counts": result.summary.counts})
    print(json.dumps(out))
'''


@pytest.mark.slow  # four runs of a script, each forking two workers
def test_hpo_run_from_a_script_returns_a_result_that_says_it_was_stopped_and_the_next_call_resumes(tmp_path) -> None:
    script = tmp_path / "tune.py"
    script.write_text(SCRIPT)
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    done = subprocess.run([sys.executable, str(script), json.dumps(SPEC), url, "hpo stop", "SIGINT", "SIGTERM"],
                          cwd=tmp_path, env=env_without_storage(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    runs = json.loads(done.stdout.strip().splitlines()[-1])
    heads = {"hpo stop": "Stopped by hpo stop: ", "SIGINT": "Interrupted (SIGINT): ", "SIGTERM": "Interrupted (SIGTERM): "}
    resumed = 0
    for run in runs[:3]:
        assert run["interrupted"] == run["how"]
        assert run["stopped"] == heads[run["how"]] + "every worker queued its trial; the next run resumes them."
        assert run["counts"]["RESUMED"] > resumed and "FAIL" not in run["counts"]  # queued, not failed
        resumed = run["counts"]["RESUMED"]
    last = runs[3]
    assert last["interrupted"] is None and last["stopped"] == ""
    assert last["counts"]["COMPLETE"] == 6 and "FAIL" not in last["counts"]
    reasons = {re.match(r"interrupted \((.+?)\) (in epoch \d|before it started)", t.user_attrs["reason"]).group(1)
               for t in optuna.load_study(study_name="stops", storage=url).trials if t.state == TrialState.FAIL}
    assert reasons == {"hpo stop", "SIGINT", "SIGTERM"}  # each trial says what stopped it


@pytest.mark.slow  # a Jupyter kernel's start-up
def test_a_notebook_interrupted_or_stopped_gets_its_result_and_resumes(tmp_path) -> None:
    nbformat = need_module("nbformat")
    nbclient = need_module("nbclient")
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    def run(how: str) -> str:
        return (f"os.environ.update(STOP_HOW={how!r}, MARKER='marker-{how or 'none'}')\n"
                f"result = hpo.run({SPEC!r}, train=train, storage={url!r}, workers=2, quiet=True)\n"
                "print(json.dumps([result.interrupted, result.stopped, result.summary.counts]))")

    cells = [FUNCTIONS, f"import json\nos.environ.update(MAIN_PID=str(os.getpid()), URL={url!r}, STUDY='stops')",
             run("hpo stop"), run("SIGINT"), run("")]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(textwrap.dedent(c)) for c in cells])
    env_keep = dict(os.environ)
    try:
        os.environ.pop("HPO_STORAGE", None)
        client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                         resources={"metadata": {"path": str(tmp_path)}})
        client.execute()  # a cell that raised would raise here
    finally:
        os.environ.clear()
        os.environ.update(env_keep)
    results = [json.loads(notebook.cells[i].outputs[-1]["text"]) for i in (2, 3, 4)]
    assert [r[0] for r in results] == ["hpo stop", "SIGINT", None]
    assert results[1][1].startswith("Interrupted (SIGINT): ")
    assert results[2][2]["COMPLETE"] == 6


# ---- signals by name -------------------------------------------------------------------------------


@pytest.fixture
def stoppkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return user_package(tmp_path, monkeypatch, "stoppkg", {"train": FUNCTIONS})


def stop_spec() -> dict:
    return {**SPEC, "train": "stoppkg.train:train"}


@pytest.mark.parametrize("how,code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_is_told_by_name_and_exits_128_plus_its_number(stoppkg, write_spec, runner, storage_url,
                                                                  tmp_path, monkeypatch, how, code) -> None:
    monkeypatch.setenv("STOP_HOW", how)
    monkeypatch.setenv("MARKER", str(tmp_path / "marker"))
    monkeypatch.setenv("MAIN_PID", str(os.getpid()))  # one worker: the run is this process
    result = invoke(runner, "run", write_spec(stop_spec()), "--storage", storage_url, "--checkpoint-interval", "0")
    assert result.exit_code == code, result.output
    assert result.stderr.splitlines()[-1] == (f"Interrupted ({how}): trial 0 is queued and resumes from epoch 2 on the "
                                              "next run.")
    trials = optuna.load_study(study_name="stops", storage=storage_url).trials
    assert trials[0].user_attrs["reason"] == (f"interrupted ({how}) in epoch 2; queued to resume from epoch 2")


@pytest.mark.slow  # `hpo run` and its two workers started from a shell
@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_to_hpo_run_is_told_as_sigterm_by_every_worker_and_exits_143(stoppkg, write_spec, tmp_path,
                                                                             workers) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    env = env_without_storage() | {"STOP_HOW": "wait", "MARKER": str(tmp_path / "marker")}
    (tmp_path / "marker").touch()  # every trial holds at epoch 1 until it is stopped
    proc = subprocess.Popen([sys.executable, "-m", "hpo", "run", str(write_spec(stop_spec())), "--storage", url,
                             "--workers", workers, "--checkpoint-interval", "0"], env=env, cwd=tmp_path,
                            stderr=subprocess.PIPE, text=True)

    def holding() -> bool:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            trials = optuna.load_study(study_name="stops", storage=url).get_trials(states=(TrialState.RUNNING,))
        except KeyError:
            return False  # not created yet
        return len(trials) == int(workers) and all(len(t.intermediate_values) >= 1 for t in trials)

    wait_for(holding, "every worker's trial in epoch 1")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Interrupted (SIGTERM)" in err.splitlines()[-1]
    failed = [t for t in optuna.load_study(study_name="stops", storage=url).trials if t.state == TrialState.FAIL]
    assert len(failed) == int(workers)
    assert all(t.user_attrs["reason"].startswith("interrupted (SIGTERM) in epoch") for t in failed)


@pytest.mark.slow  # a run of many short trials from a shell
def test_hpo_stop_counts_the_trials_running_and_none_starts_after_it(stoppkg, write_spec, runner, tmp_path) -> None:
    """Trials of two epochs: the workers are often between two trials when the stop comes. The
    count `hpo stop` prints is the trials running then (each is queued at its next report, or
    completes first), and no trial starts after it: the request is written under the lock workers
    take trials under."""
    from datetime import datetime

    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    spec = write_spec({**stop_spec(), "budget": {"n_trials": 2000, "epochs": 2}})
    proc = subprocess.Popen([sys.executable, "-m", "hpo", "run", str(spec), "--storage", url, "--workers", "2"],
                            env=env_without_storage(), cwd=tmp_path, stderr=subprocess.PIPE, text=True)

    def twenty_done() -> bool:
        try:
            study = optuna.load_study(study_name="stops", storage=url)
        except KeyError:
            return False  # not created yet
        return proc.poll() is not None or len(study.get_trials(states=(TrialState.COMPLETE,))) >= 20

    wait_for(twenty_done, "20 trials done")
    before = datetime.now()
    said = invoke(runner, "stop", "stops", "--storage", url)
    after = datetime.now()
    started = len(optuna.load_study(study_name="stops", storage=url).trials)  # none may start from now on
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    running = int(re.search(r"\((\d+) trials? running\)", said.stdout).group(1))
    trials = optuna.load_study(study_name="stops", storage=url).trials
    assert [t.number for t in trials if "retry_history" not in t.system_attrs] == list(range(started))
    ended_after = [t for t in trials[:started] if t.datetime_complete is not None and t.datetime_complete > before]
    surely_running = [t for t in ended_after if t.datetime_start < before and t.datetime_complete > after]
    assert len(surely_running) <= running <= len(ended_after), (running, len(ended_after))
    queued = [t for t in trials if t.state == TrialState.FAIL]
    assert all(t.user_attrs["reason"].startswith("interrupted (hpo stop)") for t in queued)


# ---- one ending, both ways ------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["fails", "hpo stop", "SIGINT"])
def test_hpo_run_and_the_python_api_end_the_same_study_the_same_way(stoppkg, write_spec, runner, tmp_path,
                                                                    monkeypatch, how) -> None:
    """One function (hpo.execution.launch.run_ending) turns how a run ended into `hpo run`'s exit
    status and line and into hpo.run()'s result or exception: the same study, both ways, says the
    same (issue 45)."""
    import hpo

    outcomes = []
    for way in ("cli", "api"):
        url = f"sqlite:///{tmp_path / (way + '.db')}"
        spec = {**stop_spec(), "budget": {"n_trials": 2, "epochs": 4}}
        monkeypatch.setenv("URL", url)
        monkeypatch.setenv("STUDY", "stops")
        monkeypatch.setenv("MAIN_PID", str(os.getpid()))
        monkeypatch.setenv("MARKER", str(tmp_path / f"marker-{way}"))
        monkeypatch.setenv("STOP_HOW", "" if how == "fails" else how)
        if how == "fails":
            monkeypatch.setenv("FAIL", "1")
        if way == "cli":
            result = invoke(runner, "run", write_spec(spec, "cli.yaml"), "--storage", url, "--checkpoint-interval", "0")
            outcomes.append((result.exit_code, result.stderr.strip().splitlines()[-1].removeprefix("Error: ")))
        else:
            try:
                got = hpo.run(spec, storage=url, workers=1, quiet=True, checkpoint_interval=0)
            except hpo.HpoError as e:
                outcomes.append((1, str(e)))
            else:
                outcomes.append(({"hpo stop": 0, "SIGINT": 130}[got.interrupted], got.stopped))
    (cli_code, cli_line), (api_code, api_line) = outcomes
    assert cli_code == api_code == {"fails": 1, "hpo stop": 0, "SIGINT": 130}[how]
    if how == "fails":  # the exception also says what the terminal showed above the CLI's line
        assert cli_line == ("study stops stopped on failures; failed trials do not count against the budget: fix the "
                            "cause and run again, or queue the failed configurations again with: hpo retry stops")
        assert api_line.startswith("study stops stopped on failures: the first 3 trials of this run failed with the "
                                   "same error: ValueError") and api_line.endswith("hpo retry stops")
    else:
        assert cli_line == api_line and cli_line.startswith(
            {"hpo stop": "Stopped by hpo stop: trial ", "SIGINT": "Interrupted (SIGINT): trial "}[how])
