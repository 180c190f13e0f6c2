"""A PyTorch Lightning module tuned by hpo: the trial's callback reports every validation epoch,
prunes, and checkpoints through the trial (kill -9 and run again: it resumes at the next epoch)."""

import logging
import warnings

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hpo
from hpo.integrations.lightning import TrialCallback

# Lightning's banner, hints and deprecation notes, once per trial, would fill each trial's log.
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", module="lightning")


class DigitsNet(pl.LightningModule):
    def __init__(self, hidden: int, dropout: float, lr: float, weight_decay: float) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        self.log("val_loss", nn.functional.cross_entropy(out, y))
        self.log("val_accuracy", (out.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


def splits() -> dict[str, TensorDataset]:
    """Digits, 60/20/20, the same split every time."""
    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    a, b = int(0.6 * len(x)), int(0.8 * len(x))
    return {"train": TensorDataset(x[:a], y[:a]), "val": TensorDataset(x[a:b], y[a:b]),
            "test": TensorDataset(x[b:], y[b:])}


def build(params: dict) -> DigitsNet:
    return DigitsNet(params["hidden"], params["dropout"], params["lr"], params["weight_decay"])


def train(trial: hpo.Trial) -> None:
    data = splits()
    callback = TrialCallback(trial)
    trainer = pl.Trainer(max_epochs=trial.epochs, callbacks=[callback], accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(build(trial.params), DataLoader(data["train"], batch_size=trial.params["batch_size"], shuffle=True),
                DataLoader(data["val"], batch_size=512), ckpt_path=callback.ckpt_path)


def test(trial: hpo.Trial) -> dict:
    """Once, on the best trial: its final Lightning checkpoint, scored on the test split."""
    model = build(trial.params)
    model.load_state_dict(trial.load_checkpoint()["lightning"]["state_dict"])
    model.eval()
    x, y = data_tensors(splits()["test"])
    with torch.no_grad():
        return {"test_accuracy": (model(x).argmax(1) == y).float().mean().item()}


def data_tensors(dataset: TensorDataset) -> tuple[torch.Tensor, torch.Tensor]:
    return dataset.tensors[0], dataset.tensors[1]
