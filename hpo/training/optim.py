"""Optimizer and learning-rate schedule factories by name."""

from __future__ import annotations

from typing import Any

import torch

from hpo.spec.params import Params


def make_optimizer(params: Any, p: Params, device: torch.device) -> torch.optim.Optimizer:
    """Build the optimizer; `params` is what `model.parameters()` returns."""
    # torch.optim's fused kernels: one pass over memory per step where the default takes a dozen
    # per parameter tensor (a faster epoch on a CPU: benchmarks/RESULTS.md), one launch on a GPU.
    fused = {"fused": True} if device.type in ("cuda", "cpu") else {}
    o = p.optimizer
    if o == "sgd":
        return torch.optim.SGD(params, lr=p.lr, weight_decay=p.weight_decay, **fused)
    if o in ("momentum", "nesterov"):
        return torch.optim.SGD(
            params,
            lr=p.lr,
            momentum=p.momentum,
            nesterov=o == "nesterov",
            weight_decay=p.weight_decay,
            **fused,
        )
    if o == "rmsprop":
        return torch.optim.RMSprop(params, lr=p.lr, weight_decay=p.weight_decay)
    if o == "adagrad":
        return torch.optim.Adagrad(params, lr=p.lr, weight_decay=p.weight_decay, fused=device.type == "cpu" or None)
    betas = (p.beta1, p.beta2)
    if o == "adam":
        return torch.optim.Adam(params, lr=p.lr, betas=betas, weight_decay=p.weight_decay, **fused)
    if o == "adamw":
        return torch.optim.AdamW(params, lr=p.lr, betas=betas, weight_decay=p.weight_decay, **fused)
    if o == "schedulefree_adamw":
        import schedulefree

        return schedulefree.AdamWScheduleFree(  # type: ignore[no-any-return]
            params, lr=p.lr, betas=betas, weight_decay=p.weight_decay
        )
    raise ValueError(f"unknown optimizer {o!r}")


def train_mode(opt: torch.optim.Optimizer) -> None:
    """Schedule-free optimizers keep two sets of weights and must be told which phase it is."""
    if hasattr(opt, "train") and callable(opt.train):
        opt.train()


def eval_mode(opt: torch.optim.Optimizer) -> None:
    if hasattr(opt, "eval") and callable(opt.eval):
        opt.eval()


class Schedule:
    """One interface over PyTorch's schedulers: some step per batch, some per epoch, one on a metric."""

    def __init__(self, p: Params, opt: torch.optim.Optimizer, epochs: int, steps_per_epoch: int):
        s = torch.optim.lr_scheduler
        self.name = p.scheduler
        self.sched: Any = None
        if self.name == "step":
            self.sched = s.StepLR(opt, step_size=max(1, epochs // 3), gamma=p.step_gamma)
        elif self.name == "cosine":
            self.sched = s.CosineAnnealingLR(opt, T_max=epochs)
        elif self.name == "onecycle":
            self.sched = s.OneCycleLR(
                opt,
                max_lr=p.lr,
                total_steps=max(2, epochs * steps_per_epoch),
                cycle_momentum=False,  # not every optimizer has a momentum to cycle
            )
        elif self.name == "plateau":
            self.sched = s.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=2)

    def after_batch(self) -> None:
        if self.name == "onecycle":
            self.sched.step()

    def after_epoch(self, val_loss: float) -> None:
        if self.name in ("step", "cosine"):
            self.sched.step()
        elif self.name == "plateau":
            self.sched.step(val_loss)

    def state_dict(self) -> dict[str, Any]:
        return self.sched.state_dict() if self.sched is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.sched is not None:
            self.sched.load_state_dict(state)
