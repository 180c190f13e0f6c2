"""PyTorch Lightning inside an hpo trial (issue 27): real Lightning on the CPU, from a user
package created outside the repository. The callback reports each validation epoch, a pruning
decision stops Lightning cleanly and ends the trial as pruned, and a trial whose process was
killed with SIGKILL resumes from Lightning's own checkpoint at the right epoch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from tests.conftest import env_without_storage, need_module, user_package, wait_for

need_module("lightning")

PACKAGE = '''
import os, time
import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from sklearn.datasets import load_digits

from hpo.integrations.lightning import TrialCallback


class Digits(pl.LightningModule):
    def __init__(self, lr, hidden):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def training_step(self, batch, _):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class Hold(pl.Callback):
    """Test hooks: where Lightning started, and a pause after a checkpointed epoch."""

    def __init__(self, trial):
        self.trial = trial

    def on_train_epoch_start(self, trainer, module):
        if not hasattr(self, "first"):  # the first epoch this attempt trains
            self.first = trainer.current_epoch
            self.trial.set_attr("lightning_first_epoch", trainer.current_epoch)

    def on_validation_end(self, trainer, module):
        marker = os.environ.get("MARKER")
        if marker and not trainer.sanity_checking and trainer.current_epoch == 2 and not os.path.exists(marker):
            open(marker, "w").close()
            while True:
                time.sleep(0.05)  # killed here by the test


def loaders():
    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target)
    train = TensorDataset(x[:1400], y[:1400])
    val = TensorDataset(x[1400:], y[1400:])
    return DataLoader(train, batch_size=64, shuffle=True), DataLoader(val, batch_size=512)


def train(trial):
    callback = TrialCallback(trial)
    trainer = pl.Trainer(max_epochs=trial.epochs, callbacks=[callback, Hold(trial)], accelerator="cpu",
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    train_loader, val_loader = loaders()
    trainer.fit(Digits(trial.params["lr"], trial.params["hidden"]), train_loader, val_loader,
                ckpt_path=callback.ckpt_path)
'''


def _spec(tmp_path: Path) -> Path:
    spec = {"name": "light", "train": "lightpkg.module:train", "metric": "val_acc", "direction": "maximize",
            "space": {"lr": {"type": "float", "low": 1e-3, "high": 0.3, "log": True}, "hidden": [16, 32]},
            # Three good configurations first, then one that cannot learn: pruned at once.
            "enqueue": [{"lr": 0.1, "hidden": 32}, {"lr": 0.2, "hidden": 32}, {"lr": 0.05, "hidden": 16},
                        {"lr": 0.001, "hidden": 16}],
            "sampler": {"name": "random"},
            "pruner": {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 0},
            "budget": {"n_trials": 4, "epochs": 5}}
    path = tmp_path / "light.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _run(spec: Path, env: dict[str, str], *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "hpo", "run", str(spec), "--workers", "1",
                             "--checkpoint-interval", "0", *extra], cwd=spec.parent, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.slow
def test_lightning_trials_report_prune_and_resume_after_kill_9(tmp_path, monkeypatch) -> None:
    root = user_package(tmp_path, monkeypatch, "lightpkg", {"module": PACKAGE})
    spec = _spec(tmp_path)
    env = {**env_without_storage(), "PYTHONPATH": str(root), "MARKER": str(tmp_path / "marker")}
    killed = _run(spec, env)
    try:
        wait_for(lambda: (tmp_path / "marker").exists() or killed.poll() is not None, "trial 0's epoch 2", 300)
        assert killed.poll() is None, killed.communicate()
    finally:
        os.killpg(killed.pid, signal.SIGKILL)  # as the out-of-memory killer would
        killed.communicate()
    again = _run(spec, env)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    study = optuna.load_study(study_name="light", storage=f"sqlite:///{tmp_path / 'hpo.db'}")
    by_state = {s: [t for t in study.trials if t.state == s] for s in TrialState}
    assert len(by_state[TrialState.FAIL]) == 1  # the killed attempt, retried
    retry = next(t for t in study.trials if t.system_attrs.get("retry_history") == [0])
    # Lightning resumed from its own checkpoint of epoch 2 at epoch 3; hpo kept the reports before it.
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["lightning_first_epoch"] == 3
    assert retry.user_attrs["resumed_from_epoch"] == 3 and sorted(retry.intermediate_values) == [0, 1, 2, 3, 4]
    assert len(retry.user_attrs["train_loss"]) == 5  # every logged metric, per epoch
    pruned = by_state[TrialState.PRUNED]
    assert [t.params["lr"] for t in pruned] == [0.001]  # the one that cannot learn, stopped cleanly
    assert len(pruned[0].intermediate_values) < 5 and "pruned by the median rule" in pruned[0].user_attrs["reason"]
    assert len(by_state[TrialState.COMPLETE]) == 3 and study.best_value > 0.85
    assert "Traceback" not in err
