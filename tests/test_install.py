"""hpo as a user gets it (issue 44): a wheel built from this checkout, installed into a fresh
virtual environment in an empty folder outside the repository; `hpo init` writes a study there
that `hpo validate` accepts and `hpo run` completes, and the built-in studies ship in the wheel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # a wheel, a virtual environment and its install


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin folder of a fresh venv holding the wheel of this checkout (and torch 2.13.0)."""
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(ROOT)],
                   check=True, capture_output=True, text=True, timeout=600)
    wheel = next(dist.glob("hpo-*.whl"))
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "torch==2.13.0", str(wheel)],
                         capture_output=True, text=True, timeout=1200)
    assert pip.returncode == 0, pip.stderr[-3000:]
    return venv / "bin"


def hpo_in(folder: Path, bin_dir: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HPO_", "PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run([str(bin_dir / "hpo"), *args], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_wheel_holds_hpo_and_runs_from_the_venv_not_the_checkout(installed, tmp_path) -> None:
    where = subprocess.run([str(installed / "python"), "-c", "import hpo; print(hpo.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
    assert where.returncode == 0 and str(ROOT) not in where.stdout and "site-packages" in where.stdout


@pytest.mark.parametrize("with_train", [False, True])
def test_hpo_init_in_an_empty_folder_writes_a_study_that_validates_and_runs(installed, tmp_path, with_train) -> None:
    made = hpo_in(tmp_path, installed, "init", *(["--train"] if with_train else []))
    assert made.returncode == 0, made.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == (["study.yaml", "train.py"] if with_train else ["study.yaml"])
    checked = hpo_in(tmp_path, installed, "validate", "study.yaml")
    assert checked.returncode == 0 and ": ok - study" in checked.stdout, checked.stderr
    ran = hpo_in(tmp_path, installed, "run", "study.yaml", "--timeout", "20", "--workers", "1")
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "Best trial #" in ran.stdout and "Test accuracy of the best model" in ran.stdout
    again = hpo_in(tmp_path, installed, "init")
    assert again.returncode == 1 and again.stderr.strip() == ("Error: study.yaml already exists; choose another file "
                                                              "name or remove it")


def test_the_built_in_studies_ship_in_the_wheel(installed, tmp_path) -> None:
    ran = hpo_in(tmp_path, installed, "run", "quickstart", "--n-trials", "2", "--workers", "1")
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "Study quickstart: 2 trials (" in ran.stdout
    copied = hpo_in(tmp_path, installed, "init", "--example", "digits_pareto")
    assert copied.returncode == 0 and (tmp_path / "digits_pareto.yaml").is_file()
    assert hpo_in(tmp_path, installed, "validate", "digits_pareto.yaml").returncode == 0


def test_ci_fails_at_a_step_that_fails_and_runs_no_later_step(tmp_path) -> None:
    """A scratch copy of .ci/run whose install step fails (a dependency that does not exist): CI
    stops there with a non-zero status; the suites never run (an `&&` chain under `set -e` would go
    on to the slow suite and could pass)."""
    scratch = tmp_path / "repo"
    (scratch / ".ci").mkdir(parents=True)
    (scratch / ".ci" / "run").write_text((ROOT / ".ci" / "run").read_text())
    (scratch / "pyproject.toml").write_text('[project]\nname = "broken"\nversion = "0"\n'
                                            'dependencies = ["hpo-no-such-package-anywhere==0.0.0"]\n'
                                            '[project.optional-dependencies]\ndev = []\n')
    (scratch / "tests").mkdir()
    (scratch / "tests" / "test_ran.py").write_text("def test_ran():\n    open('RAN', 'w').close()\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "HPO_"))}
    done = subprocess.run(["bash", str(scratch / ".ci" / "run")], cwd=scratch, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode != 0, done.stdout[-2000:]
    assert "hpo-no-such-package-anywhere" in done.stdout + done.stderr
    assert not (scratch / "RAN").exists() and "default suite:" not in done.stdout
