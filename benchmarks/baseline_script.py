"""The alternative our users have: a hand-written Optuna + PyTorch script in the style of
optuna-examples' pytorch/pytorch_simple.py (DataLoader, one trial at a time, per-epoch report
to the MedianPruner, validation accuracy counted batch by batch with .item()).

To compare like with like it searches the same space on the same data split with the same sampler
seed, pruner settings and budget as the hpo study it is run against (`run(spec)`); the model is the
same architecture. Only the way it trains, evaluates and stores differs.
"""

from __future__ import annotations

import optuna
import torch
import torch.nn.functional as F

from hpo.data.splits import DataCache
from hpo.search.samplers import make_pruner, make_sampler
from hpo.spec.schema import StudySpec
from hpo.spec.space import suggest
from hpo.training.models import build_model

DEVICE = torch.device("cpu")
VALID_BATCHSIZE = 128  # pytorch_simple.py's loader batch size


def run(spec: StudySpec, storage: str | None = None) -> optuna.Study:
    cache = DataCache(spec.data, spec.seed, DEVICE)

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, spec)
        data = cache.get(params.scaling)
        model = build_model(spec.model, params, data.input_shape, data.n_outputs).to(DEVICE)
        optimizer = {
            "adam": lambda: torch.optim.Adam(model.parameters(), lr=params.lr),
            "momentum": lambda: torch.optim.SGD(model.parameters(), lr=params.lr, momentum=params.momentum),
        }[params.optimizer]()
        train_loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(data.train.x, data.train.y),
            batch_size=params.batch_size, shuffle=True,
        )
        valid_loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(data.val.x, data.val.y), batch_size=VALID_BATCHSIZE, shuffle=True
        )
        for epoch in range(spec.budget.epochs):
            model.train()
            for data_, target in train_loader:
                optimizer.zero_grad()
                output = model(data_)
                loss = F.cross_entropy(output, target)
                loss.backward()
                optimizer.step()
            model.eval()
            correct = 0
            with torch.no_grad():
                for data_, target in valid_loader:
                    output = model(data_)
                    pred = output.argmax(dim=1, keepdim=True)
                    correct += pred.eq(target.view_as(pred)).sum().item()
            accuracy = correct / len(valid_loader.dataset)
            trial.report(accuracy, epoch)
            if trial.should_prune():
                raise optuna.exceptions.TrialPruned()
        return accuracy

    study = optuna.create_study(
        storage=storage, direction="maximize", sampler=make_sampler(spec), pruner=make_pruner(spec)
    )
    study.optimize(objective, n_trials=spec.budget.n_trials)
    return study
