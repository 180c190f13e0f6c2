"""What hpo measures on a trained model for objectives and constraints: its size and its
inference latency on the trial's device."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

LATENCY_RUNS = 30  # timed forward passes; the median is kept (a busy neighbour shows in the mean)
WARMUP_RUNS = 3


def count_parameters(model: nn.Module) -> int:
    return sum(t.numel() for t in model.parameters())


def latency_ms(model: nn.Module, example: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Milliseconds per sample of a forward pass over `batch_size` samples (the first sample of
    `example` repeated), in eval mode without autograd: the median of LATENCY_RUNS timed passes."""
    x = example[:1].to(device)
    x = x.expand(batch_size, *x.shape[1:]).contiguous()
    was_training = model.training
    model.eval()
    times = []
    try:
        with torch.inference_mode():
            for i in range(WARMUP_RUNS + LATENCY_RUNS):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                model(x)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i >= WARMUP_RUNS:
                    times.append(time.perf_counter() - t0)
    finally:
        model.train(was_training)
    return statistics.median(times) * 1000.0 / batch_size
