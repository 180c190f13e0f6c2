"""`hpo run` started from a shell, where torch is not imported yet, makes its data and a new SQLite
file's tables in a second process while it imports torch (hpo.execution.headstart). In-process runs
(CliRunner, torch already imported) never take that path, so these start `hpo` as a user does. What
a user would notice if it went wrong: other trials than the same run without it, or files left
behind by a run that was refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from tests.conftest import env_without_storage, invoke, small_spec


def _hpo(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hpo", *args], cwd=cwd, env=env_without_storage(),
                          capture_output=True, text=True, timeout=300)


def _values(url: str) -> list[tuple[str, list[float] | None]]:
    return [(t.state.name, t.values) for t in optuna.load_study(study_name="small", storage=url).trials]


def test_a_run_started_from_the_shell_draws_the_same_trials_as_one_in_process(write_spec, runner, tmp_path) -> None:
    """The data split in the second process is the one the run would have made: the same seed
    gives the same trials and values as an in-process run (which loads the data itself)."""
    spec = write_spec(small_spec(budget={"n_trials": 3, "epochs": 2}))
    shell = _hpo(tmp_path, "run", str(spec), "-q", "--workers", "1", "--storage", "sqlite:///shell.db")
    assert shell.returncode == 0, shell.stderr
    assert invoke(runner, "run", spec, "-q", "--storage", "sqlite:///here.db").exit_code == 0
    assert _values(f"sqlite:///{tmp_path / 'shell.db'}") == _values(f"sqlite:///{tmp_path / 'here.db'}")


@pytest.mark.parametrize("case", ["data", "user-code", "device"])
def test_a_run_refused_at_start_up_leaves_no_file_behind(write_spec, tmp_path, case) -> None:
    """A mistake found while the second process has already made the new file's tables (a CSV
    without the label column it names, a train function that does not exist, a device that is
    not there): one line, exit 1, and the folder holds what it held before."""
    (tmp_path / "t.csv").write_text("a,b,species\n1,2,x\n3,4,y\n5,6,x\n7,8,y\n9,1,x\n")
    doc, args, message = {
        "data": (small_spec(data={"dataset": "csv", "path": "t.csv", "label": "label"}), [], "has no column 'label'"),
        "user-code": ({**{k: v for k, v in small_spec().items() if k != "data"}, "train": "json:no_such_function"}, [],
                      "'json' has no 'no_such_function'"),
        "device": (small_spec(), ["--device", "cuda:7"], "cuda:7"),
    }[case]
    spec = write_spec(doc)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = _hpo(tmp_path, "run", str(spec), *args)
    assert result.returncode == 1
    assert result.stderr.startswith("Error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
