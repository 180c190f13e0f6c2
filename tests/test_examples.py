"""Every example in examples/ runs as its README shows, from a folder outside the repository."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from tests.conftest import env_without_storage, missing

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "examples" / "README.md").read_text()


@pytest.mark.parametrize("example", [
    # ~20 s and ~11 s (Lightning's import): in the slow suite, which CI runs too
    pytest.param("fashion_cnn", marks=pytest.mark.slow), "model_factory",
    pytest.param("lightning_digits", marks=pytest.mark.slow), pytest.param("ddp_digits", marks=pytest.mark.slow)])
def test_example_runs_as_its_readme_shows(example: str, tmp_path: Path) -> None:
    spec = ROOT / "examples" / example / "study.yaml"
    if example == "fashion_cnn" and not Path("/usr/share/datasets/fashion-mnist").is_dir():
        missing("the example reads Fashion-MNIST: apt-get install dataset-fashion-mnist")
    assert f"$ hpo run examples/{example}/study.yaml" in README
    # Half the example's budget keeps the suite short; the lines it prints are the same.
    done = subprocess.run([sys.executable, "-m", "hpo", "run", str(spec), "--n-trials", "4"], capture_output=True,
                          text=True, cwd=tmp_path, env=env_without_storage(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.get_all_study_summaries(f"sqlite:///{tmp_path / 'hpo.db'}")[0]
    name = re.search(r"^name: (\S+)", spec.read_text(), re.M).group(1)  # type: ignore[union-attr]
    assert study.study_name == name and study.n_trials > 0
    # The lines the README quotes are the lines the run prints.
    for line in ("Stopped: study budget of", "Test accuracy of the best model: ", "Best model: "):
        assert line in done.stdout + done.stderr and line in README
    assert f"Study {name}: " in done.stdout
