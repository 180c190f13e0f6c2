"""Your architecture, hpo's loop: a factory that builds the model from the trial's parameters.

hpo calls build(params, input_shape, n_outputs) for every trial and trains the result with its own
loop (optimizer, schedule, normalisation of inputs, checkpoints, test scoring); `params` holds the
built-in parameters (lr, batch_size, dropout, ...) and your own (here `blocks`, `expansion`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, width: int, expansion: int, dropout: float) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width * expansion), nn.GELU(),
                                  nn.Dropout(dropout), nn.Linear(width * expansion, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def build(params: Mapping[str, Any], input_shape: tuple[int, ...], n_outputs: int) -> nn.Module:
    width = params["width"]
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), width),
        *(Block(width, params["expansion"], params["dropout"]) for _ in range(params["blocks"])),
        nn.LayerNorm(width),
        nn.Linear(width, n_outputs),
    )
