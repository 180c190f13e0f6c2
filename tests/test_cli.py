"""Every CLI command through click's CliRunner, as a user would call it."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import optuna
import pytest

from hpo.cli.run import cli
from tests.conftest import invoke, small_spec

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def finished(write_spec, runner, storage_url) -> str:
    """A finished 4-trial study in a fresh SQLite file."""
    result = invoke(runner, "run", write_spec(small_spec(budget={"n_trials": 4, "epochs": 2})),
                    "--storage", storage_url)
    assert result.exit_code == 0, result.output
    return storage_url


def test_every_command_has_help_with_an_example_and_is_in_the_readme(runner) -> None:
    readme = (ROOT / "README.md").read_text()
    for name, command in cli.commands.items():
        result = invoke(runner, name, "--help")
        assert result.exit_code == 0
        assert "Example:" in result.output, f"hpo {name} --help shows no example"
        assert f"hpo {name}" in readme, f"README does not mention hpo {name}"


def test_studies_lists_the_study(finished, runner) -> None:
    result = invoke(runner, "studies", "--storage", finished)
    assert result.exit_code == 0
    header, row = result.output.strip().splitlines()
    assert header.split() == ["study", "trials", "direction", "best", "created"]
    assert row.split()[:3] == ["small", "4", "maximize"]


def test_best_shows_params_test_score_and_model(finished, runner) -> None:
    study = optuna.load_study(study_name="small", storage=finished)
    text = invoke(runner, "best", "small", "--storage", finished)
    assert text.exit_code == 0
    assert f"Best trial #{study.best_trial.number}" in text.output
    assert "Test accuracy of the best model" in text.output
    data = json.loads(invoke(runner, "best", "small", "--storage", finished, "--format", "json").output)
    assert data["best_value"] == study.best_value and data["params"] == study.best_params
    model = Path(data["test"]["model_path"])
    assert model.is_file() and model.name.endswith("-best_model.pt")  # the artifact, named for a person
    assert model.samefile(model.with_name(data["test"]["model_artifact"]))
    import torch

    bundle = torch.load(model, weights_only=True)
    assert bundle["trial"] == study.best_trial.number and len(bundle["models"]) == 1 and "params" in bundle


def test_trials_in_three_formats(finished, runner) -> None:
    table = invoke(runner, "trials", "small", "--storage", finished)
    assert table.exit_code == 0 and len(table.output.strip().splitlines()) == 5
    rows = list(csv.DictReader(io.StringIO(invoke(runner, "trials", "small", "--storage", finished, "--format", "csv").output)))
    assert [int(r["number"]) for r in rows] == [0, 1, 2, 3]
    assert {"state", "value", "epochs", "params_lr"} <= set(rows[0])
    records = json.loads(invoke(runner, "trials", "small", "--storage", finished, "--format", "json").output)
    assert len(records) == 4 and records[0]["state"] in ("COMPLETE", "PRUNED")


def test_delete_needs_yes_and_removes_files(finished, runner, tmp_path) -> None:
    refused = invoke(runner, "delete", "small", "--storage", finished)
    assert refused.exit_code == 2 and "add --yes" in refused.output
    artifacts = tmp_path / "hpo-artifacts"
    assert any(artifacts.iterdir())
    done = invoke(runner, "delete", "small", "--storage", finished, "--yes")
    assert done.exit_code == 0 and "Deleted study 'small'" in done.output
    assert not any(artifacts.iterdir())
    assert "No studies." in invoke(runner, "studies", "--storage", finished).output


@pytest.mark.parametrize("args,message", [
    (["best", "nosuch"], "Error: no study named 'nosuch'"),
    (["trials", "nosuch"], "Error: no study named 'nosuch'"),
    (["delete", "nosuch", "--yes"], "Error: no study named 'nosuch'"),
])
def test_unknown_study(finished, runner, args, message) -> None:
    result = invoke(runner, *args, "--storage", finished)
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [result.output.strip()]  # one line
    assert result.output.startswith(message) and "studies there: small" in result.output


def test_read_commands_do_not_create_a_database(runner, tmp_path) -> None:
    db = tmp_path / "missing.db"
    result = invoke(runner, "studies", "--storage", f"sqlite:///{db}")
    assert result.exit_code == 1 and "does not exist" in result.output
    assert not db.exists()


def test_default_storage_and_env(write_spec, runner, tmp_path, monkeypatch) -> None:
    path = write_spec(small_spec(budget={"n_trials": 1, "epochs": 1}))
    assert invoke(runner, "run", path).exit_code == 0
    assert (tmp_path / "hpo.db").is_file()  # sqlite:///hpo.db in the working directory
    monkeypatch.setenv("HPO_STORAGE", f"sqlite:///{tmp_path / 'env.db'}")
    assert invoke(runner, "run", path).exit_code == 0
    assert (tmp_path / "env.db").is_file()
    assert "small" in invoke(runner, "studies").output


@pytest.mark.parametrize("args,message", [
    (["--n-trials", "-3"], "Invalid value for '--n-trials'"),
    (["--n-trials", "0"], "Invalid value for '--n-trials'"),
    (["--timeout", "0"], "Invalid value for '--timeout'"),
    (["--device", "tpu"], "Error: --device: unknown device 'tpu'"),
    (["--device", "cuda:7"], "Error: --device: cuda:7 requested but no CUDA GPU"),
])
def test_bad_run_arguments(write_spec, runner, tmp_path, args, message) -> None:
    db = tmp_path / "args.db"
    result = invoke(runner, "run", write_spec(small_spec()), "--storage", f"sqlite:///{db}", *args)
    assert result.exit_code != 0 and message in result.output
    assert "Traceback" not in result.output
    assert not db.exists()


def test_python_dash_m_entry_point(tmp_path) -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "hpo", "--help"], capture_output=True, text=True, check=True)
    assert "Usage: hpo" in out.stdout or "Usage: python -m hpo" in out.stdout


@pytest.mark.parametrize("args", [["--help"], ["validate", "QUICKSTART"], ["studies"], ["best", "small"],
                                  ["trials", "small"], ["show", "small", "0"], ["logs", "small", "0"]],
                         ids=lambda a: a[0])
def test_commands_that_train_nothing_import_no_torch(args, write_spec, runner, storage_url, tmp_path) -> None:
    """Importing torch takes seconds; a command that only reads a study must not pay for it."""
    import subprocess
    import sys

    assert invoke(runner, "run", write_spec(small_spec(budget={"n_trials": 1, "epochs": 1})),
                  "--storage", storage_url).exit_code == 0
    quickstart = str(Path(__file__).resolve().parents[1] / "studies" / "quickstart.yaml")
    argv = [a.replace("QUICKSTART", quickstart) for a in args]
    if args[0] != "--help" and args[0] != "validate":
        argv += ["--storage", storage_url]
    code = ("import sys\nfrom hpo.cli.run import cli\ntry:\n    cli.main(args=%r, prog_name='hpo')\nexcept SystemExit:\n"
            "    pass\nprint('TORCH' if 'torch' in sys.modules else 'NO TORCH')" % argv)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "NO TORCH", done.stdout + done.stderr


def test_every_commands_help_imports_neither_optuna_nor_a_database_driver(tmp_path) -> None:
    """`hpo CMD --help` answers at once (it took ~0.5 s, importing Optuna and SQLAlchemy)."""
    import subprocess
    import sys

    from hpo.cli.run import cli

    for name in sorted(cli.commands):
        code = ("import sys\nsys.argv = ['hpo', %r, '--help']\nfrom hpo.cli import main\ntry:\n    main()\n"
                "except SystemExit:\n    pass\nprint(sorted(m for m in ('optuna', 'sqlalchemy', 'torch') if m in "
                "sys.modules))" % name)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
        assert done.stdout.strip().splitlines()[-1] == "[]", (name, done.stdout[-300:], done.stderr[-300:])


def test_hpo_init_writes_a_starter_that_validates_and_refuses_to_overwrite(runner, tmp_path) -> None:
    made = invoke(runner, "init")
    assert made.exit_code == 0, made.output
    assert made.stdout.strip() == "Wrote study.yaml. Next: hpo validate study.yaml && hpo run study.yaml"
    assert "study.yaml: ok - study" in invoke(runner, "validate", "study.yaml").stdout
    refused = invoke(runner, "init")
    assert refused.exit_code == 1 and refused.output.strip() == ("Error: study.yaml already exists; choose another "
                                                                 "file name or remove it")
    assert invoke(runner, "init", "--force").exit_code == 0
    train = invoke(runner, "init", "--train", "mine/study.yaml")
    assert train.exit_code == 0 and (tmp_path / "mine" / "train.py").is_file()
    checked = invoke(runner, "validate", "mine/study.yaml")
    assert checked.exit_code == 0 and "train function" in checked.stdout, checked.output


def test_a_built_in_study_runs_by_name_and_a_missing_file_lists_them(runner, tmp_path) -> None:
    assert "quickstart: ok - study 'quickstart'" in invoke(runner, "validate", "quickstart").stdout
    missing = invoke(runner, "validate", "quikstart.yaml")
    assert missing.exit_code == 1
    assert "quikstart.yaml: no such file (built-in studies: diabetes_regression, digits_mlp, digits_pareto" in missing.output
    copied = invoke(runner, "init", "--example", "quickstart")
    assert copied.exit_code == 0 and (tmp_path / "quickstart.yaml").read_text().startswith("# A real study")
    wrong = invoke(runner, "init", "--example", "nope")
    assert wrong.exit_code == 1 and "no built-in study named 'nope'; there are: diabetes_regression" in wrong.output


def test_a_flag_beside_the_settings_a_run_gave_its_worker_is_one_line_not_a_silent_choice(runner, monkeypatch,
                                                                                            storage_url) -> None:
    """A worker `hpo run` starts gets its settings from the run (HPO_WORKER_SETTINGS); a flag given
    beside them would be a second source that disagrees."""
    from hpo.execution.processes import ENV_SETTINGS, WorkerSettings

    monkeypatch.setenv(ENV_SETTINGS, WorkerSettings("/tmp/art", "cpu", 1, 10, 30, 2.0).to_json())
    result = invoke(runner, "worker", "small", "--storage", storage_url, "--device", "cuda")
    assert result.exit_code == 2
    assert result.output.strip() == (
        "Error: --device was given to a worker whose settings come from the run that started it "
        "(HPO_WORKER_SETTINGS says device='cpu'); give it to hpo run instead (see: hpo worker --help)")
