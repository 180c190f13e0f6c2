"""The script an engineer writes instead of using hpo: plain Optuna + PyTorch on digits, in the
style of optuna-examples' pytorch_simple.py, written as well as a careful user would write it
(one intra-op thread, a DataLoader, the whole validation set scored at once, TPE, median pruning,
in-memory storage). It imports nothing from hpo.

It searches benchmarks/specs/digits_bench.yaml's space on the same split hpo makes (the same
sklearn calls with the same seed), with the same MLP (Linear, ReLU, dropout per layer), so the two
differ only in how trials are run. Prints {"best": ..., "trials": ...} as JSON.

    python benchmarks/handwritten_digits.py --seed 0 [--trials 30] [--epochs 20]
"""

import argparse
import json

import optuna
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn

torch.set_num_threads(1)
optuna.logging.set_verbosity(optuna.logging.WARNING)


def load(seed: int) -> tuple[torch.Tensor, ...]:
    x, y = load_digits(return_X_y=True)
    x_dev, _, y_dev, _ = train_test_split(x, y, test_size=0.15, random_state=seed, stratify=y)
    index = range(len(x_dev))
    tr, va = train_test_split(index, test_size=0.15 / 0.85, random_state=seed, stratify=y_dev)
    tr, va = sorted(tr), sorted(va)
    scaler = StandardScaler().fit(x_dev[tr])
    f = lambda a: torch.tensor(scaler.transform(a), dtype=torch.float32)  # noqa: E731
    return f(x_dev[tr]), torch.tensor(y_dev[tr]), f(x_dev[va]), torch.tensor(y_dev[va])


def build(n_in: int, width: int, depth: int, dropout: float) -> nn.Module:
    """The MLP hpo builds for these parameters: Linear, ReLU, dropout per layer, then the head."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(n_in, width), nn.ReLU(), nn.Dropout(dropout)]
        n_in = width
    return nn.Sequential(*layers, nn.Linear(n_in, 10))


def optimizer_for(model: nn.Module, name: str, lr: float, momentum: float | None) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum or 0.0)


def one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, loader: torch.utils.data.DataLoader,
              x_val: torch.Tensor, y_val: torch.Tensor) -> float:
    """Train one epoch, then score the whole validation set at once; returns the accuracy."""
    model.train()
    for xb, yb in loader:
        optimizer.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        return (model(x_val).argmax(1) == y_val).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    x_train, y_train, x_val, y_val = load(args.seed)

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        batch_size = trial.suggest_categorical("batch_size", [32, 64, 128])
        width = trial.suggest_int("width", 64, 512, log=True)
        depth = trial.suggest_int("depth", 1, 3)
        dropout = trial.suggest_float("dropout", 0.0, 0.5)
        name = trial.suggest_categorical("optimizer", ["adam", "momentum"])
        model = build(x_train.shape[1], width, depth, dropout)
        momentum = trial.suggest_float("momentum", 0.8, 0.99) if name == "momentum" else None
        optimizer = optimizer_for(model, name, lr, momentum)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_train, y_train),
                                             batch_size=batch_size, shuffle=True)
        accuracy = 0.0
        for epoch in range(args.epochs):
            accuracy = one_epoch(model, optimizer, loader, x_val, y_val)
            trial.report(accuracy, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return accuracy

    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=args.seed, n_startup_trials=10),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=4))
    study.optimize(objective, n_trials=args.trials)
    print(json.dumps({"best": study.best_value, "trials": len(study.trials)}))


if __name__ == "__main__":
    main()
