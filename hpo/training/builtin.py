"""hpo's own training loop, written as a training function like any user's: it gets an
hpo.Trial, reports every epoch and saves checkpoints through the same API, so every rule about
how a trial ends, resumes and is recorded lives in the runtime (hpo.runtime.runner, hpo.runtime.lifecycle), not here.
"""

from __future__ import annotations

from typing import Any

import torch

from hpo.data.seeding import seed_all
from hpo.data.splits import DataCache
from hpo.runtime.trial import Trial
from hpo.spec.params import Params
from hpo.spec.schema import StudySpec
from hpo.training.models import build_model
from hpo.training.trainer import Trainer, metric_value


def fold_seed(seed: int, fold: int) -> int:
    return seed if fold == 0 else (seed * 1009 + fold) % (2**63)


class BuiltinTraining:
    """`train(trial)` for a spec's model (mlp, cnn or the user's factory) on its data."""

    def __init__(self, spec: StudySpec, data: DataCache) -> None:
        self.spec = spec
        self.data = data

    def __call__(self, trial: Trial) -> None:
        params = Params.from_mapping(trial.params)
        trainers = []
        for k, data in enumerate(self.data.folds(params.scaling)):  # one fold unless cv_folds
            seed_all(fold_seed(trial.seed, k))  # a model factory may draw from random or NumPy too
            model = build_model(self.spec.model, trial.params, data.input_shape, data.n_outputs)
            # The schedule spans the whole budget, also for a population member's segment (trial.epochs).
            t = Trainer(model, params, data, self.spec.budget.epochs, trial.device, fold_seed(trial.seed, k),
                        shard=(trial.rank, trial.world_size))
            t.check = trial.check  # the trial's and the study's time limits, every batch
            trainers.append(t)
        torch.manual_seed(trial.seed)
        if (state := trial.load_checkpoint()) is not None:
            for t, fold in zip(trainers, state["folds"]):
                t.load_state_dict(fold)
                if state.get("params", trial.params) != trial.params:  # a member's exploit: new values apply
                    t.retune(Params.from_mapping(state["params"]), params)
        trial.measure(trainers[0].model)  # its size, known before it trains
        if len(trainers) > 1:
            trial.set_attr("cv_folds", len(trainers))
        metric, n = self.spec.metric, len(trainers)
        # Every validation metric the study is judged on is reported; the first is pruned on.
        others = [o.name for o in self.spec.goals if o.per_epoch and o.name not in (metric, "val_loss")]

        def checkpoint() -> dict[str, Any]:  # built only when a checkpoint is due, or kept at the end
            return {"folds": [t.state_dict() for t in trainers], "params": dict(trial.params)}

        for epoch in range(trial.start_epoch, trial.epochs):
            results = [t.run_epoch() for t in trainers]
            # Cross-validation: the mean over folds is what is reported and pruned on.
            metrics = {metric: sum(metric_value(metric, r.val) for r in results) / n,
                       "train_loss": sum(r.train_loss for r in results) / n}
            if metric != "val_loss":
                metrics["val_loss"] = sum(r.val["loss"] for r in results) / n
            for name in others:
                metrics[name] = sum(metric_value(name, r.val) for r in results) / n
            trial.report(epoch, **metrics)
            trial.save_checkpoint(checkpoint)
        if "latency_ms" in self.spec.measures:  # on the trained model, on the trial's device
            trial.measure(trainers[0].model, example_input(trainers[0].data.val, trial.device))


def example_input(split: Any, device: torch.device) -> torch.Tensor:
    """One input sample of a split, resident or streamed."""
    if hasattr(split, "x"):
        x: torch.Tensor = split.x
    else:
        x, _ = next(iter(split.batches(1, device)))
    return x[:1]


def fold_models(saved: dict[str, Any]) -> list[dict[str, Any]]:
    """The model weights of each fold in a saved final state (this version's, or an older model.pt)."""
    if "folds" in saved:
        return [fold["model"] for fold in saved["folds"]]
    return list(saved["models"])
