"""Each trial's curves as TensorBoard event files (`execution: {tensorboard: true}`).

Every metric a trial reports is written at its epoch, with the epoch's seconds, under
`<artifacts>/tensorboard/<study>/trial-<N>` (N: the first attempt's number, so a retry continues
its curves in the same run), for `tensorboard --logdir <artifacts>/tensorboard/<study>`. The
writer is torch's `SummaryWriter`, which needs the `tensorboard` package (the `tensorboard` extra);
a study that asks for it without the package is refused before it starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hpo.errors import SpecError


def check_available(source: str) -> None:
    """One line, before anything runs, when the spec asks for event files the package cannot write."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise SpecError(f"{source}: execution.tensorboard: needs the tensorboard package: pip install "
                        "'hpo[tensorboard]' (or pip install tensorboard)")


def folder(artifacts: Path, study: str, first_number: int) -> Path:
    return artifacts / "tensorboard" / study / f"trial-{first_number}"


class CurveWriter:
    """Scalars of one trial, written as they are reported (the file is opened at the first)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.writer: Any = None

    def add(self, epoch: int, values: Mapping[str, float], seconds: float) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.path))
        for name, value in values.items():
            self.writer.add_scalar(name, value, epoch)
        self.writer.add_scalar("epoch_seconds", seconds, epoch)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
