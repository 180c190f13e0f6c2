"""Scaling and device placement: the folds (hpo.data.folds) -> per-fold tensors on the device.
Scaling statistics (and, for regression, the target's) come from each fold's train part only, so
nothing of val or test leaks into training.

Whole splits live on the device and the training loop draws batches with a permutation index:
DataLoader collation of in-memory tensors costs a large share of a small model's epoch on a CPU
and far more on a GPU (torch issue #106704; measured in benchmarks/RESULTS.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hpo.data.folds import RawData, load_raw, split
from hpo.data.sources import Source
from hpo.data.user import Stream, UserData, load_user_data
from hpo.errors import DataError
from hpo.spec.schema import DataSpec


@dataclass(frozen=True)
class Split:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclass(frozen=True)
class Scaling:
    """How a fold's raw inputs (and a regression's targets) were scaled for its model: x' = (x -
    x_shift) / x_scale, fitted on the fold's training part; a saved model carries it."""

    x_shift: torch.Tensor
    x_scale: torch.Tensor
    y_shift: float = 0.0
    y_scale: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"x_shift": self.x_shift, "x_scale": self.x_scale, "y_shift": self.y_shift, "y_scale": self.y_scale}


@dataclass(frozen=True)
class Data:
    """One fold, scaled and on the device (or, for user data too large for it, streamed)."""

    train: Split | Stream
    val: Split | Stream
    test: Split | Stream
    input_shape: tuple[int, ...]
    n_outputs: int
    task: str
    scaling: Scaling | None = None  # None: streamed data, which is not scaled


def user_source(data: UserData) -> Source:
    """A user's resident data as a Source: one set to split, or train (+ val) and test."""
    assert data.arrays is not None
    parts = data.arrays
    if "all" in parts:
        return Source(*parts["all"], data.task, data.n_outputs)
    x, y = parts["train"]
    n_train = None
    if "val" in parts:
        n_train = len(x)
        x, y = np.concatenate([x, parts["val"][0]]), np.concatenate([y, parts["val"][1]])
    return Source(x, y, data.task, data.n_outputs, parts["test"][0], parts["test"][1], n_train=n_train)


def _scaler(x_train: np.ndarray, scaling: str) -> tuple[np.ndarray, np.ndarray]:
    """(shift, scale) fitted on train: per feature for tables, one pair for images."""
    axis: Any = 0 if x_train.ndim == 2 else None
    if scaling == "standard":
        shift, scale = x_train.mean(axis=axis), x_train.std(axis=axis)
    elif scaling == "minmax":
        shift = x_train.min(axis=axis)
        scale = x_train.max(axis=axis) - shift
    else:
        return np.zeros((), np.float32), np.ones((), np.float32)
    scale = np.where(scale > 1e-12, scale, 1.0)  # constant features (digits' blank border)
    return np.asarray(shift, np.float32), np.asarray(scale, np.float32)


def to_device(raw: RawData, fold: int, scaling: str, device: torch.device) -> Data:
    tr, va = raw.folds[fold]
    x_train = raw.x_dev[tr]
    shift, scale = _scaler(x_train, scaling)
    regression = raw.task == "regression"
    y_shift, y_scale = 0.0, 1.0
    if regression:  # train on a standardized target: val_mse 1.0 means "no better than the mean"
        y_shift, y_scale = float(raw.y_dev[tr].mean()), float(raw.y_dev[tr].std() or 1.0)
    y_dtype = torch.float32 if regression else torch.int64

    def place(x: np.ndarray, y: np.ndarray) -> Split:
        xs = ((x - shift) / scale).astype(np.float32)
        ys = ((y - y_shift) / y_scale).astype(np.float32) if regression else y
        return Split(torch.as_tensor(xs).to(device).contiguous(),
                     torch.as_tensor(ys).to(device=device, dtype=y_dtype))

    return Data(
        train=place(x_train, raw.y_dev[tr]),
        val=place(raw.x_dev[va], raw.y_dev[va]),
        test=place(raw.x_test, raw.y_test),
        input_shape=raw.input_shape,
        n_outputs=raw.n_outputs,
        task=raw.task,
        scaling=Scaling(torch.from_numpy(shift.copy()), torch.from_numpy(scale.copy()), y_shift, y_scale),
    )


class DataCache:
    """Loads a dataset once per worker and keeps one scaled copy per scaling on the device."""

    def __init__(self, spec: DataSpec, seed: int, device: torch.device, model: str = "mlp",
                 raw: RawData | None = None) -> None:
        """`raw`: the dataset already loaded and split (by hpo run's head start)."""
        self.streamed: Data | None = None
        if raw is not None:
            self.raw = raw
        elif spec.is_user:
            user = load_user_data(spec, device, seed)
            if user.streams is not None:
                s = user.streams
                self.streamed = Data(s["train"], s["val"], s["test"], user.input_shape, user.n_outputs, user.task)
                self.device = device
                return
            self.raw = split(user_source(user), spec, seed)
        else:
            self.raw = load_raw(spec, seed)
        if model == "cnn" and len(self.raw.input_shape) != 3:
            raise DataError(
                f"model: cnn needs images (N x H x W or N x C x H x W), but the data is {self.raw.x_dev.shape}"
            )
        self.device = device
        self._scaled: dict[str, list[Data]] = {}

    @property
    def n_folds(self) -> int:
        return 1 if self.streamed is not None else len(self.raw.folds)

    def folds(self, scaling: str) -> list[Data]:
        if self.streamed is not None:
            return [self.streamed]  # fed as the Dataset returns it: `scaling` applies to resident data
        if scaling not in self._scaled:
            self._scaled[scaling] = [to_device(self.raw, k, scaling, self.device) for k in range(self.n_folds)]
        return self._scaled[scaling]

    def get(self, scaling: str) -> Data:
        """The first (without CV: the only) fold."""
        return self.folds(scaling)[0]
