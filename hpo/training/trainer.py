"""The training loop for one model, independent of Optuna.

Hot-path rules (see benchmarks/): batches are index slices of device-resident tensors, the loss
is accumulated on the device and read once per epoch (no `.item()` per batch), evaluation runs in
large batches under `inference_mode`, and bf16 autocast is on for CUDA.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hpo.data.splits import Data, Split
from hpo.data.user import Stream
from hpo.runtime.checkpoints import load_optimizer_by_name, optimizer_by_name
from hpo.runtime.endings import Diverged
from hpo.spec.params import Params
from hpo.training.models import ensemble_mean
from hpo.training.optim import Schedule, eval_mode, make_optimizer, train_mode

EVAL_BATCH = 4096  # evaluation needs no gradients, so big batches are cheap and fast


@dataclass(frozen=True)
class EpochResult:
    epoch: int  # 0-based index of the epoch just finished
    train_loss: float
    val: dict[str, float]  # loss, plus accuracy (classification) or mse (regression)
    seconds: float


def metric_value(metric: str, scores: dict[str, float]) -> float:
    """`val_accuracy` -> scores['accuracy'], `val_loss` -> scores['loss'], ..."""
    return scores[metric.removeprefix("val_").removeprefix("test_")]


def configure_device(device: torch.device) -> None:
    """Process-wide speed settings that do not change results beyond float tolerance."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def _loss(task: str, out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    if task == "regression":
        return F.mse_loss(out.squeeze(-1).float(), y, reduction=reduction)
    return F.cross_entropy(out.float(), y, reduction=reduction)


@torch.inference_mode()
def outputs_and_labels(model: nn.Module, split: Split | Stream, device: torch.device
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 outputs for a whole split and its labels: slices of a resident split, or the batches
    of a streamed one."""
    model.eval()
    autocast = device.type == "cuda"
    outs, labels = [], []
    if isinstance(split, Stream):
        batches: Any = split.batches(EVAL_BATCH, device)
    else:
        batches = ((split.x[s : s + EVAL_BATCH], None) for s in range(0, len(split), EVAL_BATCH))
    for xb, yb in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            outs.append(model(_as_input(xb)).float())
        if yb is not None:
            labels.append(yb)
    out = torch.cat(outs) if outs else torch.zeros((0,), device=device)
    return out, (torch.cat(labels) if isinstance(split, Stream) else split.y)


def _as_input(x: torch.Tensor) -> torch.Tensor:
    return x if x.is_floating_point() else x.float()


def _as_target(y: torch.Tensor, task: str) -> torch.Tensor:
    return y.float() if task == "regression" else y.long()


@torch.inference_mode()
def score(outputs: torch.Tensor, y: torch.Tensor, task: str, probabilities: bool = False) -> dict[str, float]:
    """Mean loss and accuracy (or MSE), read back in one host sync."""
    n = max(1, int(y.shape[0]))
    if task == "regression":
        mse = float(F.mse_loss(outputs.squeeze(-1), y, reduction="sum")) / n
        return {"loss": mse, "mse": mse}
    if probabilities:
        loss = F.nll_loss(outputs.clamp_min(1e-12).log(), y, reduction="sum")
    else:
        loss = F.cross_entropy(outputs, y, reduction="sum")
    correct = (outputs.argmax(1) == y).sum()
    values = torch.stack([loss, correct.to(loss.dtype)]).tolist()
    return {"loss": values[0] / n, "accuracy": values[1] / n}


def evaluate(model: nn.Module, split: Split | Stream, task: str, device: torch.device) -> dict[str, float]:
    out, y = outputs_and_labels(model, split, device)
    return score(out, _as_target(y, task), task)


def evaluate_ensemble(
    models: list[nn.Module], splits: list[Split | Stream], task: str, device: torch.device
) -> dict[str, float]:
    """Score the mean prediction of several models (the k fold models of a cross-validated
    trial); each model sees the split scaled with its own fold's statistics."""
    if len(models) == 1:
        return evaluate(models[0], splits[0], task, device)
    pairs = [outputs_and_labels(m, s, device) for m, s in zip(models, splits)]
    outs, y = [o for o, _ in pairs], _as_target(pairs[0][1], task)
    return score(ensemble_mean(outs, task), y, task, probabilities=task != "regression")


def _batches(batch_size: int, n: int) -> tuple[int, list[int]]:
    """The batch size for `n` samples and where each batch starts: a trailing batch of one sample
    breaks BatchNorm and adds noise, so it is skipped."""
    size = min(batch_size, n)
    return size, [s for s in range(0, n, size) if n - s >= 2 or s == 0]


class Trainer:
    """Model, optimizer, schedule and RNG of one training run; checkpointable as a whole."""

    def __init__(
        self,
        model: nn.Module,
        params: Params,
        data: Data,
        epochs: int,
        device: torch.device,
        seed: int,
        compile_model: bool = False,
        shard: tuple[int, int] | None = None,
    ) -> None:
        self.model = model.to(device)
        # torch.compile fuses the small ops of a step into fewer kernels (GPU); the compiled
        # wrapper shares parameters and state_dict keys' values with the original module.
        self.step_model: Any = torch.compile(self.model) if compile_model else self.model
        # (rank, world size) of a trial of several processes: each rank trains on its share of every
        # batch (batch_size stays the global batch) and DDP averages the gradients.
        self.shard = shard if shard is not None and shard[1] > 1 else None
        self.world = shard[1] if self.shard is not None and shard is not None else 1
        if self.shard is not None:
            from torch.nn.parallel import DistributedDataParallel

            self.step_model = DistributedDataParallel(self.model, device_ids=[device] if device.type == "cuda" else None)
        self.params = params
        self.data = data
        self.epochs = epochs
        self.device = device
        self.task = data.task
        n = len(data.train)
        self.batch_size, self.starts = _batches(params.batch_size, n)
        self.opt = make_optimizer(self.model.parameters(), params, device)
        self.schedule = Schedule(params, self.opt, epochs, len(self.starts))
        self.seed = seed
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(seed)
        # A streamed train split is shuffled by its DataLoader, which draws on a CPU generator.
        self.loader_gen = self.gen if device.type == "cpu" else torch.Generator().manual_seed(seed)
        self.epoch = 0  # epochs completed
        self.train_losses: list[float] = []
        self.epoch_seconds: list[float] = []
        self.autocast = device.type == "cuda"
        # Called before every batch with the epoch in flight; raises hpo.runtime.endings.Stop to end the
        # run there (a trial's or the study's time limit: hpo.runtime.endings.Deadlines.check).
        self.check: Callable[[int], None] | None = None

    def train_epoch(self) -> float:
        self.model.train()
        train_mode(self.opt)
        total = torch.zeros((), device=self.device)
        seen = 0
        check = self.check
        for xb, yb, n in self._batches():
            if check is not None:
                check(self.epoch)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                out = self.step_model(xb)
                if n is None:
                    loss = _loss(self.task, out, yb)
                else:  # this rank's share of a global batch of n: DDP's mean over ranks is the batch's mean
                    summed = _loss(self.task, out, yb, reduction="sum")
                    loss = summed * (self.world / n)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            self.opt.step()
            self.schedule.after_batch()
            if n is None:
                total.add_(loss.detach(), alpha=yb.shape[0])  # one kernel, no host sync
            else:
                total.add_(summed.detach())
            seen += yb.shape[0]
        if self.shard is not None:  # the epoch's loss over every rank's samples
            import torch.distributed as dist

            both = torch.stack([total, torch.tensor(float(seen), device=self.device)])
            dist.all_reduce(both)
            return float(both[0]) / max(1.0, float(both[1]))
        return float(total) / max(1, seen)  # the epoch's only host sync

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int | None]]:
        """Index slices of the resident train split in a fresh order, or a streamed split's batches;
        with a shard, this rank's part of each (and the global batch's size, for the loss)."""
        train = self.data.train
        if isinstance(train, Stream):
            one_left = len(train) % self.batch_size == 1 and len(train) > 1  # as `starts` skips it
            if self.shard is not None:  # a DistributedSampler: each rank a batch_size / world share
                rank, world = self.shard
                for xb, yb in train.batches(max(1, self.batch_size // world), self.device, shuffle=True,
                                            shard=(rank, world, self.seed, self.epoch)):
                    yield _as_input(xb), _as_target(yb, self.task), None
                return
            for xb, yb in train.batches(self.batch_size, self.device, shuffle=True, generator=self.loader_gen,
                                        drop_last=one_left):
                yield _as_input(xb), _as_target(yb, self.task), None
            return
        x, y = train.x, train.y
        perm = torch.randperm(x.shape[0], device=self.device, generator=self.gen)  # the same on every rank
        for start in self.starts:
            idx = perm[start : start + self.batch_size]
            if self.shard is None:
                yield x.index_select(0, idx), y.index_select(0, idx), None
            else:
                mine = idx[self.shard[0] :: self.shard[1]]
                yield x.index_select(0, mine), y.index_select(0, mine), idx.shape[0]

    def evaluate(self, split: Split | Stream) -> dict[str, float]:
        eval_mode(self.opt)
        return evaluate(self.model, split, self.task, self.device)

    def run_epoch(self) -> EpochResult:
        t0 = time.perf_counter()
        train_loss = self.train_epoch()
        if not math.isfinite(train_loss):
            raise Diverged("train_loss", train_loss, self.epoch)
        val = self.evaluate(self.data.val)
        if not math.isfinite(val["loss"]):
            raise Diverged("val_loss", val["loss"], self.epoch)
        self.schedule.after_epoch(val["loss"])
        seconds = time.perf_counter() - t0
        result = EpochResult(self.epoch, train_loss, val, seconds)
        self.train_losses.append(train_loss)
        self.epoch_seconds.append(seconds)
        self.epoch += 1
        return result

    def fit(self, on_epoch: Callable[[EpochResult], None] | None = None) -> list[EpochResult]:
        """Train the remaining epochs; `on_epoch` may raise to stop early (e.g. pruning)."""
        results = []
        while self.epoch < self.epochs:
            r = self.run_epoch()
            results.append(r)
            if on_epoch is not None:
                on_epoch(r)
        return results

    # ---- checkpoints ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The portable training state (hpo.runtime.checkpoints): a fused group reads and writes it too."""
        state: dict[str, Any] = {
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": optimizer_by_name(self.opt, self.model),
            "schedule": self.schedule.state_dict(),
            "generator": self.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "train_losses": list(self.train_losses),
            "epoch_seconds": list(self.epoch_seconds),
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def retune(self, old: Params, params: Params) -> None:
        """Apply new training parameters over a state loaded with `old` ones (a population member
        continuing from another's checkpoint): the optimizer's values and the schedule's base, the
        schedule's progress kept. Loading an optimizer's state brings back the old values
        (ray#62173); the model was built with the new ones (dropout)."""
        self.params = params
        self.batch_size, self.starts = _batches(params.batch_size, len(self.data.train))
        for group in self.opt.param_groups:
            factor = group["lr"] / old.lr if old.lr else 1.0  # where the schedule is, kept
            group["lr"] = params.lr * factor
            if "initial_lr" in group:
                group["initial_lr"] = params.lr
            group["weight_decay"] = params.weight_decay
            if "momentum" in group and params.optimizer in ("momentum", "nesterov"):
                group["momentum"] = params.momentum
            if "betas" in group and params.optimizer in ("adam", "adamw", "schedulefree_adamw"):
                group["betas"] = (params.beta1, params.beta2)
        sched = self.schedule.sched
        if sched is not None and hasattr(sched, "base_lrs"):
            sched.base_lrs = [params.lr for _ in sched.base_lrs]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        load_optimizer_by_name(self.opt, self.model, state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.gen.set_state(state["generator"].cpu())
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"].cpu())
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)
        self.epoch = int(state["epoch"])
        self.train_losses = list(state.get("train_losses", []))
        self.epoch_seconds = list(state.get("epoch_seconds", []))
