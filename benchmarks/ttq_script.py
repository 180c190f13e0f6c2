"""The script an engineer writes instead of hpo, for the time-to-quality benchmark: plain Optuna and
PyTorch in the style of optuna-examples (TPE, MedianPruner, in-memory storage, one intra-op thread,
a DataLoader, the whole validation set scored at once), on a problem of the suite (`suite.py`),
training with the suite's own code.

Prints one JSON line per finished trial ({"t": unix time, "start": its start, "state", "value", "epochs"}) and a last
line {"best": ..., "trials": ...}.

    python benchmarks/ttq_script.py --problem digits --seed 0 [--trials 30] [--epochs 15]
"""

import argparse
import json
import time

import optuna
import torch
from suite import PROBLEMS, suggest

torch.set_num_threads(1)
optuna.logging.set_verbosity(optuna.logging.WARNING)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problem", default="digits", choices=list(PROBLEMS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trials", type=int, default=None, help="default: the problem's")
    ap.add_argument("--epochs", type=int, default=None, help="default: the problem's")
    args = ap.parse_args()
    problem = PROBLEMS[args.problem]
    trials, epochs = args.trials or problem.trials, args.epochs or problem.epochs
    torch.manual_seed(args.seed)
    data = problem.load(args.seed)

    def objective(trial: optuna.Trial) -> float:
        def report(epoch: int, value: float) -> None:
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()

        return problem.fit(suggest(trial, problem.space), data, epochs, report)

    def tell(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        print(json.dumps({"t": time.time(), "start": trial.datetime_start.timestamp() if trial.datetime_start else None,
                          "state": trial.state.name, "value": trial.value,
                          "epochs": len(trial.intermediate_values)}), flush=True)

    study = optuna.create_study(direction=problem.direction,
                                sampler=optuna.samplers.TPESampler(seed=args.seed, n_startup_trials=10),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=4))
    study.optimize(objective, n_trials=trials, callbacks=[tell])
    print(json.dumps({"best": study.best_value, "trials": len(study.trials)}))


if __name__ == "__main__":
    main()
