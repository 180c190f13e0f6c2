"""Fashion-MNIST from its IDX files (Debian's dataset-fashion-mnist), as a torch Dataset."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

FOLDER = Path(os.environ.get("HPO_DATA_DIR", "/usr/share/datasets/fashion-mnist"))


def read_idx(name: str) -> np.ndarray:
    with gzip.open(FOLDER / name, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


class FashionMNIST(Dataset):
    """`part`: train (the first n images of the training file), val (the last n) or test."""

    classes = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"]

    def __init__(self, part: str, n: int) -> None:
        prefix = "t10k" if part == "test" else "train"
        images = read_idx(f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(f"{prefix}-labels-idx1-ubyte.gz")
        rows = slice(len(images) - n, None) if part == "val" else slice(0, n)
        self.x = torch.tensor(images[rows], dtype=torch.float32).unsqueeze(1).div_(255).sub_(0.286).div_(0.353)
        self.y = torch.tensor(labels[rows], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]
