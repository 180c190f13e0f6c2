"""The one checkpoint format, written by the trial runtime for every path.

An envelope holds what the runtime needs to resume a trial (the epoch to start from, the metric
curves and epoch times so far) around the training code's own state. hpo's own loop stores each
model's training state in a portable form (weights, optimizer state by parameter name, schedule,
RNG) that the one-at-a-time trainer and a fused group both read and write, so a trial interrupted
in one mode resumes from its checkpoint in the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

FORMAT = 3  # 1 and 2 were the one-at-a-time and fused formats of earlier versions


@dataclass
class Envelope:
    epoch: int  # epochs done: the trial resumes at this epoch
    state: Any  # the training code's own state
    curves: dict[str, list[float]] = field(default_factory=dict)  # every reported metric, per epoch
    epoch_seconds: list[float] = field(default_factory=list)
    rng: dict[str, Any] | None = None  # the random streams when it was saved (hpo.runtime.seeding)

    def to_dict(self) -> dict[str, Any]:
        return {"hpo_checkpoint": FORMAT, "epoch": self.epoch, "state": self.state,
                "curves": self.curves, "epoch_seconds": self.epoch_seconds, "rng": self.rng}

    @staticmethod
    def problem(raw: Any) -> str | None:
        """Why a loaded checkpoint file is not one this version can resume from, or None."""
        if not isinstance(raw, Mapping) or "hpo_checkpoint" not in raw:
            return "not a checkpoint hpo wrote"
        if raw.get("hpo_checkpoint") != FORMAT:
            return f"of checkpoint format {raw.get('hpo_checkpoint')!r}, which this version does not read (it reads {FORMAT})"
        if not isinstance(raw.get("epoch"), int) or not isinstance(raw.get("curves"), Mapping):
            return "not a whole checkpoint (its epoch or curves are missing)"
        return None

    @staticmethod
    def from_dict(raw: Mapping[str, Any] | None) -> Envelope | None:
        """None for a missing checkpoint or one of an older format (that trial starts over)."""
        if not raw or raw.get("hpo_checkpoint") != FORMAT:
            return None
        return Envelope(int(raw["epoch"]), raw["state"], {k: list(v) for k, v in raw["curves"].items()},
                        list(raw["epoch_seconds"]), raw.get("rng"))


_SCALARS = (int, float, bool, str, bytes, type(None), torch.Tensor, torch.dtype, torch.device, torch.Size)


def unsafe_part(obj: Any, path: str = "state", depth: int = 0) -> str | None:
    """Where `obj` holds something torch.load(weights_only=True) would refuse (so a checkpoint is
    data, never code): tensors, numbers, text and lists/tuples/dicts of them only."""
    if depth > 50:
        return f"{path} is nested too deeply"
    if isinstance(obj, _SCALARS):
        return None
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            if (bad := unsafe_part(v, f"{path}[{i}]", depth + 1)) is not None:
                return bad
        return None
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                return f"{path} has a key of type {type(k).__name__}"
            if (bad := unsafe_part(v, f"{path}[{k!r}]", depth + 1)) is not None:
                return bad
        return None
    return f"{path} is a {type(obj).__module__}.{type(obj).__name__}"


# ---- the portable training state of one model (hpo's own loop, fused or not) ----------------


def optimizer_by_name(opt: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
    """An optimizer's state keyed by parameter name and state name, the layout a fused group keeps."""
    names = [n for n, _ in model.named_parameters()]
    raw = opt.state_dict()
    by_name: dict[str, dict[str, torch.Tensor]] = {}
    steps = 0.0
    for index, entry in raw["state"].items():
        for key, value in entry.items():
            if key == "step":
                steps = float(value)
            elif isinstance(value, torch.Tensor):
                by_name.setdefault(key, {})[names[index]] = value
    if not steps and "momentum_buffer" in by_name:
        steps = 1.0  # SGD keeps no step count; a buffer means at least one step was taken
    return {"steps": steps, "lr": float(opt.param_groups[0]["lr"]), "state": by_name, "torch": raw}


def load_optimizer_by_name(opt: torch.optim.Optimizer, model: nn.Module, saved: Mapping[str, Any]) -> None:
    """Inverse of optimizer_by_name; the exact torch.optim state when it was saved unfused."""
    if "torch" in saved:
        opt.load_state_dict(saved["torch"])
    else:
        names = [n for n, _ in model.named_parameters()]
        state: dict[int, dict[str, Any]] = {}
        for i, name in enumerate(names):
            entry: dict[str, Any] = {k: v[name] for k, v in saved["state"].items() if name in v}
            if entry or saved["steps"]:
                if not isinstance(opt, torch.optim.SGD):
                    entry["step"] = torch.tensor(float(saved["steps"]), dtype=torch.float32)
                if entry:
                    state[i] = entry
        raw = opt.state_dict()
        raw["state"] = state
        opt.load_state_dict(raw)
    for group in opt.param_groups:
        group["lr"] = float(saved["lr"])
