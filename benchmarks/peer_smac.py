"""SMAC3's multi-fidelity facade on a problem of the suite, as its docs show it: Hyperband over
epochs as the budget (from 1 to the problem's epochs; a configuration is trained from scratch for
each budget it is given), the facade's defaults otherwise, one worker, and the hand-written script's
wall time as its walltime limit. Data, space and training are the suite's. A benchmark dependency
only (benchmarks/README.md).

Prints one JSON line per finished trial ({"t", "state", "value", "epochs"}; COMPLETE when it ran
every epoch) and a last line {"best": ..., "trials": ...}.

    /path/to/peers/bin/python benchmarks/peer_smac.py --problem digits --seed 0 --time 14.2
"""

import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _peer import Lines, peer_args  # noqa: E402


def main() -> None:
    args = peer_args()
    start = time.time()

    from ConfigSpace import (
        Categorical,
        ConfigurationSpace,
        EqualsCondition,
        Float,
        Integer,
    )
    from smac import MultiFidelityFacade, Scenario
    from suite import PROBLEMS

    problem = PROBLEMS[args.problem]
    data = problem.load(args.seed)
    lines = Lines(problem.direction, problem.epochs)
    # SMAC minimizes a cost: an accuracy's is its error (1 - accuracy), an RMSE is its own.
    def cost(value: float) -> float:
        return (1.0 - value if problem.direction == "maximize" else value) if math.isfinite(value) else 1e9
    cs = ConfigurationSpace(seed=args.seed)
    dims = {}
    for name, p in problem.space.items():
        if "choices" in p:
            dims[name] = Categorical(name, p["choices"])
        elif p["type"] == "int":
            dims[name] = Integer(name, (p["low"], p["high"]), log=p.get("log", False))
        else:
            dims[name] = Float(name, (p["low"], p["high"]), log=p.get("log", False))
    cs.add(list(dims.values()))
    for name, p in problem.space.items():
        for parent, value in p.get("when", {}).items():
            cs.add(EqualsCondition(dims[name], dims[parent], value))
    def train(config: object, seed: int = 0, budget: float = 1.0) -> float:
        epochs = max(1, int(round(budget)))
        # ConfigSpace gives numpy scalars (a categorical batch size is a numpy int, which
        # torch's DataLoader refuses: every trial crashed, and SMAC's model then failed on the
        # infinite costs): Python values, as the other peers pass them.
        params = {k: v.item() if hasattr(v, "item") else v for k, v in dict(config).items()}
        value = problem.fit(params, data, epochs, lambda epoch, v: None)
        lines.trial(value, epochs)
        return cost(value)

    with tempfile.TemporaryDirectory() as tmp:
        scenario = Scenario(cs, deterministic=True, n_trials=100_000, min_budget=1, max_budget=problem.epochs,
                            walltime_limit=max(1.0, args.time - (time.time() - start)), seed=args.seed,
                            output_directory=tmp)
        smac = MultiFidelityFacade(scenario, train, overwrite=True, logging_level=40)
        smac.optimize()
        lines.end(len(smac.runhistory))


if __name__ == "__main__":
    main()
