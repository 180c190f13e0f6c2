"""Issue 34: workers started by hand on one host, with no flags, against the same workers with
`--threads 1` (what a user who knew to pass it would get).

K `hpo worker` processes join one study on PostgreSQL, started together the way a user starts
them in K shells, and the whole thing is timed from the first start to the last exit. The study
does equal work per trial (a fixed MLP on digits, only lr and dropout searched, random sampling,
no pruning), so every run trains the same epochs. Runs alternate A B A B. Targets: K = 2 and 3
with no flags within 1.15x of `--threads 1`; three workers on two cores no slower than two.

    python benchmarks/hand_workers.py [--repeats 2] [--trials 24] [--workers 2,3]
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
    "name": "hand_bench",
    "seed": 0,
    "metric": "val_accuracy",
    "data": {"dataset": "digits", "split": {"train": 0.7, "val": 0.15, "test": 0.15}},
    "space": {"lr": {"low": 1e-3, "high": 1e-1, "log": True}, "dropout": {"low": 0.0, "high": 0.5},
              "width": 256, "depth": 2, "batch_size": 32},
    "sampler": {"name": "random"},
    "pruner": {"name": "none"},
    "budget": {"n_trials": 24, "epochs": 10},
}
ADMIN = dict(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", autocommit=True)


def run(workers: int, flags: list[str], trials: int, tmp: Path) -> float:
    """Seconds from starting `workers` hand-started `hpo worker` processes to the last one's exit."""
    import psycopg

    name = f"hpo_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(**ADMIN) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql://postgres@127.0.0.1:5432/{name}"
    spec = tmp / f"{name}.yaml"
    spec.write_text(yaml.safe_dump(dict(SPEC, budget=dict(SPEC["budget"], n_trials=trials))))
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(HPO_STORAGE=url, HPO_ARTIFACTS=str(tmp / name), HPO_SLOTS_DIR=str(tmp / f"{name}-slots"))
    try:
        subprocess.run([sys.executable, "-m", "hpo", "create", str(spec)], env=env, check=True, cwd=HERE.parent,
                       stdout=subprocess.DEVNULL)
        t0 = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-m", "hpo", "worker", SPEC["name"], "--quiet", *flags], env=env,
                                  cwd=HERE.parent) for _ in range(workers)]
        codes = [p.wait() for p in procs]
        seconds = time.perf_counter() - t0
        if any(codes):
            raise SystemExit(f"a worker failed: exit codes {codes}")
        return seconds
    finally:
        with psycopg.connect(**ADMIN) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--workers", default="2,3")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    counts = [int(k) for k in args.workers.split(",")]
    cases = {(k, flag): (lambda k=k, flag=flag: run(k, [] if flag == "none" else ["--threads", "1"], args.trials,
                                                    Path(tmp)))
             for k in counts for flag in ("none", "threads1")}
    with tempfile.TemporaryDirectory() as tmp:
        res = alternate(cases, args.repeats)
    rows, ratios = [], []
    for k in counts:
        plain, one = median(res[(k, "none")]), median(res[(k, "threads1")])
        rows.append([k, round(plain, 1), round(one, 1), round(plain / one, 3),
                     " ".join(f"{a:.1f}/{b:.1f}" for a, b in zip(res[(k, "none")], res[(k, "threads1")]))])
        ratios.append(f"**{k} workers, no flags / --threads 1: {plain / one:.2f}x**")
    if 2 in counts and 3 in counts:
        ratios.append(f"three workers / two, no flags: {median(res[(3, 'none')]) / median(res[(2, 'none')]):.2f}x")
    body = table(["workers", "no flags (s)", "--threads 1 (s)", "ratio", "runs (no flags / --threads 1)"], rows)
    notes = (f"PostgreSQL, {args.trials} trials x {SPEC['budget']['epochs']} epochs of a fixed 2 x 256 MLP on digits "
             f"(lr and dropout searched, random sampling, no pruning), the workers started together by hand; "
             f"{'; '.join(ratios)} (targets: within 1.15x; three no slower than two).")
    record("Hand-started workers on one host: no flags against --threads 1", body, notes, save=not args.no_save)


if __name__ == "__main__":
    main()
