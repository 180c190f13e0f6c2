"""The benchmark problem suite: problems a user brings, as a hand-written script has them.

Each problem is its data (offline: bundled with scikit-learn, the Debian Fashion-MNIST files, or
generated), its search space, and its training code: plain PyTorch (one problem through PyTorch
Lightning) importing nothing from hpo, so the hand-written Optuna script (`ttq_script.py`) and hpo
running the same code as a `train` function share every line of it.

The problems are split, here and nowhere else, into DEVELOPMENT problems, on which hpo's defaults
may be chosen, and HELD_OUT problems, which are only reported: a default chosen on a problem
says little about the problems nobody measured.

Each problem's budget (trials x epochs) is what its script runs; on a 2-core machine the scripts
take about 15 s (digits) to 100 s (Fashion-MNIST MLP).
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Data = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # x_train, y_train, x_val, y_val
Report = Callable[[int, float], None]  # (epoch, value): raises to prune


@dataclass(frozen=True)
class Problem:
    name: str
    split: str  # "development" (defaults may be chosen on it) or "held-out" (only reported)
    about: str
    metric: str  # what is reported each epoch
    direction: str  # "maximize" or "minimize"
    trials: int
    epochs: int
    space: dict[str, dict[str, Any]]
    load: Callable[[int], Data]
    fit: Callable[[dict[str, Any], Data, int, Report], float]
    lightning: bool = False  # trained by PyTorch Lightning: hpo's side uses its TrialCallback
    unit: float = 1.0  # one unit of the metric as reported (accuracy: 100 points)
    tags: tuple[str, ...] = field(default=())

    def better(self, a: float, b: float) -> bool:
        return a >= b - 1e-9 if self.direction == "maximize" else a <= b + 1e-9

    def gain(self, mine: float, theirs: float) -> float:
        """How much better `mine` is than `theirs`, in the problem's unit (accuracy: points; RMSE: as is)."""
        sign = 1.0 if self.direction == "maximize" else -1.0
        return (mine - theirs) * sign * self.unit


# ---- spaces ------------------------------------------------------------------------------------

MLP_SPACE: dict[str, dict[str, Any]] = {
    "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
    "batch_size": {"choices": [32, 64, 128]},
    "width": {"type": "int", "low": 64, "high": 512, "log": True},
    "depth": {"type": "int", "low": 1, "high": 3},
    "dropout": {"type": "float", "low": 0.0, "high": 0.5},
    "optimizer": {"choices": ["adam", "momentum"]},
    "momentum": {"type": "float", "low": 0.8, "high": 0.99, "when": {"optimizer": "momentum"}},
}
REGRESSION_SPACE: dict[str, dict[str, Any]] = {
    "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
    "batch_size": {"choices": [16, 32, 64]},
    "width": {"type": "int", "low": 16, "high": 256, "log": True},
    "depth": {"type": "int", "low": 1, "high": 3},
    "dropout": {"type": "float", "low": 0.0, "high": 0.5},
    "weight_decay": {"type": "float", "low": 1e-6, "high": 1e-1, "log": True},
    "optimizer": {"choices": ["adam", "momentum"]},
    "momentum": {"type": "float", "low": 0.8, "high": 0.99, "when": {"optimizer": "momentum"}},
}
CNN_SPACE: dict[str, dict[str, Any]] = {
    "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
    "batch_size": {"choices": [32, 64, 128]},
    "channels": {"type": "int", "low": 4, "high": 16, "log": True},
    "dropout": {"type": "float", "low": 0.0, "high": 0.5},
    "optimizer": {"choices": ["adam", "momentum"]},
    "momentum": {"type": "float", "low": 0.8, "high": 0.99, "when": {"optimizer": "momentum"}},
}
SERIES_SPACE: dict[str, dict[str, Any]] = {
    "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
    "batch_size": {"choices": [32, 64, 128]},
    "width": {"type": "int", "low": 8, "high": 64, "log": True},
    "dropout": {"type": "float", "low": 0.0, "high": 0.5},
    "optimizer": {"choices": ["adam", "momentum"]},
    "momentum": {"type": "float", "low": 0.8, "high": 0.99, "when": {"optimizer": "momentum"}},
}


def spec_space(problem: Problem) -> dict[str, Any]:
    """The problem's space in hpo's spec syntax."""
    return {name: (p["choices"] if "choices" in p else dict(p)) for name, p in problem.space.items()}


def suggest(trial: Any, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The script's suggest calls for a space (an optuna.Trial)."""
    params: dict[str, Any] = {}
    for name, p in space.items():
        if any(params.get(k) != v for k, v in p.get("when", {}).items()):
            continue
        if "choices" in p:
            params[name] = trial.suggest_categorical(name, p["choices"])
        elif p["type"] == "int":
            params[name] = trial.suggest_int(name, p["low"], p["high"], log=p.get("log", False))
        else:
            params[name] = trial.suggest_float(name, p["low"], p["high"], log=p.get("log", False))
    return params


# ---- data --------------------------------------------------------------------------------------


def _split(x: np.ndarray, y: np.ndarray, val: float, seed: int, stratify: bool, axis: int | None = 0) -> Data:
    """Train/validation split by the seed, inputs scaled on the training part."""
    from sklearn.model_selection import train_test_split

    tr, va = train_test_split(np.arange(len(x)), test_size=val, random_state=seed, stratify=y if stratify else None)
    tr, va = np.sort(tr), np.sort(va)
    shift, scale = x[tr].mean(axis=axis), x[tr].std(axis=axis)
    scale = np.where(scale > 1e-12, scale, 1.0)

    def place(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(((a - shift) / scale).astype(np.float32))

    label = torch.int64 if stratify else torch.float32
    return place(x[tr]), torch.as_tensor(y[tr], dtype=label), place(x[va]), torch.as_tensor(y[va], dtype=label)


def load_digits(seed: int) -> Data:
    """scikit-learn's 1,797 8x8 digits: a 15% test part set aside, then 0.70/0.15 train/val."""
    from sklearn.datasets import load_digits as digits
    from sklearn.model_selection import train_test_split

    x, y = digits(return_X_y=True)
    x_dev, _, y_dev, _ = train_test_split(x, y, test_size=0.15, random_state=seed, stratify=y)
    return _split(x_dev, y_dev, 0.15 / 0.85, seed, True)


def fashion_images() -> tuple[np.ndarray, np.ndarray]:
    folder = Path(os.environ.get("HPO_DATA_DIR", "/usr/share/datasets/fashion-mnist"))

    def idx(name: str, offset: int) -> np.ndarray:
        with gzip.open(folder / name) as f:
            return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)

    x = idx("train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    return x, idx("train-labels-idx1-ubyte.gz", 8).astype(np.int64)


def _fashion(n: int, seed: int, flat: bool) -> Data:
    from sklearn.model_selection import train_test_split

    x_all, y_all = fashion_images()
    x, _, y, _ = train_test_split(x_all, y_all, train_size=n, random_state=seed, stratify=y_all)
    x = x.astype(np.float32) / 255.0
    x = x.reshape(len(x), -1) if flat else x.reshape(len(x), 1, 28, 28)
    return _split(x, y, 0.15, seed, True, axis=None)


def load_fashion(seed: int) -> Data:
    """Fashion-MNIST, a stratified 10,000-image subsample, 0.85/0.15, flattened for an MLP."""
    return _fashion(10_000, seed, flat=True)


def load_fashion_small(seed: int) -> Data:
    """Fashion-MNIST, 3,000 images as 1x28x28 for a CNN."""
    return _fashion(3_000, seed, flat=False)


def load_tabular(seed: int) -> Data:
    """A tabular classification with redundant and noisy features and 3% label noise (6,000 rows,
    30 features, 3 classes), generated once; the split changes with the seed."""
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=6000, n_features=30, n_informative=10, n_redundant=6, n_classes=3,
                               n_clusters_per_class=2, flip_y=0.03, class_sep=0.8, random_state=20261206)
    return _split(x, y, 0.2, seed, True)


def _regression(x: np.ndarray, y: np.ndarray, seed: int) -> Data:
    y = (y - y.mean()) / y.std()  # the target in standard units: RMSE 1.0 is predicting the mean
    return _split(x, y.astype(np.float32), 0.2, seed, False)


def load_diabetes(seed: int) -> Data:
    """scikit-learn's diabetes progression (442 patients, 10 features): small and noisy."""
    from sklearn.datasets import load_diabetes as diabetes

    x, y = diabetes(return_X_y=True)
    return _regression(x, y, seed)


def load_friedman(seed: int) -> Data:
    """Friedman's #1 regression (3,000 rows, 10 features of which 5 matter, noise 1.0), generated once."""
    from sklearn.datasets import make_friedman1

    x, y = make_friedman1(n_samples=3000, n_features=10, noise=1.0, random_state=20261206)
    return _regression(x, y, seed)


def load_series(seed: int) -> Data:
    """Next-value prediction on a generated series: three sines of drifting amplitude plus AR(1)
    noise, windows of 24 steps (2,400 windows), the split by the seed."""
    rng = np.random.default_rng(20261206)
    t = np.arange(2424, dtype=np.float64)
    signal = (np.sin(2 * np.pi * t / 37) * (1 + 0.3 * np.sin(t / 400)) + 0.6 * np.sin(2 * np.pi * t / 11 + 1)
              + 0.3 * np.sin(2 * np.pi * t / 5.3))
    noise = np.zeros_like(t)
    for i in range(1, len(t)):
        noise[i] = 0.7 * noise[i - 1] + 0.25 * rng.standard_normal()
    s = signal + noise
    windows = np.lib.stride_tricks.sliding_window_view(s, 25)
    x, y = windows[:, :24, None], windows[:, 24]
    return _regression(x, y, seed)


# ---- training ----------------------------------------------------------------------------------


def _optimizer(params: dict[str, Any], model: nn.Module) -> torch.optim.Optimizer:
    decay = params.get("weight_decay", 0.0)
    if params["optimizer"] == "adam":
        return torch.optim.Adam(model.parameters(), lr=params["lr"], weight_decay=decay)
    return torch.optim.SGD(model.parameters(), lr=params["lr"], momentum=params["momentum"], weight_decay=decay)


def mlp(n_in: int, n_out: int, width: int, depth: int, dropout: float) -> nn.Module:
    """Linear, ReLU, dropout per layer, then the head."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(n_in, width), nn.ReLU(), nn.Dropout(dropout)]
        n_in = width
    return nn.Sequential(*layers, nn.Linear(n_in, n_out))


class SmallCNN(nn.Module):
    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        c = channels
        self.body = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                  nn.Dropout(dropout), nn.Linear(2 * c * 49, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.body(x)
        return out


class SeriesGRU(nn.Module):
    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__()
        self.gru = nn.GRU(1, hidden, batch_first=True)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x)
        pred: torch.Tensor = self.head(out[:, -1]).squeeze(1)
        return pred


def _loop(model: nn.Module, params: dict[str, Any], data: Data, epochs: int, report: Report,
          loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
          score: Callable[[torch.Tensor, torch.Tensor], float]) -> float:
    """Train with a DataLoader, score the whole validation set at once after each epoch and hand
    the score to `report` (which raises to prune); returns the last score."""
    x_train, y_train, x_val, y_val = data
    optimizer = _optimizer(params, model)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_train, y_train),
                                         batch_size=params["batch_size"], shuffle=True)
    value = float("nan")
    for epoch in range(epochs):
        model.train()
        for xb, yb in loader:
            optimizer.zero_grad()
            loss_fn(model(xb), yb).backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            value = score(model(x_val), y_val)
        report(epoch, value)
    return value


def accuracy(out: torch.Tensor, y: torch.Tensor) -> float:
    return float((out.argmax(1) == y).float().mean())


def rmse(out: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.sqrt(F.mse_loss(out, y)))


def fit_classifier(params: dict[str, Any], data: Data, epochs: int, report: Report) -> float:
    n_classes = int(data[1].max()) + 1
    model = mlp(data[0].shape[1], n_classes, params["width"], params["depth"], params["dropout"])
    return _loop(model, params, data, epochs, report, F.cross_entropy, accuracy)


def fit_cnn(params: dict[str, Any], data: Data, epochs: int, report: Report) -> float:
    return _loop(SmallCNN(params["channels"], params["dropout"]), params, data, epochs, report, F.cross_entropy,
                 accuracy)


def fit_regressor(params: dict[str, Any], data: Data, epochs: int, report: Report) -> float:
    model = nn.Sequential(mlp(data[0].shape[1], 1, params["width"], params["depth"], params["dropout"]),
                          nn.Flatten(0))
    return _loop(model, params, data, epochs, report, F.mse_loss, rmse)


def fit_series(params: dict[str, Any], data: Data, epochs: int, report: Report) -> float:
    return _loop(SeriesGRU(params["width"], params["dropout"]), params, data, epochs, report, F.mse_loss, rmse)


def lightning_module(params: dict[str, Any], n_in: int) -> Any:
    """The Lightning problem's module: the regression MLP, logging val_rmse every validation epoch."""
    import lightning.pytorch as pl

    class Regressor(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(mlp(n_in, 1, params["width"], params["depth"], params["dropout"]),
                                     nn.Flatten(0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.net(x)
            return out

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return F.mse_loss(self(x), y)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val_rmse", torch.sqrt(F.mse_loss(self(x), y)))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return _optimizer(params, self)

    return Regressor()


def fit_lightning(params: dict[str, Any], data: Data, epochs: int, callback: Any) -> None:
    """Train the Lightning problem with `callback` (the script's pruning callback, or hpo's TrialCallback)."""
    import logging
    import warnings

    import lightning.pytorch as pl

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    x_train, y_train, x_val, y_val = data
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_train, y_train),
                                        batch_size=params["batch_size"], shuffle=True)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_val, y_val), batch_size=len(x_val))
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[callback], accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    trainer.fit(lightning_module(params, x_train.shape[1]), train, val,
                ckpt_path=getattr(callback, "ckpt_path", None))


def fit_lightning_reporting(params: dict[str, Any], data: Data, epochs: int, report: Report) -> float:
    """The Lightning problem as the script runs it: a callback hands val_rmse to `report` each
    validation epoch, as optuna-integration's PyTorchLightningPruningCallback does."""
    import lightning.pytorch as pl

    class Reporting(pl.Callback):
        def __init__(self) -> None:
            self.last = float("nan")

        def on_validation_end(self, trainer: Any, module: Any) -> None:
            self.last = float(trainer.callback_metrics["val_rmse"])
            report(trainer.current_epoch, self.last)

    callback = Reporting()
    fit_lightning(params, data, epochs, callback)
    return callback.last


# ---- the suite ---------------------------------------------------------------------------------

PROBLEMS: dict[str, Problem] = {p.name: p for p in (
    Problem("digits", "development", "digits MLP (scikit-learn's 1,797 8x8 images)", "val_accuracy", "maximize",
            30, 15, MLP_SPACE, load_digits, fit_classifier, unit=100),
    Problem("fashion", "development", "Fashion-MNIST MLP (10,000 images)", "val_accuracy", "maximize",
            30, 15, MLP_SPACE, load_fashion, fit_classifier, unit=100),
    Problem("tabular", "development", "tabular classification (6,000 generated rows, 30 features, label noise)",
            "val_accuracy", "maximize", 30, 20, MLP_SPACE, load_tabular, fit_classifier, unit=100),
    Problem("fashion_cnn", "held-out", "Fashion-MNIST small CNN (3,000 images)", "val_accuracy", "maximize",
            16, 8, CNN_SPACE, load_fashion_small, fit_cnn, unit=100),
    Problem("diabetes", "held-out", "tabular regression (scikit-learn's diabetes, 442 rows), RMSE in standard units",
            "val_rmse", "minimize", 40, 40, REGRESSION_SPACE, load_diabetes, fit_regressor),
    Problem("series", "held-out", "next-value GRU on a generated series (2,400 windows of 24 steps)", "val_rmse",
            "minimize", 20, 12, SERIES_SPACE, load_series, fit_series),
    Problem("lightning", "held-out", "PyTorch Lightning regression MLP (Friedman #1, 3,000 rows)", "val_rmse",
            "minimize", 20, 15, REGRESSION_SPACE, load_friedman, fit_lightning_reporting, lightning=True),
)}
DEVELOPMENT = tuple(n for n, p in PROBLEMS.items() if p.split == "development")
HELD_OUT = tuple(n for n, p in PROBLEMS.items() if p.split == "held-out")
