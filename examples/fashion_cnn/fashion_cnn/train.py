"""The training loop hpo tunes: an ordinary PyTorch loop that reports to an hpo.Trial."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import hpo
from fashion_cnn.data import FashionMNIST
from fashion_cnn.model import SmallCNN

N_TRAIN, N_VAL, N_TEST = 4000, 1000, 2000  # a slice of Fashion-MNIST: minutes on two CPU cores


def evaluate(model: SmallCNN, data: FashionMNIST, device: torch.device) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        out = model(data.x.to(device))
        y = data.y.to(device)
        loss, acc = F.cross_entropy(out, y).item(), (out.argmax(1) == y).float().mean().item()
    model.train()
    return acc, loss


def train(trial: hpo.Trial) -> None:
    p = trial.params
    torch.manual_seed(trial.seed % 2**31)
    model = SmallCNN(p["channels"], p["dropout"]).to(trial.device)
    if p["optimizer"] == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=p["lr"], momentum=p["momentum"])
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=p["lr"], weight_decay=p["weight_decay"])
    if (state := trial.load_checkpoint()) is not None:  # a retried or resumed trial
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
    loader = DataLoader(FashionMNIST("train", N_TRAIN), batch_size=p["batch_size"], shuffle=True)
    val = FashionMNIST("val", N_VAL)
    for epoch in range(trial.start_epoch, trial.epochs):
        for x, y in loader:
            x, y = x.to(trial.device), y.to(trial.device)
            loss = F.cross_entropy(model(x), y, label_smoothing=p["label_smoothing"])
            opt.zero_grad()
            loss.backward()
            opt.step()
        acc, val_loss = evaluate(model, val, trial.device)
        trial.report(epoch, val_accuracy=acc, val_loss=val_loss)  # raises hpo.TrialPruned when pruned
        trial.save_checkpoint({"model": model.state_dict(), "opt": opt.state_dict()})


def test(trial: hpo.Trial) -> dict[str, float]:
    """Called once, after the search, on the best trial: scores the held-out test images."""
    state = trial.load_checkpoint()
    model = SmallCNN(trial.params["channels"], trial.params["dropout"]).to(trial.device)
    model.load_state_dict(state["model"])
    acc, loss = evaluate(model, FashionMNIST("test", N_TEST), trial.device)
    return {"test_accuracy": acc, "test_loss": loss}
