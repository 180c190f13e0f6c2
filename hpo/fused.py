"""Fused training: K MLPs with the same structure trained as one batched model.

A small model cannot fill a GPU (or even two CPU cores): each step is a handful of tiny kernels
and the time goes to launches and Python. Stacking K models' weights along a leading member
dimension turns K small matmuls into one `baddbmm`, and K optimizer updates into one update over
a (K, P) tensor (HFTA, MLSys 2021).

What is per member, and why it can be:
- weights (initialised exactly as an unfused run with the member's seed would),
- batch order (each member has its own generator, as an unfused Trainer does),
- learning rate and its schedule (each member keeps a real PyTorch scheduler driving a one-value
  dummy optimizer; its current lr feeds a (K, 1) tensor), weight decay, momentum, betas,
  dropout rate, init, BatchNorm statistics.

What the group shares, and why it must: everything that changes tensor shapes or the update
rule: depth, width, norm, residual, batch size, input scaling and the optimizer algorithm. A
group's members are therefore sampled with those parameters fixed to the group leader's
(Optuna's PartialFixedSampler), and the rest sampled freely. The trade-off: the sampler explores
structure once per group rather than once per trial, in exchange for K-fold cheaper trials;
`group_size` sets the balance.

The update math follows torch.optim's single-tensor implementations line by line, so a fused
member's training curve matches its unfused run to float tolerance (tests/test_fused.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hpo.data import Data, Split
from hpo.model import MLP, build_model
from hpo.optim import Schedule
from hpo.params import Params

# Parameters a group shares (they change shapes or the update rule).
STRUCTURAL = ("optimizer", "batch_size", "depth", "width", "norm", "residual", "scaling",
              "kernel_size", "pooling")
FUSABLE_OPTIMIZERS = ("sgd", "momentum", "nesterov", "rmsprop", "adagrad", "adam", "adamw")
BN_MOMENTUM, BN_EPS, LN_EPS = 0.1, 1e-5, 1e-5


@dataclass
class Member:
    """One trial inside a fused group."""

    key: Any  # the caller's handle (an Optuna trial); opaque here
    params: Params
    seed: int
    epochs: int
    generator: torch.Generator
    schedule: Schedule
    lr_holder: torch.optim.Optimizer  # drives `schedule`; its lr is the member's current lr
    number: int = 0  # the trial's original number (names its checkpoint)
    last_checkpoint: float = field(default_factory=time.monotonic)
    checkpoint_epoch: int = 0
    epoch: int = 0
    train_losses: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)

    @property
    def lr(self) -> float:
        return float(self.lr_holder.param_groups[0]["lr"])


class FusedGroup:
    """K same-structure MLPs, their optimizer state and their members, as stacked tensors."""

    def __init__(self, data: Data, device: torch.device, steps_per_epoch: int | None = None) -> None:
        self.data = data
        self.device = device
        self.members: list[Member] = []
        self.flat: torch.Tensor | None = None  # (K, P) every member's parameters, one leaf
        self.layout: list[tuple[str, tuple[int, ...], int, int]] = []  # name, shape, start, end
        self.buffers: dict[str, torch.Tensor] = {}  # BN running stats, (K, F) each
        self.state: dict[str, torch.Tensor] = {}  # optimizer state, (K, P) each
        self.steps = torch.zeros(0, device=device)  # optimizer steps taken, per member
        self.structure: Params | None = None
        self.autocast = device.type == "cuda"
        self._n = len(data.train)
        self._columns: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    # ---- membership -----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.members)

    @property
    def batch_size(self) -> int:
        assert self.structure is not None
        return min(self.structure.batch_size, self._n)

    @property
    def starts(self) -> list[int]:
        bs = self.batch_size
        return [s for s in range(0, self._n, bs) if self._n - s >= 2 or s == 0]

    def add(self, key: Any, params: Params, seed: int, epochs: int, number: int = 0) -> Member:
        """Append a member initialised exactly as an unfused run with `seed` would be."""
        if self.structure is None:
            self.structure = params
        elif any(getattr(params, k) != getattr(self.structure, k) for k in STRUCTURAL):
            raise ValueError("a fused member must share the group's structure")
        if params.optimizer not in FUSABLE_OPTIMIZERS:
            raise ValueError(f"optimizer {params.optimizer} cannot be fused")
        torch.manual_seed(seed)
        module = build_model("mlp", params, self.data.input_shape, self.data.n_outputs)
        assert isinstance(module, MLP)
        self._append_weights(module)
        self._columns.clear()
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        holder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=params.lr)
        schedule = Schedule(params, holder, epochs, len(self.starts))
        holder.step()  # a no-op (no gradient) that tells the scheduler the optimizer has stepped
        member = Member(key, params, seed, epochs, gen, schedule, holder, number=number)
        self.members.append(member)
        return member

    def _append_weights(self, module: MLP) -> None:
        named = list(module.named_parameters())
        if not self.layout:
            offset = 0
            for name, t in named:
                self.layout.append((name, tuple(t.shape), offset, offset + t.numel()))
                offset += t.numel()
        row = torch.cat([t.detach().reshape(-1) for _, t in named]).to(self.device).unsqueeze(0)
        bufs = {n: b.to(self.device).unsqueeze(0) for n, b in module.named_buffers()}
        if self.flat is None:
            self.flat = row.requires_grad_(True)
            self.buffers = bufs
            self.state = {}
            self.steps = torch.zeros(1, device=self.device)
            return
        self.flat = torch.cat([self.flat.detach(), row]).requires_grad_(True)
        for name, b in bufs.items():
            self.buffers[name] = torch.cat([self.buffers[name], b])
        for name, s in self.state.items():
            self.state[name] = torch.cat([s, torch.zeros_like(row)])
        self.steps = torch.cat([self.steps, torch.zeros(1, device=self.device)])

    def remove(self, indices: list[int]) -> None:
        """Drop members at once (pruned, diverged or finished): compact every stacked tensor."""
        if not indices:
            return
        self._columns.clear()
        keep = [i for i in range(len(self.members)) if i not in set(indices)]
        self.members = [self.members[i] for i in keep]
        if not keep:
            self.flat, self.buffers, self.state = None, {}, {}
            self.steps = torch.zeros(0, device=self.device)
            self.structure = None
            self.layout = []
            return
        idx = torch.tensor(keep, device=self.device)
        assert self.flat is not None
        self.flat = self.flat.detach().index_select(0, idx).requires_grad_(True)
        self.buffers = {n: b.index_select(0, idx) for n, b in self.buffers.items()}
        self.state = {n: s.index_select(0, idx) for n, s in self.state.items()}
        self.steps = self.steps.index_select(0, idx)

    # ---- the batched model --------------------------------------------------------------------

    def _view(self, name: str) -> torch.Tensor:
        for n, shape, a, b in self.layout:
            if n == name:
                assert self.flat is not None
                return self.flat[:, a:b].reshape(len(self.members), *shape)
        raise KeyError(name)

    def _has(self, name: str) -> bool:
        return any(n == name for n, *_ in self.layout)

    def forward(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        """x: (K, B, F) in, (K, B, outputs) out; the blocks mirror hpo.model.DenseBlock."""
        p = self.structure
        assert p is not None
        h = x.flatten(2)
        k = len(self.members)
        any_dropout = train and any(m.params.dropout > 0 for m in self.members)
        drop = self._column("dropout").view(k, 1, 1) if any_dropout else None
        for i in range(p.depth):
            pre = f"blocks.{i}"
            w = self._view(f"{pre}.linear.weight")
            if self._has(f"{pre}.linear.bias"):
                y = torch.baddbmm(self._view(f"{pre}.linear.bias").unsqueeze(1), h, w.transpose(1, 2))
            else:  # no bias before BatchNorm (see hpo.model.DenseBlock)
                y = torch.bmm(h, w.transpose(1, 2))
            y = self._norm(pre, y, train)
            y = torch.relu(y)
            if any_dropout:
                keep = (torch.rand_like(y) >= drop).to(y.dtype)
                y = y * keep / (1 - drop)
            h = h + y if (p.residual and h.shape[-1] == y.shape[-1]) else y
        w, b = self._view("head.weight"), self._view("head.bias")
        return torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))

    def _norm(self, pre: str, y: torch.Tensor, train: bool) -> torch.Tensor:
        kind = self.structure.norm if self.structure else "none"
        if kind == "none":
            return y
        gamma = self._view(f"{pre}.norm.weight")
        beta = self._view(f"{pre}.norm.bias")
        if kind == "layer":
            return F.layer_norm(y, (y.shape[-1],), eps=LN_EPS) * gamma.unsqueeze(1) + beta.unsqueeze(1)
        # BatchNorm1d's own kernel over a (B, K*F) view: every (member, feature) is one channel,
        # so the statistics are computed exactly as K separate BatchNorm1d layers would.
        k, b, f = y.shape
        flat_in = y.transpose(0, 1).reshape(b, k * f)
        out = F.batch_norm(
            flat_in,
            self.buffers[f"{pre}.norm.running_mean"].view(-1),
            self.buffers[f"{pre}.norm.running_var"].view(-1),
            gamma.reshape(-1),
            beta.reshape(-1),
            training=train,
            momentum=BN_MOMENTUM,
            eps=BN_EPS,
        )
        if train:
            self.buffers[f"{pre}.norm.num_batches_tracked"].add_(1)
        return out.reshape(b, k, f).transpose(0, 1)

    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-member mean loss, (K,)."""
        k, b = y.shape
        if self.data.task == "regression":
            return F.mse_loss(out.squeeze(-1).float(), y, reduction="none").mean(1)
        return F.cross_entropy(out.reshape(k * b, -1).float(), y.reshape(-1), reduction="none").view(k, b).mean(1)

    # ---- training ---------------------------------------------------------------------------

    def train_epoch(self) -> torch.Tensor:
        """One pass over the train split for every member; returns per-member mean loss (K,)."""
        x, y = self.data.train.x, self.data.train.y
        perms = torch.stack([torch.randperm(self._n, device=self.device, generator=m.generator) for m in self.members])
        total = torch.zeros(len(self.members), device=self.device)
        seen = 0
        bs = self.batch_size
        lrs = self._lrs()
        per_batch = any(m.params.scheduler == "onecycle" for m in self.members)
        for start in self.starts:
            idx = perms[:, start : start + bs]
            xb, yb = x[idx], y[idx]
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                loss = self._loss(self.forward(xb, train=True), yb)
            assert self.flat is not None
            self.flat.grad = None
            loss.sum().backward()  # members' parameters are disjoint: each gets its own gradient
            self._step(lrs)
            total += loss.detach() * idx.shape[1]
            seen += idx.shape[1]
            if per_batch:
                for m in self.members:
                    m.schedule.after_batch()
                lrs = self._lrs()
        return total / max(1, seen)

    def _lrs(self) -> torch.Tensor:
        return torch.tensor([m.lr for m in self.members], device=self.device, dtype=torch.float64).unsqueeze(1)

    def _column(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A member hyperparameter as a (K, 1) column, built once per membership (no per-step copy)."""
        col = self._columns.get((name, dtype))
        if col is None:
            values = [getattr(m.params, name) for m in self.members]
            col = self._columns[(name, dtype)] = torch.tensor(values, device=self.device, dtype=dtype).unsqueeze(1)
        return col

    @torch.no_grad()
    def _step(self, lr: torch.Tensor) -> None:
        """One update of every member, following torch.optim's single-tensor formulas.

        Scalars derived from hyperparameters (1 - beta, bias corrections, step sizes) are
        computed in float64 and rounded once, as torch.optim does with Python floats; computing
        them in float32 would shift every step by a rounding error that Adam amplifies.
        """
        assert self.flat is not None and self.flat.grad is not None
        p, g = self.flat, self.flat.grad
        opt = self.members[0].params.optimizer
        wd = self._column("weight_decay")
        self.steps += 1
        f32 = torch.float32
        if opt != "adamw":
            g = g.add(p * wd)
        if opt in ("sgd", "momentum", "nesterov"):
            if opt != "sgd":
                mom = self._column("momentum")
                buf = self.state.get("momentum_buffer")
                fresh = (self.steps == 1).unsqueeze(1)
                buf = g.clone() if buf is None else torch.where(fresh, g, buf * mom + g)
                self.state["momentum_buffer"] = buf
                g = g + buf * mom if opt == "nesterov" else buf
            p.add_(g * (-lr).to(f32))
        elif opt == "rmsprop":
            sq = self.state.setdefault("square_avg", torch.zeros_like(p))
            sq.mul_(0.99).addcmul_(g, g, value=1 - 0.99)
            p.addcdiv_(g * (-lr).to(f32), sq.sqrt().add_(1e-8))
        elif opt == "adagrad":
            acc = self.state.setdefault("sum", torch.zeros_like(p))
            acc.addcmul_(g, g, value=1)
            p.addcdiv_(g * (-lr).to(f32), acc.sqrt().add_(1e-10))
        else:  # adam, adamw
            b1 = self._column("beta1", torch.float64)
            b2 = self._column("beta2", torch.float64)
            if opt == "adamw":
                p.mul_((1 - lr * self._column("weight_decay", torch.float64)).to(f32))
            m = self.state.setdefault("exp_avg", torch.zeros_like(p))
            v = self.state.setdefault("exp_avg_sq", torch.zeros_like(p))
            m.lerp_(g, (1 - b1).to(f32))
            v.mul_(b2.to(f32)).addcmul_(g, g * (1 - b2).to(f32))
            step = self.steps.to(torch.float64).unsqueeze(1)
            step_size = (lr / (1 - b1**step)).to(f32)
            bc2_sqrt = torch.sqrt(1 - b2**step).to(f32)
            denom = (v.sqrt() / bc2_sqrt).add_(1e-8)
            p.addcdiv_(m * -step_size, denom)

    @torch.no_grad()
    def evaluate(self, split: Split) -> list[dict[str, float]]:
        """Per-member loss and accuracy (or MSE) over a split every member shares."""
        k = len(self.members)
        outs = []
        for start in range(0, len(split), 4096):
            xb = split.x[start : start + 4096]
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                outs.append(self.forward(xb.unsqueeze(0).expand(k, *xb.shape), train=False).float())
        out = torch.cat(outs, dim=1)
        y = split.y.unsqueeze(0).expand(k, -1)
        n = max(1, len(split))
        if self.data.task == "regression":
            mse = F.mse_loss(out.squeeze(-1), y, reduction="none").mean(1)
            return [{"loss": v, "mse": v} for v in mse.tolist()]
        loss = F.cross_entropy(out.reshape(k * len(split), -1), y.reshape(-1), reduction="none").view(k, -1).mean(1)
        acc = (out.argmax(-1) == y).sum(1).float() / n
        return [{"loss": lv, "accuracy": av} for lv, av in zip(*torch.stack([loss, acc]).tolist())]

    def after_epoch(self, val_losses: list[float]) -> None:
        for m, vl in zip(self.members, val_losses):
            m.schedule.after_epoch(vl)

    # ---- export -------------------------------------------------------------------------------

    def member_state_dict(self, i: int) -> dict[str, torch.Tensor]:
        """Member i's weights in hpo.model.MLP's state_dict format (loadable unfused)."""
        assert self.flat is not None
        out = {n: self.flat[i, a:b].detach().reshape(shape).clone().cpu() for n, shape, a, b in self.layout}
        out.update({n: b[i].clone().cpu() for n, b in self.buffers.items()})
        return out

    def member_module(self, i: int) -> nn.Module:
        m = self.members[i]
        module = build_model("mlp", m.params, self.data.input_shape, self.data.n_outputs)
        module.load_state_dict(self.member_state_dict(i))
        return module.to(self.device)


def finite(values: torch.Tensor) -> list[bool]:
    return [math.isfinite(v) for v in values.tolist()]
