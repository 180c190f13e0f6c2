"""Hyperopt's TPE on a problem of the suite, as its docs show it: `fmin(objective, space,
algo=tpe.suggest)`, one trial at a time in this process (Hyperopt runs trials in parallel only
through MongoDB or Spark), no pruning (Hyperopt has none), every epoch trained, torch's default
threads, and the hand-written script's wall time as `fmin`'s timeout. Data, space and training are
the suite's. A benchmark dependency only (benchmarks/README.md).

Prints one JSON line per finished trial ({"t", "state", "value", "epochs"}) and a last line
{"best": ..., "trials": ...}.

    /path/to/peers/bin/python benchmarks/peer_hyperopt.py --problem digits --seed 0 --time 14.2
"""

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problem", default="digits")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time", type=float, required=True, help="seconds: the script's wall time")
    args = ap.parse_args()
    start = time.time()

    import numpy as np
    from hyperopt import STATUS_OK, Trials, fmin, hp, tpe
    from suite import PROBLEMS

    problem = PROBLEMS[args.problem]
    data = problem.load(args.seed)
    sign = -1.0 if problem.direction == "maximize" else 1.0  # fmin minimizes

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
    best = [math.nan]

    def objective(params: dict) -> dict:
        params = {k: int(v) if problem.space[k].get("type") == "int" else v for k, v in params.items()}
        value = problem.fit(params, data, problem.epochs, lambda epoch, v: None)
        print(json.dumps({"t": time.time(), "state": "COMPLETE", "value": value, "epochs": problem.epochs}), flush=True)
        if math.isfinite(value) and (math.isnan(best[0]) or sign * value < sign * best[0]):
            best[0] = value
        return {"loss": sign * value if math.isfinite(value) else math.inf, "status": STATUS_OK}

    trials = Trials()
    fmin(objective, space, algo=tpe.suggest, max_evals=100_000, trials=trials, show_progressbar=False,
         timeout=max(1, int(args.time - (time.time() - start))), rstate=np.random.default_rng(args.seed))
    print(json.dumps({"best": best[0], "trials": len(trials)}))


if __name__ == "__main__":
    main()
