"""The same digits study on Ray Tune, as its docs show it: a function trainable reporting each
epoch, OptunaSearch (TPE, seeded), the median stopping rule, one CPU per trial and as many trials
at once as there are cores. Same space, split and MLP as benchmarks/handwritten_digits.py (whose
data, model and epoch code it reuses). Ray is a benchmark dependency only: run it with an interpreter
that has `pip install "ray[tune]" optuna scikit-learn torch==2.13.0`.

    /path/to/ray-venv/bin/python benchmarks/ray_tune_digits.py --seed 0
"""

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=20)
    args = ap.parse_args()

    import ray
    import torch
    from handwritten_digits import build, load, one_epoch, optimizer_for
    from ray import tune
    from ray.tune.schedulers import MedianStoppingRule
    from ray.tune.search.optuna import OptunaSearch

    data = load(args.seed)
    epochs = args.epochs

    def trainable(config: dict) -> None:
        torch.set_num_threads(1)
        x_train, y_train, x_val, y_val = data
        model = build(x_train.shape[1], config["width"], config["depth"], config["dropout"])
        optimizer = optimizer_for(model, config["optimizer"], config["lr"], config["momentum"])
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_train, y_train),
                                             batch_size=config["batch_size"], shuffle=True)
        for _ in range(epochs):
            accuracy = one_epoch(model, optimizer, loader, x_val, y_val)
            tune.report({"val_accuracy": accuracy})

    space = {
        "lr": tune.loguniform(1e-4, 1e-1),
        "batch_size": tune.choice([32, 64, 128]),
        "width": tune.lograndint(64, 513),
        "depth": tune.randint(1, 4),
        "dropout": tune.uniform(0.0, 0.5),
        "optimizer": tune.choice(["adam", "momentum"]),
        "momentum": tune.uniform(0.8, 0.99),
    }
    import optuna

    cores = len(os.sched_getaffinity(0))
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": 1}),
            param_space=space,
            tune_config=tune.TuneConfig(
                metric="val_accuracy", mode="max", num_samples=args.trials, max_concurrent_trials=cores,
                search_alg=OptunaSearch(sampler=optuna.samplers.TPESampler(seed=args.seed, n_startup_trials=10)),
                scheduler=MedianStoppingRule(grace_period=5, min_samples_required=5),
            ),
            run_config=tune.RunConfig(storage_path=tmp, verbose=0),
        )
        results = tuner.fit()
        # As Optuna counts it: the final accuracy of the trials that ran every epoch.
        finals = [r.metrics["val_accuracy"] for r in results if r.metrics.get("training_iteration") == epochs]
        print(json.dumps({"best": max(finals), "trials": len(results)}))


if __name__ == "__main__":
    main()
