"""The two time-to-quality problems as a hand-written script has them: data, space and training.

Pure Optuna-free PyTorch and scikit-learn, importing nothing from hpo, so that the hand-written
script (`ttq_script.py`) and hpo running the script's own training as a `train` function share
every line of it. The data are split as hpo splits its own datasets (the same scikit-learn calls
and seed), so hpo's own loop on the equivalent spec scores the same validation set.

- digits: scikit-learn's 1,797 8x8 images, train/val/test 0.70/0.15/0.15, per-feature scaling.
- fashion: Fashion-MNIST (the Debian package `dataset-fashion-mnist`, or $HPO_DATA_DIR), a
  stratified 10,000-image subsample of the training set, train/val 0.85/0.15, one mean and
  standard deviation for all pixels, flattened for an MLP.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FASHION_N_TRAIN = 10_000

# The search space, as the script asks Optuna for it and as an hpo spec writes it.
SPACE: dict[str, dict[str, Any]] = {
    "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
    "batch_size": {"choices": [32, 64, 128]},
    "width": {"type": "int", "low": 64, "high": 512, "log": True},
    "depth": {"type": "int", "low": 1, "high": 3},
    "dropout": {"type": "float", "low": 0.0, "high": 0.5},
    "optimizer": {"choices": ["adam", "momentum"]},
    "momentum": {"type": "float", "low": 0.8, "high": 0.99, "when": {"optimizer": "momentum"}},
}


def spec_space() -> dict[str, Any]:
    """SPACE in hpo's spec syntax."""
    return {name: (p["choices"] if "choices" in p else dict(p)) for name, p in SPACE.items()}


def suggest(trial: Any) -> dict[str, Any]:
    """The script's suggest calls for SPACE (an optuna.Trial)."""
    params: dict[str, Any] = {}
    for name, p in SPACE.items():
        when = p.get("when", {})
        if any(params.get(k) != v for k, v in when.items()):
            continue
        if "choices" in p:
            params[name] = trial.suggest_categorical(name, p["choices"])
        elif p["type"] == "int":
            params[name] = trial.suggest_int(name, p["low"], p["high"], log=p.get("log", False))
        else:
            params[name] = trial.suggest_float(name, p["low"], p["high"], log=p.get("log", False))
    return params


Data = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def load(problem: str, seed: int) -> Data:
    """(x_train, y_train, x_val, y_val), float32 inputs scaled on the training part."""
    from sklearn.model_selection import train_test_split

    if problem == "digits":
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x_dev, _, y_dev, _ = train_test_split(x, y, test_size=0.15, random_state=seed, stratify=y)
        val_share = 0.15 / 0.85
        axis: int | None = 0
    elif problem == "fashion":
        x_all, y_all = _fashion_train()
        x_dev, _, y_dev, _ = train_test_split(x_all, y_all, train_size=FASHION_N_TRAIN, random_state=seed,
                                              stratify=y_all)
        x_dev = x_dev.astype(np.float32) / 255.0
        val_share, axis = 0.15, None
    else:
        raise ValueError(f"unknown problem {problem!r}")
    tr, va = train_test_split(np.arange(len(x_dev)), test_size=val_share, random_state=seed, stratify=y_dev)
    tr, va = np.sort(tr), np.sort(va)
    shift, scale = x_dev[tr].mean(axis=axis), x_dev[tr].std(axis=axis)
    scale = np.where(scale > 1e-12, scale, 1.0)

    def place(x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(((x - shift) / scale).astype(np.float32).reshape(len(x), -1))

    return place(x_dev[tr]), torch.as_tensor(y_dev[tr], dtype=torch.int64), place(x_dev[va]), \
        torch.as_tensor(y_dev[va], dtype=torch.int64)


def _fashion_train() -> tuple[np.ndarray, np.ndarray]:
    folder = Path(os.environ.get("HPO_DATA_DIR", "/usr/share/datasets/fashion-mnist"))

    def idx(name: str, offset: int) -> np.ndarray:
        with gzip.open(folder / name) as f:
            return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)

    x = idx("train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    return x, idx("train-labels-idx1-ubyte.gz", 8).astype(np.int64)


def build(n_in: int, width: int, depth: int, dropout: float) -> nn.Module:
    """hpo's MLP for these parameters: Linear, ReLU, dropout per layer, then the head."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(n_in, width), nn.ReLU(), nn.Dropout(dropout)]
        n_in = width
    return nn.Sequential(*layers, nn.Linear(n_in, 10))


def fit(params: dict[str, Any], data: Data, epochs: int, report: Callable[[int, float], None],
        start_epoch: int = 0) -> float:
    """Train with a DataLoader, score the whole validation set at once after each epoch and hand
    the accuracy to `report` (which raises to prune); returns the last accuracy."""
    x_train, y_train, x_val, y_val = data
    model = build(x_train.shape[1], params["width"], params["depth"], params["dropout"])
    if params["optimizer"] == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=params["lr"])
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=params["lr"], momentum=params["momentum"])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_train, y_train),
                                         batch_size=params["batch_size"], shuffle=True)
    accuracy = 0.0
    for epoch in range(start_epoch, epochs):
        model.train()
        for xb, yb in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(x_val).argmax(1) == y_val).float().mean().item()
        report(epoch, accuracy)
    return accuracy
