"""Your training code, called once per trial by hpo with an hpo.Trial: its parameters, its device,
where to resume from, and report() / save_checkpoint() to tell hpo how it goes."""

from typing import Any

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hpo


def datasets() -> dict[str, TensorDataset]:
    """scikit-learn's digits, 70/15/15, the same split every trial (replace with your data)."""
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images / 16.0, dtype=torch.float32)
    y = torch.tensor(labels)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    a, b = int(0.7 * len(x)), int(0.85 * len(x))
    return {"train": TensorDataset(x[:a], y[:a]), "val": TensorDataset(x[a:b], y[a:b]),
            "test": TensorDataset(x[b:], y[b:])}


def build(params: dict[str, Any]) -> nn.Module:
    return nn.Sequential(nn.Linear(64, params["hidden"]), nn.ReLU(), nn.Dropout(params["dropout"]),
                         nn.Linear(params["hidden"], 10))


def accuracy(model: nn.Module, data: TensorDataset, device: torch.device) -> float:
    x, y = (t.to(device) for t in data.tensors)
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def train(trial: hpo.Trial) -> None:
    p = trial.params
    data = datasets()
    model = build(p).to(trial.device)
    opt = torch.optim.AdamW(model.parameters(), lr=p["lr"])
    if (state := trial.load_checkpoint()) is not None:  # a resumed trial: where it was
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
    loader = DataLoader(data["train"], batch_size=p["batch_size"], shuffle=True)
    for epoch in range(trial.start_epoch, trial.epochs):
        model.train()
        for x, y in loader:
            x, y = x.to(trial.device), y.to(trial.device)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        trial.report(epoch, val_accuracy=accuracy(model, data["val"], trial.device))  # may prune
        trial.save_checkpoint({"model": model.state_dict(), "opt": opt.state_dict()})


def test(trial: hpo.Trial) -> dict[str, float]:
    """Once, on the best trial: its final state scored on the test split."""
    model = build(trial.params)
    model.load_state_dict(trial.load_checkpoint()["model"])
    return {"test_accuracy": accuracy(model, datasets()["test"], torch.device("cpu"))}
