"""What a trial did, and getting it back (issue 27): seeded user code that repeats and resumes
its random streams, per-trial logs, `hpo logs` and `hpo show`, the best model back in Python.

User code lives in a package created outside the repository and runs through the real CLI in
fresh processes (a second run in the same process would share torch's state)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from tests.conftest import env_without_storage, user_package

# Draws from Python's random, NumPy and torch, and from a DataLoader that shuffles with 0 or 2
# loader processes (each item carries a draw made in the process that loaded it). MODE=die ends
# the process under trial 0 once, right after its checkpoint of epoch 1.
RANDOMNESS = '''
import os, random
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


class Noise(Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        return torch.tensor(float(i)), torch.rand(())


def draws(loader_workers):
    loader = DataLoader(Noise(), batch_size=4, shuffle=True, num_workers=loader_workers)
    index, noise = next(iter(loader))
    return float(index[0]), float(noise[0])


def train(trial):
    for epoch in range(trial.start_epoch, trial.epochs):
        i0, n0 = draws(0)
        i2, n2 = draws(2)
        values = dict(py=random.random(), np=float(np.random.rand()), torch=float(torch.rand(())),
                      index0=i0, noise0=n0, index2=i2, noise2=n2)
        trial.report(epoch, score=sum(values.values()) * trial.params["scale"], **values)
        trial.save_checkpoint({"epoch": epoch})
        marker = os.environ.get("DIE_MARKER")
        if marker and trial.first_number == 0 and epoch == 1 and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(3)
'''

NAMES = ("py", "np", "torch", "index0", "noise0", "index2", "noise2")


def _spec(tmp_path: Path) -> Path:
    spec = {"name": "draws", "train": "drawpkg.code:train", "metric": "score", "direction": "maximize",
            "seed": 7, "space": {"scale": {"type": "float", "low": 0.5, "high": 2.0}},
            "budget": {"n_trials": 3, "epochs": 4}}
    path = tmp_path / "draws.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _run(spec: Path, db: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hpo", "run", str(spec), "--storage", f"sqlite:///{db}",
                           "--workers", "1", "--checkpoint-interval", "0"],
                          cwd=spec.parent, env={**env_without_storage(), **(env or {})}, capture_output=True,
                          text=True, timeout=300)


def _curves(db: Path) -> dict[int, tuple[dict[str, list[float]], float]]:
    """Each trial's first number -> its drawn curves and its value."""
    study = optuna.load_study(study_name="draws", storage=f"sqlite:///{db}")
    out = {}
    for t in study.get_trials(states=[optuna.trial.TrialState.COMPLETE]):
        first = t.system_attrs.get("retry_history", [t.number])[0] if t.system_attrs.get("retry_history") else t.number
        out[first] = ({name: t.user_attrs[name] for name in NAMES}, t.value)
    return out


@pytest.mark.slow
def test_user_code_repeats_its_draws_and_a_resumed_trial_continues_them(tmp_path, monkeypatch):
    """One worker, the same seed: two fresh runs draw the same values from random, NumPy, torch
    and a DataLoader with 0 and 2 loader processes; a trial whose process died after epoch 1
    resumes from its checkpoint and draws what the uninterrupted trial drew."""
    user_package(tmp_path, monkeypatch, "drawpkg", {"code": RANDOMNESS})
    spec = _spec(tmp_path)
    first, second, crashed = tmp_path / "a.db", tmp_path / "b.db", tmp_path / "c.db"
    for db in (first, second):
        done = _run(spec, db)
        assert done.returncode == 0, done.stderr
    runs = _curves(first), _curves(second)
    assert len(runs[0]) == 3
    assert runs[0] == runs[1]
    values = [v for curves, _ in runs[0].values() for name in ("py", "np", "torch") for v in curves[name]]
    assert len(set(values)) == len(values)  # every draw differs: epochs and trials have streams of their own

    died = _run(spec, crashed, {"DIE_MARKER": str(tmp_path / "died")})
    assert died.returncode == 3, died.stderr
    resumed = _run(spec, crashed)
    assert resumed.returncode == 0, resumed.stderr
    assert "resum" in resumed.stderr
    # Trial 0 came back as a retry (the later trials' numbers, and so their draws, moved on).
    assert _curves(crashed)[0] == runs[0][0]
