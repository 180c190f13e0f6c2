"""Question 5: how do trials per minute scale with local workers on PostgreSQL?

`hpo run --workers K` on a fresh PostgreSQL database, K = 1 and 2, alternating, several repeats.
One worker uses all cores; K workers split them (threads = cores / K). Random sampling and no
pruning, so every run does the same work. Target: >= 1.8x trials per minute with 2 workers on 2 cores.

    python benchmarks/workers.py [--repeats 3] [--trials 40]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import yaml
from _common import HERE, alternate, median, record, table

SPEC = {
    "name": "workers_bench",
    "seed": 0,
    "data": {"dataset": "synthetic", "n_samples": 20000, "n_features": 32, "n_classes": 4},
    "space": {"lr": {"low": 1e-3, "high": 1e-2, "log": True}, "width": {"low": 64, "high": 256}, "depth": 2,
              "batch_size": 64},
    "sampler": {"name": "random"},
    "pruner": {"name": "none"},
    "budget": {"n_trials": 24, "epochs": 6},
}


def run(workers: int, trials: int, tmp: Path) -> tuple[float, float]:
    """(trials per minute over the whole command, trials per minute from the first trial's start
    to the last one's end: the steady state, without process start-up)."""
    import psycopg

    name = f"hpo_bench_{uuid.uuid4().hex[:10]}"
    admin = dict(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", autocommit=True)
    with psycopg.connect(**admin) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    spec = tmp / f"{name}.yaml"
    spec.write_text(yaml.safe_dump(dict(SPEC, budget=dict(SPEC["budget"], n_trials=trials))))
    env = dict(os.environ, HPO_STORAGE=f"postgresql://postgres@127.0.0.1:5432/{name}")
    try:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "hpo", "run", str(spec), "--workers", str(workers), "--quiet",
                        "--artifacts", str(tmp / name)], env=env, check=True, cwd=HERE.parent,
                       stdout=subprocess.DEVNULL)
        whole = trials / ((time.perf_counter() - t0) / 60)
        import optuna

        ts = optuna.load_study(study_name=SPEC["name"], storage=env["HPO_STORAGE"]).trials
        span = (max(t.datetime_complete for t in ts) - min(t.datetime_start for t in ts)).total_seconds()
        return whole, len(ts) / (span / 60)
    finally:
        with psycopg.connect(**admin) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        res = alternate({k: (lambda k=k: run(k, args.trials, Path(tmp))) for k in (1, 2)}, args.repeats)
    rows = [[k, median([r[0] for r in v]), median([r[1] for r in v]), " ".join(f"{r[1]:.1f}" for r in v)]
            for k, v in res.items()]
    whole = rows[1][1] / rows[0][1]
    steady = rows[1][2] / rows[0][2]
    body = table(["workers", "trials / min (whole command)", "trials / min (first start to last end)",
                  "runs (steady)"], rows)
    notes = (f"{args.trials} trials x {SPEC['budget']['epochs']} epochs per run (synthetic 20000 x 32, MLP up to "
             f"256 wide, random sampling, no pruning). **2 workers / 1 worker: {steady:.2f}x** trials per minute "
             f"in the steady state, {whole:.2f}x over the whole command including the workers' start-up "
             f"(target >= 1.8x).")
    record("Workers on PostgreSQL: trials per minute", body, notes, save=not args.no_save)


if __name__ == "__main__":
    main()
