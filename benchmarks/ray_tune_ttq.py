"""The time-to-quality problems on Ray Tune, as its docs show it: a function trainable reporting each
epoch, OptunaSearch (TPE, seeded), the ASHA scheduler with its defaults, one CPU per trial and two
trials at a time. Data, space, model and training are `ttq_problems`' (as the hand-written script's).
Ray is a benchmark dependency only: run it with an interpreter that has
`pip install "ray[tune]" optuna scikit-learn torch==2.13.0`.

Prints one JSON line per finished trial ({"t", "state", "value", "epochs"}; COMPLETE when it ran
every epoch, as Optuna counts it) and a last line {"best": ..., "trials": ...}.

    /path/to/ray-venv/bin/python benchmarks/ray_tune_ttq.py --problem digits --seed 0
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problem", default="digits", choices=["digits", "fashion"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=15)
    args = ap.parse_args()

    import optuna
    import ray
    import torch
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch
    from ttq_problems import fit, load

    data = load(args.problem, args.seed)
    epochs = args.epochs

    def trainable(config: dict) -> None:
        torch.set_num_threads(1)
        fit(config, data, epochs, lambda epoch, accuracy: tune.report({"val_accuracy": accuracy}))

    class Finished(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):  # type: ignore[no-untyped-def]
            last = trial.last_result or {}
            done = last.get("training_iteration", 0)
            print(json.dumps({"t": time.time(), "state": "COMPLETE" if done == epochs else "PRUNED",
                              "value": last.get("val_accuracy"), "epochs": done}), flush=True)

    space = {
        "lr": tune.loguniform(1e-4, 1e-1),
        "batch_size": tune.choice([32, 64, 128]),
        "width": tune.lograndint(64, 513),
        "depth": tune.randint(1, 4),
        "dropout": tune.uniform(0.0, 0.5),
        "optimizer": tune.choice(["adam", "momentum"]),
        "momentum": tune.uniform(0.8, 0.99),
    }
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": 1}),
            param_space=space,
            tune_config=tune.TuneConfig(
                metric="val_accuracy", mode="max", num_samples=args.trials, max_concurrent_trials=2,
                search_alg=OptunaSearch(sampler=optuna.samplers.TPESampler(seed=args.seed, n_startup_trials=10)),
                scheduler=ASHAScheduler(max_t=epochs),
            ),
            run_config=tune.RunConfig(storage_path=tmp, verbose=0, callbacks=[Finished()]),
        )
        results = tuner.fit()
        finals = [r.metrics["val_accuracy"] for r in results if r.metrics.get("training_iteration") == epochs]
        print(json.dumps({"best": max(finals), "trials": len(results)}))


if __name__ == "__main__":
    main()
