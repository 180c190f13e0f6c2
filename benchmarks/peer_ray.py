"""Ray Tune on a problem of the suite, as its docs show it: a function trainable reporting each epoch,
OptunaSearch (TPE, seeded) and the ASHA scheduler with their defaults, one CPU per trial, two trials
at a time, and the hand-written script's wall time as its time budget. Data, space and training are
the suite's. Ray is a benchmark dependency only: run it with an interpreter that has
`pip install "ray[tune]" optuna scikit-learn torch==2.13.0` (benchmarks/README.md).

Prints one JSON line per finished trial ({"t", "state", "value", "epochs"}; COMPLETE when it ran
every epoch, as Optuna counts it) and a last line {"best": ..., "trials": ...}.

    /path/to/peers/bin/python benchmarks/peer_ray.py --problem digits --seed 0 --time 14.2
"""

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _peer import Lines, peer_args  # noqa: E402


def main() -> None:
    args = peer_args()
    start = time.time()

    import optuna
    import ray
    import torch
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch
    from suite import PROBLEMS

    problem = PROBLEMS[args.problem]
    data = problem.load(args.seed)
    epochs, metric = problem.epochs, problem.metric
    lines = Lines(problem.direction, epochs)

    def trainable(config: dict) -> None:
        torch.set_num_threads(1)
        problem.fit(config, data, epochs, lambda epoch, value: tune.report({metric: value}))

    class Finished(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):  # type: ignore[no-untyped-def]
            last = trial.last_result or {}
            lines.trial(last.get(metric), last.get("training_iteration", 0))

    def space(p: dict) -> object:
        if "choices" in p:
            return tune.choice(p["choices"])
        if p["type"] == "int":
            return (tune.lograndint if p.get("log") else tune.randint)(p["low"], p["high"] + 1)
        return (tune.loguniform if p.get("log") else tune.uniform)(p["low"], p["high"])

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    mode = "max" if problem.direction == "maximize" else "min"
    with tempfile.TemporaryDirectory() as tmp:
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": 1}),
            param_space={name: space(p) for name, p in problem.space.items()},
            tune_config=tune.TuneConfig(
                metric=metric, mode=mode, num_samples=-1, max_concurrent_trials=2,
                time_budget_s=max(1.0, args.time - (time.time() - start)),
                search_alg=OptunaSearch(sampler=optuna.samplers.TPESampler(seed=args.seed, n_startup_trials=10)),
                scheduler=ASHAScheduler(max_t=epochs),
            ),
            run_config=tune.RunConfig(storage_path=tmp, verbose=0, callbacks=[Finished()]),
        )
        results = tuner.fit()
        finals = [r.metrics[metric] for r in results if r.metrics.get("training_iteration") == epochs]
        best = (max if mode == "max" else min)(finals) if finals else float("nan")
        lines.end(len(results), best)


if __name__ == "__main__":
    main()
