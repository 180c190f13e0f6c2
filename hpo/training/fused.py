"""Fused training: K MLPs trained as one batched model, each with its own width and depth.

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

What a group's members always share, because it changes the update rule or the loop itself:
the optimizer algorithm, batch size (the number of steps), normalisation kind, residual flag and
input scaling (SHARED).

Width and depth (PADDED) can differ per member, by padding: the group's tensors are sized for
its widest and deepest member (the envelope), a narrower member's weights sit in the top-left
corner of each matrix with zeros around them, and a shallower member skips the blocks it does
not have (its activations pass through them unchanged). Padded weights see only zero activations
on the way in and zero gradients on the way back (ReLU'(0) = 0, zero columns downstream), so
they stay exactly zero under every optimizer and weight decay, and each member still follows its
unfused curve. LayerNorm takes its statistics over the member's own width. The envelope grows
when a wider or deeper member joins and shrinks when the widest leaves.

How groups are formed is the worker's choice (hpo.execution.fused_worker): it samples every trial freely
and groups the trials in flight by structure. By default a group's members share width and depth
too, so no arithmetic is wasted but a group is only as large as the number of trials in flight
with that exact structure; with `execution.pad` they share only SHARED and every member computes
at the envelope's size. On a CPU that waste is real (a 128-wide member in a 256-wide envelope
does four times its own work); on a GPU, where a small MLP is launch-bound, fewer and fuller
groups are what pays.

The update is torch.optim's own: on a CPU its fused kernels (what `Adam(fused=True)` runs, and
what hpo's unfused trainer uses there too), one call per member; on a GPU, and for RMSprop, one
stacked update over all members that follows torch.optim's single-tensor formulas line by line.
Either way a fused member's training curve matches its unfused run to float tolerance
(tests/test_fused.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, cast

import torch
import torch.nn.functional as F

from hpo._private import fused_kernel
from hpo.data.splits import Data, Split
from hpo.spec.params import Params
from hpo.training.models import MLP, build_model
from hpo.training.optim import Schedule

# Parameters a group's members share (the update rule, the step count, the layer kinds).
SHARED = ("optimizer", "batch_size", "norm", "residual", "scaling", "kernel_size", "pooling")
# Parameters that differ per member: the group pads every member to the largest (the envelope).
PADDED = ("width", "depth")
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
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # its own (unpadded) tensors
    param_names: frozenset[str] = frozenset()  # which of `shapes` are parameters (not buffers)
    last_checkpoint: float = field(default_factory=time.monotonic)
    checkpoint_epoch: int = 0
    resumed_from: int = 0  # the epoch its checkpoint put it back at (0: a fresh start)
    epoch: int = 0
    curves: dict[str, list[float]] = field(default_factory=dict)  # reported metrics per epoch
    epoch_seconds: list[float] = field(default_factory=list)

    @property
    def lr(self) -> float:
        return float(self.lr_holder.param_groups[0]["lr"])

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for n, s in self.shapes.items() if n in self.param_names)


def _corner(shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(0, n) for n in shape)


def _stored(part: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A (K, n) slice of the flat tensors, for a parameter of the module's `shape`, as stored
    (a view): a matrix (K, in, out), baddbmm's second operand; a vector (K, 1, F), ready to
    broadcast over the batch.

    A matrix is stored transposed, (in, out): its weight gradient then comes out of the matmul
    in the parameter's own layout, where the module's (out, in) orientation would cost a
    transposing copy of every gradient, every step.
    """
    return part.view(-1, shape[1], shape[0]) if len(shape) == 2 else part.view(-1, 1, *shape)


def _shaped(part: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A (K, n) slice of the flat tensors as (K, *shape), the module's orientation (a view)."""
    return _stored(part, shape).transpose(1, 2) if len(shape) == 2 else part.view(-1, *shape)


def _export(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies in the module's orientation (a stored matrix's view is transposed)."""
    return {n: t.clone(memory_format=torch.contiguous_format).cpu() for n, t in tensors.items()}


def _copy_overlap(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy the corner two (K, *shape) tensors share: growing pads, shrinking cuts padding."""
    keep = (slice(None), *_corner(tuple(min(x, y) for x, y in zip(dst.shape[1:], src.shape[1:]))))
    dst[keep] = src[keep]


class FusedGroup:
    """K MLPs sharing an update rule, padded to one envelope, with their optimizer state, as
    stacked tensors."""

    def __init__(self, data: Data, device: torch.device, kernels: bool | None = None) -> None:
        self.data = data
        self.device = device
        # torch.optim's fused kernels, a call per member (default: on a CPU), or one stacked update.
        self.kernels = device.type == "cpu" if kernels is None else kernels
        self.members: list[Member] = []
        self.flat: torch.Tensor | None = None  # (K, P) every member's parameters
        self.layout: list[tuple[str, tuple[int, ...], int, int]] = []  # name, shape, start, end
        self.buffers: dict[str, torch.Tensor] = {}  # BN running stats, (K, F) each
        self.state: dict[str, torch.Tensor] = {}  # optimizer state, (K, P) each
        self.steps = torch.zeros(0, device=device)  # optimizer steps taken, per member
        self.structure: Params | None = None  # the first member's: its SHARED values are the group's
        self.width = self.depth = 0  # the envelope
        self.autocast = device.type == "cuda"
        self._n = len(data.train)
        self._columns: dict[tuple[str, Any], torch.Tensor] = {}
        self._leaves: dict[str, torch.Tensor] = {}  # per-parameter autograd leaves into flat (_views)
        self._rows: list[dict[str, list[torch.Tensor]]] = []  # per-member views, for _kernel_step

    # ---- membership -----------------------------------------------------------------------

    def _forget(self) -> None:
        """Drop what was built for this membership and these tensors (columns, masks, views)."""
        self._columns.clear()
        self._leaves.clear()
        self._rows.clear()

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
        elif any(getattr(params, k) != getattr(self.structure, k) for k in SHARED):
            raise ValueError("a fused member must share the group's " + ", ".join(SHARED))
        if params.optimizer not in FUSABLE_OPTIMIZERS:
            raise ValueError(f"optimizer {params.optimizer} cannot be fused")
        self._resize(max(self.width, params.width), max(self.depth, params.depth))
        torch.manual_seed(seed)
        module = build_model("mlp", params, self.data.input_shape, self.data.n_outputs)
        assert isinstance(module, MLP)
        self._append(module)
        self._forget()
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        holder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=params.lr)
        schedule = Schedule(params, holder, epochs, len(self.starts))
        holder.step()  # a no-op (no gradient) that tells the scheduler the optimizer has stepped
        member = Member(key, params, seed, epochs, gen, schedule, holder, number=number)
        member.shapes = {n: tuple(t.shape) for n, t in [*module.named_parameters(), *module.named_buffers()]}
        member.param_names = frozenset(n for n, _ in module.named_parameters())
        self.members.append(member)
        return member

    def _append(self, module: MLP) -> None:
        """Add `module`'s weights as a new row, in the envelope's corner, zeros elsewhere."""
        assert self.flat is not None
        row = torch.zeros(1, self.flat.shape[1], device=self.device)
        own = dict(module.named_parameters())
        for name, shape, a, b in self.layout:
            if name in own:
                _shaped(row[:, a:b], shape)[0][_corner(own[name].shape)] = own[name].detach().to(self.device)
        self.flat = torch.cat([self.flat, row])
        own_bufs = dict(module.named_buffers())
        for name, buf in self.buffers.items():
            new = self._fresh_buffer(name, buf.shape[1:])
            if name in own_bufs:
                new[_corner(own_bufs[name].shape)] = own_bufs[name].to(self.device)
            self.buffers[name] = torch.cat([buf, new.unsqueeze(0)])
        for name, s in self.state.items():
            self.state[name] = torch.cat([s, torch.zeros_like(row)])
        self.steps = torch.cat([self.steps, torch.zeros(1, device=self.device)])

    def _fresh_buffer(self, name: str, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        dtype = torch.long if name.endswith("num_batches_tracked") else torch.float32
        fill = 1.0 if name.endswith("running_var") else 0.0
        return torch.full(tuple(shape), fill, device=self.device, dtype=dtype)

    def _resize(self, width: int, depth: int) -> None:
        """Re-lay every stacked tensor for a new envelope, keeping each member's corner as is.

        Growing adds zeros (or fresh BN statistics); shrinking cuts only padding, because the
        envelope never gets smaller than a member.
        """
        if (width, depth) == (self.width, self.depth):
            return
        assert self.structure is not None
        with torch.device("meta"):  # shapes only: no memory, and the global RNG stays untouched
            template = build_model("mlp", replace(self.structure, width=width, depth=depth),
                                   self.data.input_shape, self.data.n_outputs)
        layout, offset = [], 0
        for name, t in template.named_parameters():
            layout.append((name, tuple(t.shape), offset, offset + t.numel()))
            offset += t.numel()
        k = len(self.members)
        before = {n: (shape, a, b) for n, shape, a, b in self.layout}

        def relay(old: torch.Tensor | None) -> torch.Tensor:
            new = torch.zeros(k, offset, device=self.device)
            if old is not None:
                for name, shape, a, b in layout:
                    if name in before:
                        o_shape, oa, ob = before[name]
                        _copy_overlap(_shaped(new[:, a:b], shape), _shaped(old[:, oa:ob], o_shape))
            return new

        self.flat = relay(self.flat)
        self.state = {n: relay(s) for n, s in self.state.items()}
        buffers = {}
        for name, buf in template.named_buffers():
            buffers[name] = self._fresh_buffer(name, buf.shape).unsqueeze(0).repeat(k, *([1] * buf.dim()))
            if name in self.buffers:
                _copy_overlap(buffers[name], self.buffers[name])
        self.buffers = buffers
        self.layout = layout
        self.width, self.depth = width, depth
        self._forget()

    def remove(self, indices: list[int]) -> None:
        """Drop members at once (pruned, diverged or finished): compact every stacked tensor."""
        if not indices:
            return
        self._forget()
        keep = [i for i in range(len(self.members)) if i not in set(indices)]
        self.members = [self.members[i] for i in keep]
        if not keep:
            self.flat, self.buffers, self.state = None, {}, {}
            self.steps = torch.zeros(0, device=self.device)
            self.structure = None
            self.layout = []
            self.width = self.depth = 0
            return
        idx = torch.tensor(keep, device=self.device)
        assert self.flat is not None
        self.flat = self.flat.index_select(0, idx)
        self.buffers = {n: b.index_select(0, idx) for n, b in self.buffers.items()}
        self.state = {n: s.index_select(0, idx) for n, s in self.state.items()}
        self.steps = self.steps.index_select(0, idx)
        self._resize(max(m.params.width for m in self.members), max(m.params.depth for m in self.members))

    # ---- the batched model --------------------------------------------------------------------

    def _view(self, name: str, source: torch.Tensor | None = None) -> torch.Tensor:
        """`name`'s (K, *shape) view into the flat parameters (or into an optimizer state)."""
        source = self.flat if source is None else source
        for n, shape, a, b in self.layout:
            if n == name:
                assert source is not None
                return _shaped(source[:, a:b], shape)
        raise KeyError(name)

    def _views(self) -> dict[str, torch.Tensor]:
        """Every parameter's (K, *shape) view into the flat tensor, each its own autograd leaf,
        built once per membership. Views of one flat leaf would have a backward that concatenates
        every gradient into a (K, P) one, every step (an eighth of a wide group's CPU step); leaves
        take their gradients as the matmuls produce them."""
        if not self._leaves:
            assert self.flat is not None
            self._leaves = {name: t.requires_grad_(True) for name, t in self._split(self.flat).items()}
        return self._leaves

    def _split(self, source: torch.Tensor) -> dict[str, torch.Tensor]:
        """A (K, P) tensor (the parameters, an optimizer state) as per-parameter views, as stored
        (_stored), cut by one split."""
        parts = source.split([b - a for _, _, a, b in self.layout], dim=1)  # type: ignore[no-untyped-call]
        return {name: _stored(part, shape) for (name, shape, _, _), part in zip(self.layout, parts)}

    def _mask(self, kind: str, block: int = 0) -> torch.Tensor | None:
        """Per-member masks for a padded group, built once per membership; None where unneeded.

        "active": (K, 1, 1) bool, the member has block `block`; "width": (K, 1, W) 1.0 over the
        member's own units; "skip0": (K, 1, 1) bool, block 0 has a skip connection (its input
        width equals the member's width).
        """
        key = (kind, block)
        if key not in self._columns:
            k, n_in = len(self.members), math.prod(self.data.input_shape)
            assert self.structure is not None
            mask: torch.Tensor | None = None
            if kind == "active" and any(m.params.depth <= block for m in self.members):
                mask = torch.tensor([m.params.depth > block for m in self.members], device=self.device)
            elif kind == "width" and any(m.params.width < self.width for m in self.members):
                widths = torch.tensor([m.params.width for m in self.members], device=self.device)
                mask = (torch.arange(self.width, device=self.device) < widths.unsqueeze(1)).float()
            elif kind == "skip0" and self.structure.residual:
                skips = [m.params.width == n_in for m in self.members]
                mask = torch.tensor(skips, device=self.device) if any(skips) else None
            if mask is not None:
                mask = mask.view(k, 1, -1) if kind == "width" else mask.view(k, 1, 1)
            self._columns[key] = mask  # type: ignore[assignment]
        return self._columns[key]

    def forward(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        """x: (K, B, F) in, (K, B, outputs) out; the blocks mirror hpo.training.models.DenseBlock."""
        p = self.structure
        assert p is not None
        h = x.flatten(2)
        k = len(self.members)
        masks = None
        if train and any(m.params.dropout > 0 for m in self.members):
            masks = self._dropout_masks((k, h.shape[1], self.width), self.depth)
        views = self._views()
        for i in range(self.depth):
            pre = f"blocks.{i}"
            w = views[f"{pre}.linear.weight"]
            if f"{pre}.linear.bias" in views:
                y = torch.baddbmm(views[f"{pre}.linear.bias"], h, w)
            else:  # no bias before BatchNorm (see hpo.training.models.DenseBlock)
                y = torch.bmm(h, w)
            y = self._norm(pre, y, train, views)
            y = torch.relu(y)
            if masks is not None:
                y = y * masks[i]
            if i == 0:
                skip = self._mask("skip0")
                if skip is not None:  # only members whose width equals the input's
                    y = torch.where(skip, y + F.pad(h, (0, y.shape[-1] - h.shape[-1])), y)
            elif p.residual:
                y = h + y
            active = self._mask("active", i)
            h = y if active is None else torch.where(active, y, h)  # a shallower member skips it
        w, b = views["head.weight"], views["head.bias"]
        return torch.baddbmm(b, h, w)

    def _dropout_masks(self, shape: tuple[int, int, int], n: int) -> torch.Tensor:
        """`n` inverted-dropout masks of `shape` (K, B, F), as (n, K, B, F): each member's
        entries are 0 with its own probability p, else 1 / (1 - p). One draw for all blocks.

        On a CPU torch.rand_like draws one number per element, serially: a sixth of a wide
        group's step (K = 8, 256 x 2). Here each 64-bit draw gives four 16-bit integers, compared
        against p * 2^16 (p rounded by at most 2^-17): the mask in about half the time. A GPU's
        rand_like is one fast kernel, so it stays."""
        cols, k = self._columns, len(self.members)
        if ("dropout mask", None) not in cols:  # once per membership: every op counts in a small step
            drop = self._column("dropout", torch.float64).view(k, 1, 1)
            cols[("1 / (1 - dropout)", None)] = (1 / (1 - drop)).float()
            cols[("dropout mask", None)] = ((drop * 65536).round() - 32768).clamp(max=32767).to(torch.int16)
        scale = cols[("1 / (1 - dropout)", None)]
        if self.device.type != "cpu":
            return (torch.rand(n, *shape, device=self.device) >= self._column("dropout").view(k, 1, 1)) * scale
        size = n * math.prod(shape)
        bits = torch.empty((size + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
        return (bits.view(torch.int16)[:size].view(n, *shape) >= cols[("dropout mask", None)]) * scale

    def _norm(self, pre: str, y: torch.Tensor, train: bool, views: dict[str, torch.Tensor]) -> torch.Tensor:
        kind = self.structure.norm if self.structure else "none"
        if kind == "none":
            return y
        gamma = views[f"{pre}.norm.weight"]
        beta = views[f"{pre}.norm.bias"]
        if kind == "layer":
            mask = self._mask("width")
            if mask is None:
                return F.layer_norm(y, (y.shape[-1],), eps=LN_EPS) * gamma + beta
            # Statistics over each member's own units; the padding has gamma = beta = 0.
            n = mask.sum(-1, keepdim=True)
            mean = (y * mask).sum(-1, keepdim=True) / n
            var = ((y - mean) * mask).square().sum(-1, keepdim=True) / n
            return (y - mean) * torch.rsqrt(var + LN_EPS) * gamma + beta
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
        train = self.data.train
        assert isinstance(train, Split), "a fused group trains on resident data"
        x, y = train.x, train.y
        perms = torch.stack([torch.randperm(self._n, device=self.device, generator=m.generator) for m in self.members])
        losses = []
        bs = self.batch_size
        starts = self.starts
        per_batch = any(m.params.scheduler == "onecycle" for m in self.members)
        step = self._stepper(1 if per_batch else len(starts))
        for j, start in enumerate(starts):
            idx = perms[:, start : start + bs]
            xb, yb = x[idx], y[idx]
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                loss = self._loss(self.forward(xb, train=True), yb)
            for leaf in self._views().values():
                leaf.grad = None
            loss.sum().backward()  # type: ignore[no-untyped-call]  # members' parameters are disjoint
            step(0 if per_batch else j)
            losses.append(loss.detach())
            if per_batch:
                for m in self.members:
                    m.schedule.after_batch()
                step = self._stepper(1)
        sizes = torch.tensor([min(bs, self._n - s) for s in starts], device=self.device, dtype=torch.float32)
        return (torch.stack(losses) * sizes.unsqueeze(1)).sum(0) / sizes.sum()

    def _lrs(self) -> torch.Tensor:
        return torch.tensor([m.lr for m in self.members], device=self.device, dtype=torch.float64).unsqueeze(1)

    def _column(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A member hyperparameter as a (K, 1) column, built once per membership (no per-step copy)."""
        col = self._columns.get((name, dtype))
        if col is None:
            values = [getattr(m.params, name) for m in self.members]
            col = self._columns[(name, dtype)] = torch.tensor(values, device=self.device, dtype=dtype).unsqueeze(1)
        return col

    def _stepper(self, n: int) -> Callable[[int], None]:
        """The update of the next `n` steps: step(j) applies the j-th.

        On a CPU, torch.optim's own fused kernel (what Adam(fused=True) runs) updates each member
        in one pass over its memory; the stacked formulas of _step take a dozen passes over the
        whole (K, P) block, which for a wide member is most of its step (benchmarks/RESULTS.md).
        The kernel takes hyperparameters as scalars, hence a call per member:
        on a GPU, where launches are what costs, the stacked update's dozen launches for any K
        win, and RMSprop has no fused kernel.
        """
        opt = self.members[0].params.optimizer
        if self.kernels and opt != "rmsprop":
            lrs = [m.lr for m in self.members]
            return lambda j: self._kernel_step(lrs)
        plan = self._plan(self._lrs(), n)
        return lambda j: self._step({k: v if v.dim() < 3 else v[j] for k, v in plan.items()})

    @torch.no_grad()
    def _kernel_step(self, lrs: list[float]) -> None:
        """One update of every member by torch.optim's fused CPU kernels, with its own lr."""
        opt = self.members[0].params.optimizer
        grads = [cast(torch.Tensor, leaf.grad) for leaf in self._views().values()]
        first = (self.steps == 0).tolist() if opt in ("momentum", "nesterov") else None
        self.steps += 1
        for i, (m, own) in enumerate(zip(self.members, self._row_views(opt))):
            p, lr = m.params, lrs[i]
            grad = [g[i] for g in grads]
            if opt in ("adam", "adamw"):
                kernel = fused_kernel("_fused_adam_" if opt == "adam" else "_fused_adamw_")
                kernel(own["param"], grad, own["exp_avg"], own["exp_avg_sq"], [], own["steps"], lr=lr,
                       beta1=p.beta1, beta2=p.beta2, weight_decay=p.weight_decay, eps=1e-8, amsgrad=False,
                       maximize=False)
            elif opt == "adagrad":
                fused_kernel("_fused_adagrad_")(own["param"], grad, own["sum"], own["steps"], lr=lr, lr_decay=0.0,
                                      weight_decay=p.weight_decay, eps=1e-10, maximize=False)
            else:  # sgd, momentum, nesterov
                fused_kernel("_fused_sgd_")(own["param"], grad, own.get("momentum_buffer", []),
                                  weight_decay=p.weight_decay, momentum=0.0 if opt == "sgd" else p.momentum, lr=lr,
                                  dampening=0.0, nesterov=opt == "nesterov", maximize=False,
                                  is_first_step=bool(first and first[i]))

    def _row_views(self, opt: str) -> list[dict[str, list[torch.Tensor]]]:
        """Per member: its parameters and optimizer state as per-parameter views, and its step
        count once per parameter (the kernels read it; torch.optim increments it beforehand)."""
        if not self._rows:
            assert self.flat is not None
            states = {"adam": ("exp_avg", "exp_avg_sq"), "adamw": ("exp_avg", "exp_avg_sq"), "adagrad": ("sum",),
                      "momentum": ("momentum_buffer",), "nesterov": ("momentum_buffer",)}.get(opt, ())
            tensors = {"param": self.flat, **{name: self._state(name) for name in states}}
            split = {name: list(self._split(t).values()) for name, t in tensors.items()}
            self._rows = [{"steps": [step] * len(self.layout), **{name: [v[i] for v in views]
                                                                   for name, views in split.items()}}
                          for i, step in enumerate(self.steps.unbind(0))]
        return self._rows

    def _plan(self, lr: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
        """Every per-member scalar of the next `n` steps, as (K, 1) columns or (n, K, 1) per step.

        They are computed in float64 and rounded once, as torch.optim does with Python floats
        (float32 would shift every step by a rounding error that Adam amplifies), and ahead of
        the epoch, because on a CPU a small group's step costs per operation, not per element:
        an update that rebuilt them would take twice the operations.
        """
        f32, f64 = torch.float32, torch.float64
        opt = self.members[0].params.optimizer
        plan = {"-lr": (-lr).to(f32), "wd": self._column("weight_decay")}
        if opt in ("momentum", "nesterov"):
            plan["momentum"] = self._column("momentum")
        if opt in ("adam", "adamw"):
            b1, b2 = self._column("beta1", f64), self._column("beta2", f64)
            ahead = torch.arange(1, n + 1, device=self.device, dtype=f64).view(-1, 1, 1)
            step = self.steps.to(f64).view(1, -1, 1) + ahead
            plan["1-b1"], plan["b2"], plan["1-b2"] = (1 - b1).to(f32), b2.to(f32), (1 - b2).to(f32)
            plan["-step_size"] = -(lr / (1 - b1**step)).to(f32)
            plan["bc2_sqrt"] = torch.sqrt(1 - b2**step).to(f32)
            if opt == "adamw":
                plan["decay"] = (1 - lr * self._column("weight_decay", f64)).to(f32)
        return plan

    @torch.no_grad()
    def _step(self, c: dict[str, torch.Tensor]) -> None:
        """One update of every member, following torch.optim's single-tensor formulas, with the
        per-member scalars `c` of this step (from _plan)."""
        assert self.flat is not None
        k = len(self.members)
        p, g = self.flat, torch.cat([cast(torch.Tensor, leaf.grad).reshape(k, -1) for leaf in self._views().values()],
                                    dim=1)
        opt = self.members[0].params.optimizer
        self.steps += 1
        if opt != "adamw" and any(m.params.weight_decay for m in self.members):
            g = g.addcmul(p, c["wd"])  # torch.optim skips this too when weight_decay is 0
        if opt in ("sgd", "momentum", "nesterov"):
            if opt != "sgd":
                mom = c["momentum"]
                buf = self.state.get("momentum_buffer")
                fresh = (self.steps == 1).unsqueeze(1)
                buf = g.clone() if buf is None else torch.where(fresh, g, buf * mom + g)
                self.state["momentum_buffer"] = buf
                g = g + buf * mom if opt == "nesterov" else buf
            p.add_(g * c["-lr"])
        elif opt == "rmsprop":
            sq = self._state("square_avg")
            sq.mul_(0.99).addcmul_(g, g, value=1 - 0.99)
            p.addcdiv_(g * c["-lr"], sq.sqrt().add_(1e-8))
        elif opt == "adagrad":
            acc = self._state("sum")
            acc.addcmul_(g, g, value=1)
            p.addcdiv_(g * c["-lr"], acc.sqrt().add_(1e-10))
        else:  # adam, adamw
            if opt == "adamw":
                p.mul_(c["decay"])
            m, v = self._state("exp_avg"), self._state("exp_avg_sq")
            m.lerp_(g, c["1-b1"])
            v.mul_(c["b2"]).addcmul_(g, g * c["1-b2"])
            denom = v.sqrt().div_(c["bc2_sqrt"]).add_(1e-8)
            p.addcdiv_(m * c["-step_size"], denom)

    def _state(self, name: str) -> torch.Tensor:
        if name not in self.state:  # (not setdefault: that would build a (K, P) zeros every step)
            assert self.flat is not None
            self.state[name] = torch.zeros_like(self.flat)
        return self.state[name]

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
        """Member i's weights in hpo.training.models.MLP's state_dict format (loadable unfused)."""
        return _export(self._member_tensors(i))

    def _member_tensors(self, i: int, source: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Member i's own (unpadded) parameters and buffers, or its slice of an optimizer state."""
        m = self.members[i]
        out = {}
        for name, shape in m.shapes.items():
            if name in m.param_names:
                out[name] = self._view(name, source)[i][_corner(shape)].detach()
            elif source is None:
                out[name] = self.buffers[name][i][_corner(shape)]
        return out

    def member_optimizer_state(self, i: int) -> dict[str, dict[str, torch.Tensor]]:
        return {s: _export(self._member_tensors(i, v)) for s, v in self.state.items()}

    @torch.no_grad()
    def load_member(self, i: int, model: dict[str, torch.Tensor], optimizer: dict[str, dict[str, torch.Tensor]],
                    steps: float) -> None:
        """Put member i back where a checkpoint (member_state_dict + member_optimizer_state) left it."""
        m = self.members[i]
        assert self.flat is not None
        for name, shape in m.shapes.items():
            value = model[name].to(self.device)
            if name in m.param_names:
                self._view(name)[i][_corner(shape)] = value
            else:
                self.buffers[name][i][_corner(shape)] = value
        for state_name, tensors in optimizer.items():
            if state_name not in self.state:
                self.state[state_name] = torch.zeros_like(self.flat)
            for name, value in tensors.items():
                self._view(name, self.state[state_name])[i][_corner(m.shapes[name])] = value.to(self.device)
        self.steps[i] = steps

