"""An ordinary DistributedDataParallel loop, tuned by hpo with each trial on 2 processes.

hpo starts the processes and sets up torch.distributed before calling `train` on every rank;
each rank trains on its share of the data (a DistributedSampler), DDP averages the gradients,
and every rank calls `trial.report()`, where rank 0's decision (go on, pruned, stopped) is
raised on all of them at the same epoch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import hpo


def _data() -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    x_train, x_rest, y_train, y_rest = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    x_val, x_test, y_val, y_test = train_test_split(x_rest, y_rest, test_size=0.5, random_state=0, stratify=y_rest)
    return TensorDataset(x_train, y_train), TensorDataset(x_val, y_val), TensorDataset(x_test, y_test)


def _model(params: dict) -> nn.Module:
    return nn.Sequential(nn.Linear(64, params["width"]), nn.ReLU(), nn.Dropout(params["dropout"]),
                         nn.Linear(params["width"], 10))


def _accuracy(model: nn.Module, data: TensorDataset) -> float:
    model.eval()
    with torch.no_grad():
        x, y = data.tensors
        return (model(x).argmax(1) == y).float().mean().item()


def train(trial: hpo.Trial) -> None:
    p = trial.params
    train_set, val_set, _ = _data()
    model = _model(p)
    ddp = DistributedDataParallel(model)  # rank 0's initial weights are broadcast to every rank
    opt = torch.optim.AdamW(ddp.parameters(), lr=p["lr"])
    if (state := trial.load_checkpoint()) is not None:  # every rank gets the same checkpoint
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
    sampler = DistributedSampler(train_set, seed=trial.seed)  # this rank's share of each epoch
    # batch_size is the global batch: each of the world_size ranks takes its part.
    loader = DataLoader(train_set, batch_size=p["batch_size"] // trial.world_size, sampler=sampler)
    for epoch in range(trial.start_epoch, trial.epochs):
        sampler.set_epoch(epoch)
        model.train()
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(ddp(x), y).backward()  # gradients averaged over the ranks
            opt.step()
        accuracy = torch.tensor(_accuracy(model, val_set))
        dist.all_reduce(accuracy, op=dist.ReduceOp.AVG)  # the same on every rank; rank 0's is recorded
        trial.report(epoch, val_accuracy=accuracy.item())
        trial.save_checkpoint({"model": model.state_dict(), "opt": opt.state_dict()})  # rank 0's is kept


def test(trial: hpo.Trial) -> dict[str, float]:
    """Once, on the best trial, in one process: its final weights on the test split."""
    model = _model(trial.params)
    model.load_state_dict(trial.load_checkpoint()["model"])
    return {"test_accuracy": _accuracy(model, _data()[2])}
