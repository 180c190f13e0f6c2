"""`hpo.run()` equal to `hpo run` (issue 27): local worker processes by default, function objects
from `__main__` and from a Jupyter kernel, a spec dict as PyYAML's safe_load reads it, Optuna
silent, and the best model back from the result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import env_without_storage, need_module

# A study as a newcomer writes it inline: PyYAML reads `1e-4` as text.
SPEC = '''
name: {name}
metric: score
direction: maximize
space:
  lr: {{type: float, low: 1e-4, high: 1e-1, log: true}}
  hidden: [4, 8]
budget: {{n_trials: 6, epochs: 3}}
{extra}
'''

FUNCTIONS = '''
import os
import time
import torch
import hpo


def train(trial):
    trial.set_attr("pid", os.getpid())
    # The first TOGETHER trials wait (up to a minute) until as many processes have started one, so
    # every local worker runs a trial however loaded the machine is.
    together = int(os.environ.get("TOGETHER", "0"))
    if trial.number < together:
        open(f"started-{os.getpid()}", "w").close()
        deadline = time.monotonic() + 60
        while len([p for p in os.listdir(".") if p.startswith("started-")]) < together and time.monotonic() < deadline:
            time.sleep(0.01)
    for epoch in range(trial.start_epoch, trial.epochs):
        trial.report(epoch, score=trial.params["lr"] * (epoch + 1) + trial.params["hidden"])
        trial.save_checkpoint({"w": torch.full((trial.params["hidden"],), trial.params["lr"], dtype=torch.float64)})


def test(trial):
    return {"test_score": float(trial.load_checkpoint()["w"].numel())}
'''

SCRIPT = FUNCTIONS + '''
import json, sys, yaml
import optuna

if __name__ == "__main__":
    out = {"me": os.getpid()}
    for name, extra in (("auto", ""), ("one", "execution: {workers: 1}")):
        spec = yaml.safe_load(SPEC.format(name=name, extra=extra))
        assert isinstance(spec["space"]["lr"]["low"], str)  # "1e-4": text to PyYAML
        result = hpo.run(spec, train=train, test=test, storage=sys.argv[1], quiet=True)
        study = optuna.load_study(study_name=name, storage=sys.argv[1])
        best = result.load_best()
        out[name] = {"pids": sorted({t.user_attrs["pid"] for t in study.trials}), "best": result.best_value,
                     "study_best": study.best_value, "test": result.test["scores"],
                     "state": best.state["w"].tolist(), "params": best.params,
                     "stored_train": study.user_attrs["spec"]["train"]}
    print(json.dumps(out))
'''


def test_a_script_runs_its_own_functions_on_local_workers_like_hpo_run(tmp_path) -> None:
    script = tmp_path / "tune.py"
    script.write_text("SPEC = " + repr(SPEC) + "\n" + SCRIPT)
    db = f"sqlite:///{tmp_path / 'hpo.db'}"
    env = {k: v for k, v in env_without_storage().items() if k != "HPO_WORKERS"}  # hpo.run's own default
    cores = len(os.sched_getaffinity(0))
    # The first trials wait for each other, so that every worker runs one however loaded the machine.
    env["TOGETHER"] = str(min(cores, 6))
    done = subprocess.run([sys.executable, str(script), db], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    # One worker process per core, forked from the script: each ran __main__'s train.
    assert len(got["auto"]["pids"]) == min(cores, 6) and got["me"] not in got["auto"]["pids"]
    assert got["one"]["pids"] == [got["me"]]  # execution.workers: 1 runs here
    for name in ("auto", "one"):
        run = got[name]
        assert run["best"] == run["study_best"]
        assert run["test"] == {"test_score": float(run["params"]["hidden"])}  # test= ran on the best trial
        assert run["state"] == [run["params"]["lr"]] * run["params"]["hidden"]
        assert run["stored_train"] == "__main__:train"
    assert "finished with value" not in done.stderr  # Optuna's INFO lines are not printed
    assert "Study auto:" not in done.stderr  # quiet=True: no progress either


@pytest.mark.slow  # a Jupyter kernel's start-up
def test_a_notebook_runs_a_study_with_functions_defined_in_its_cells(tmp_path) -> None:
    nbformat = need_module("nbformat")
    nbclient = need_module("nbclient")
    db = f"sqlite:///{tmp_path / 'hpo.db'}"
    cells = [
        FUNCTIONS,
        f"import yaml\nspec = yaml.safe_load({SPEC.format(name='nb', extra='')!r})",
        f"result = hpo.run(spec, train=train, test=test, storage={db!r}, workers=2)\n"
        "best = result.load_best()",
        "import json, optuna\n"
        f"study = optuna.load_study(study_name='nb', storage={db!r})\n"
        "print(json.dumps({'me': os.getpid(), 'pids': sorted({t.user_attrs['pid'] for t in study.trials}),\n"
        "                  'counts': result.summary.counts, 'best': result.best_value, 'hidden': best.params['hidden'],\n"
        "                  'test': result.test['scores']}))",
    ]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(textwrap.dedent(c)) for c in cells])
    env_keep = dict(os.environ)
    try:
        os.environ.pop("HPO_STORAGE", None)
        os.environ["TOGETHER"] = "2"  # the kernel's first two trials wait for each other: both workers run one
        client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                         resources={"metadata": {"path": str(tmp_path)}})
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(env_keep)
    run_outputs = notebook.cells[2].outputs
    progress = "".join(o.get("text", "") for o in run_outputs if o.get("name") == "stderr")
    assert "Study nb: 6 trials x 3 epochs, 2 workers" in progress  # not quiet: the run's progress lines
    assert "Stopped: study budget of 6 trials reached." in progress
    got = json.loads(notebook.cells[3].outputs[0]["text"])
    assert len(got["pids"]) == 2 and got["me"] not in got["pids"]  # forked from the kernel
    assert sum(got["counts"].values()) >= 6 and got["test"] == {"test_score": float(got["hidden"])}
    assert Path(tmp_path / "hpo.db").is_file()
