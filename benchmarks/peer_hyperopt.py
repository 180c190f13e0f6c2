"""Hyperopt's TPE on a problem of the suite, as its docs show it: `fmin(objective, space,
algo=tpe.suggest)`, one trial at a time in this process (Hyperopt runs trials in parallel only
through MongoDB or Spark), no pruning (Hyperopt has none), every epoch trained, torch's default
threads, and the hand-written script's wall time as `fmin`'s timeout. Data, space and training are
the suite's. A benchmark dependency only (benchmarks/README.md).

Prints one JSON line per finished trial ({"t", "state", "value", "epochs"}) and a last line
{"best": ..., "trials": ...}.

    /path/to/peers/bin/python benchmarks/peer_hyperopt.py --problem digits --seed 0 --time 14.2
"""

import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _peer import Lines, peer_args  # noqa: E402


def main() -> None:
    args = peer_args()
    start = time.time()

    import numpy as np
    from hyperopt import STATUS_OK, Trials, fmin, hp, tpe
    from suite import PROBLEMS

    problem = PROBLEMS[args.problem]
    data = problem.load(args.seed)
    lines = Lines(problem.direction, problem.epochs)
    sign = lines.sign  # fmin minimizes

    def dimension(name: str, p: dict) -> object:
        if "choices" in p:
            return hp.choice(name, p["choices"])
        low, high = p["low"], p["high"]
        if p["type"] == "int":
            if p.get("log"):
                return hp.qloguniform(name, math.log(low), math.log(high), 1)
            return hp.quniform(name, low, high, 1)
        return hp.loguniform(name, math.log(low), math.log(high)) if p.get("log") else hp.uniform(name, low, high)

    space = {name: dimension(name, p) for name, p in problem.space.items()}
    def objective(params: dict) -> dict:
        params = {k: int(v) if problem.space[k].get("type") == "int" else v for k, v in params.items()}
        value = problem.fit(params, data, problem.epochs, lambda epoch, v: None)
        lines.trial(value, problem.epochs)
        return {"loss": sign * value if math.isfinite(value) else math.inf, "status": STATUS_OK}

    trials = Trials()
    fmin(objective, space, algo=tpe.suggest, max_evals=100_000, trials=trials, show_progressbar=False,
         timeout=max(1, int(args.time - (time.time() - start))), rstate=np.random.default_rng(args.seed))
    lines.end(len(trials))


if __name__ == "__main__":
    main()
