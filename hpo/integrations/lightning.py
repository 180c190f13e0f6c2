"""PyTorch Lightning in an hpo trial: `TrialCallback` (the `lightning` extra).

```
def train(trial: hpo.Trial) -> None:
    callback = TrialCallback(trial)                       # reports the study's metric every validation
    trainer = L.Trainer(max_epochs=trial.epochs, callbacks=[callback], enable_checkpointing=False)
    trainer.fit(MyModule(trial.params), datamodule=data, ckpt_path=callback.ckpt_path)   # resumes
```

Every validation epoch the callback reports what the module logged (`self.log("val_acc", ...)`)
to the trial: the pruner decides, and the trial's checkpoint is Lightning's own (model,
optimizers, schedulers, loops), written through `trial.save_checkpoint()` when hpo's checkpoint
policy says it is due. A pruning decision or a time limit stops Lightning cleanly (`should_stop`)
and is raised when `fit()` ends, so the trial ends as pruned; Ctrl-C, SIGTERM and `hpo stop`
queue the trial, and a retry (after a crash or `kill -9`) resumes at the epoch after its last
checkpoint with `ckpt_path=callback.ckpt_path`. Optuna's own integration is the model: a
callback on validation end (`optuna_integration.PyTorchLightningPruningCallback`).
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import optuna
import torch

from hpo.runtime.endings import Stop
from hpo.runtime.trial import Trial


class TrialCallback(pl.Callback):
    """Report Lightning's logged metrics to an hpo trial, and checkpoint and resume through it."""

    def __init__(self, trial: Trial) -> None:
        super().__init__()
        self.trial = trial
        self.stopped: BaseException | None = None  # the pruning or time limit that stopped Lightning
        self._folder: tempfile.TemporaryDirectory[str] | None = None

    @property
    def ckpt_path(self) -> str | None:
        """The trial's last Lightning checkpoint as a file for `fit(ckpt_path=...)`, or None on a
        fresh trial."""
        state = self.trial.load_checkpoint()
        if state is None or "lightning" not in state:
            return None
        self._folder = self._folder or tempfile.TemporaryDirectory(prefix="hpo-lightning-")
        path = Path(self._folder.name) / "resume.ckpt"
        torch.save(state["lightning"], path)
        return str(path)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.stopped is not None:
            return
        metrics = {name: float(v) for name, v in trainer.callback_metrics.items() if _scalar(v)}
        try:
            self.trial.report(trainer.current_epoch, **metrics)
            self.trial.save_checkpoint(lambda: {"lightning": _checkpoint(trainer)})
        except (optuna.TrialPruned, Stop) as e:
            self.stopped = e  # Lightning ends the epoch and its loops cleanly; fit() then raises it
            trainer.should_stop = True

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.stopped is not None:
            raise self.stopped

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None


def _scalar(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _checkpoint(trainer: pl.Trainer) -> Any:
    """Lightning's full checkpoint (what `trainer.save_checkpoint` writes), as data."""
    with tempfile.TemporaryDirectory(prefix="hpo-lightning-") as folder:
        path = Path(folder) / "last.ckpt"
        trainer.save_checkpoint(path)
        # Written by this process a moment ago, so read whole; hpo then keeps it as plain data.
        return _plain(torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=False))


def _plain(obj: Any) -> Any:
    """Lightning's dict subclasses (`AttributeDict` of saved hyperparameters) as plain dicts."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj
