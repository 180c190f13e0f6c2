"""Questions 5 and 11: how do trials per hour scale with the local workers of one `hpo run`?

`hpo run --workers K` on a fresh storage (the embedded SQLite default, or PostgreSQL), K = 1, 2,
4 by default, alternating, several repeats. One worker runs in the `hpo run` process with all
cores; K workers split them (threads = cores / K). Random sampling and no pruning, so every run
does the same work. Target: >= 1.8x trials per hour with 2 workers on 2 cores.

    python benchmarks/workers.py [--repeats 3] [--trials 24] [--workers 1,2,4] [--storage sqlite|postgres]
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


def run(workers: int, trials: int, tmp: Path, storage: str) -> tuple[float, float]:
    """(trials per hour over the whole command, trials per hour from the first trial's start
    to the last one's end: the steady state, without process start-up)."""
    name = f"hpo_bench_{uuid.uuid4().hex[:10]}"
    admin = dict(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", autocommit=True)
    if storage == "postgres":
        import psycopg

        with psycopg.connect(**admin) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        url = f"postgresql://postgres@127.0.0.1:5432/{name}"
    else:
        url = f"sqlite:///{tmp / name}.db"
    spec = tmp / f"{name}.yaml"
    spec.write_text(yaml.safe_dump(dict(SPEC, budget=dict(SPEC["budget"], n_trials=trials))))
    env = dict(os.environ, HPO_STORAGE=url)
    try:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "hpo", "run", str(spec), "--workers", str(workers), "--quiet",
                        "--artifacts", str(tmp / name)], env=env, check=True, cwd=HERE.parent,
                       stdout=subprocess.DEVNULL)
        whole = trials / ((time.perf_counter() - t0) / 3600)
        import optuna

        ts = optuna.load_study(study_name=SPEC["name"], storage=env["HPO_STORAGE"]).trials
        span = (max(t.datetime_complete for t in ts) - min(t.datetime_start for t in ts)).total_seconds()
        return whole, len(ts) / (span / 3600)
    finally:
        if storage == "postgres":
            import psycopg

            with psycopg.connect(**admin) as c:
                c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--storage", choices=["sqlite", "postgres"], default="sqlite")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    counts = [int(k) for k in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        res = alternate({k: (lambda k=k: run(k, args.trials, Path(tmp), args.storage)) for k in counts}, args.repeats)
    rows = [[k, round(median([r[0] for r in v])), round(median([r[1] for r in v])),
             " ".join(f"{r[1]:.0f}" for r in v)] for k, v in res.items()]
    base = rows[0]
    ratios = "; ".join(f"**{r[0]} workers / 1 worker: {r[2] / base[2]:.2f}x** steady, {r[1] / base[1]:.2f}x whole"
                       for r in rows[1:])
    body = table(["workers", "trials / hour (whole command)", "trials / hour (first start to last end)",
                  "runs (steady)"], rows)
    notes = (f"{args.storage}, {args.trials} trials x {SPEC['budget']['epochs']} epochs per run (synthetic 20000 x "
             f"32, MLP up to 256 wide, random sampling, no pruning). {ratios} (the whole command includes start-up "
             "and the final test scoring; target >= 1.8x with 2 workers on 2 cores).")
    record(f"Local workers on {args.storage}: trials per hour", body, notes, save=not args.no_save)


if __name__ == "__main__":
    main()
