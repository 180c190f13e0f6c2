"""Seeds and random streams of the code hpo runs. Python's `random`, NumPy and torch (CPU and
every CUDA device) are seeded before hpo calls the user's functions: `data` with the study's
seed, `train`, `test` and `model` with the trial's, so one worker and the same seed repeat a
trial exactly. A DataLoader's shuffling and its worker processes draw their seeds from torch's
generator, so they follow too.

A checkpoint written by `trial.save_checkpoint()` keeps the three streams' state as they were at
that call, and a resumed trial gets them back before `train` is called: it draws what the
uninterrupted trial would have drawn after that epoch.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_all(seed: int) -> None:
    """Seed Python's `random`, NumPy's global generator and torch (CPU and CUDA) with `seed`."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # NumPy's legacy seed takes 32 bits
    torch.manual_seed(seed)  # every CUDA device too


def capture() -> dict[str, Any]:
    """The three generators' state, as data `torch.load(weights_only=True)` reads back."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict[str, Any]) -> None:
    """Put back what `capture()` kept (a state from another kind of machine is skipped part by part)."""
    if (py := state.get("python")) is not None:
        random.setstate((int(py[0]), tuple(int(v) for v in py[1]), py[2]))
    if (npy := state.get("numpy")) is not None:
        keys = npy[1].numpy().astype(np.uint32)
        np.random.set_state((str(npy[0]), keys, int(npy[2]), int(npy[3]), float(npy[4])))
    if (cpu := state.get("torch")) is not None:
        torch.set_rng_state(cpu)
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
