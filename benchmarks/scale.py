"""Large studies: what the read-only commands cost at 1,000, 10,000 and 100,000 trials.

A study is made as hpo makes one (a spec, `hpo create`), 1,000 trials are added through Optuna's
`add_trials` (parameters, values, ten reported epochs, a reason on the failed ones), and the
study is grown by copying those rows in SQL, numbers shifted, to each size. Each command then
runs as a fresh process, the way a user runs it (`hpo studies`, `hpo best STUDY`, `hpo show STUDY
N` of a trial in the middle, `hpo trials STUDY --limit 50`, the whole CSV of `hpo trials`), timed
from launch, with its peak memory (getrusage of the child). Every figure is the median of the
repeats.

    python benchmarks/scale.py [--sizes 1000,10000,100000] [--storage sqlite|postgresql] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from _common import calibration, record, run_measured, save_results, table

SPEC = {"name": "big", "train": "train.py:train", "metric": "score", "direction": "maximize",
        "space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}, "width": [32, 64, 128],
                  "depth": {"type": "int", "low": 1, "high": 4}},
        "budget": {"n_trials": 200000, "epochs": 10}}


def seed_study(url: str, tmp: Path) -> None:
    """The study as `hpo create` makes it, and its first 1,000 trials through Optuna's add_trials."""
    import random

    import optuna

    (tmp / "spec.yaml").write_text(yaml.safe_dump(SPEC, sort_keys=False))
    (tmp / "train.py").write_text("def train(trial):\n    pass\n")
    env = dict(os.environ, PYTHONPATH="")
    subprocess.run([sys.executable, "-m", "hpo", "create", str(tmp / "spec.yaml"), "--storage", url,
                    "--artifacts", str(tmp / "art")], check=True, env=env, cwd=tmp, capture_output=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="big", storage=url)
    rng = random.Random(0)
    dists = {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True),
             "width": optuna.distributions.CategoricalDistribution([32, 64, 128]),
             "depth": optuna.distributions.IntDistribution(1, 4)}
    trials = []
    for i in range(1000):
        state = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)[i % 3]
        epochs = 10 if state == optuna.trial.TrialState.COMPLETE else 3
        curve = {e: rng.random() * (e + 1) / 10 for e in range(epochs)}
        trials.append(optuna.trial.create_trial(
            state=state, value=curve[epochs - 1] if state == optuna.trial.TrialState.COMPLETE else None,
            params={"lr": 10 ** rng.uniform(-4, -1), "width": rng.choice([32, 64, 128]), "depth": rng.randint(1, 4)},
            distributions=dists, intermediate_values=curve,
            user_attrs={"reason": "ValueError: boom"} if state == optuna.trial.TrialState.FAIL else {}))
    study.add_trials(trials)


def grow(url: str, size: int) -> None:
    """Copy the study's first 1,000 trials (and their rows) until it holds `size` trials."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.begin() as conn:
        sid = conn.execute(text("SELECT study_id FROM studies WHERE study_name = 'big'")).scalar()
        have = conn.execute(text("SELECT COUNT(*) FROM trials WHERE study_id = :s"), {"s": sid}).scalar()
        while have < size:
            n = min(1000, size - have)
            top = conn.execute(text("SELECT MAX(trial_id) FROM trials")).scalar()
            conn.execute(text("INSERT INTO trials (trial_id, number, study_id, state, datetime_start, datetime_complete) "
                              "SELECT trial_id + :shift, number + :have, study_id, state, datetime_start, "
                              "datetime_complete FROM trials WHERE study_id = :s AND number < :n"),
                         {"shift": top, "have": have, "s": sid, "n": n})
            for table_name, cols in (("trial_values", "objective, value, value_type"),
                                     ("trial_params", "param_name, param_value, distribution_json"),
                                     ("trial_intermediate_values", "step, intermediate_value, intermediate_value_type"),
                                     ("trial_user_attributes", "key, value_json")):
                conn.execute(text(f"INSERT INTO {table_name} (trial_id, {cols}) SELECT x.trial_id + :shift, {cols} "
                                  f"FROM {table_name} x JOIN trials t ON t.trial_id = x.trial_id WHERE t.study_id = :s "
                                  f"AND t.number < :n"), {"shift": top, "s": sid, "n": n})
            have += n
    engine.dispose()


def timed(args: list[str], cwd: Path) -> tuple[float, float]:
    """Seconds from launch and peak memory (MB, this process's own getrusage) of one command, its
    output thrown away."""
    seconds, status, usage, err = run_measured([str(Path(sys.executable).with_name("hpo")), *args], cwd,
                                               dict(os.environ, PYTHONPATH=""), read="stderr")
    if status != 0:
        raise SystemExit(f"hpo {' '.join(args)} failed: {err[-2000:]}")
    return seconds, usage.ru_maxrss / 1024  # KB on Linux


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--storage", default="sqlite", choices=["sqlite", "postgresql"])
    ap.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432", help="the PostgreSQL server")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows, figures = [], {}
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        if args.storage == "sqlite":
            url = f"sqlite:///{tmp / 'big.db'}"
        else:
            from sqlalchemy import create_engine, text

            name = f"hpo_scale_{os.getpid()}"
            with create_engine(f"{args.pg}/postgres", isolation_level="AUTOCOMMIT").connect() as admin:
                admin.execute(text(f'CREATE DATABASE "{name}"'))
            url = f"{args.pg}/{name}"
        seed_study(url, tmp)
        for size in sizes:
            grow(url, size)
            commands = {"studies": ["studies"], "best": ["best", "big"], "show": ["show", "big", str(size // 2)],
                        "trials --limit 50": ["trials", "big", "--limit", "50"],
                        "trials --format csv (all)": ["trials", "big", "--format", "csv"]}
            for what, argv in commands.items():
                runs = [timed([*argv, "--storage", url], tmp) for _ in range(args.repeats)]
                seconds, mb = statistics.median(r[0] for r in runs), max(r[1] for r in runs)
                rows.append([size, what, f"{seconds:.2f}", f"{mb:.0f}"])
                figures[f"{size}:{what}"] = {"seconds": seconds, "mb": mb}
                print(rows[-1], flush=True)
    body = table(["trials", "command", "seconds (whole process, median)", "peak MB"], rows)
    notes = f"{args.storage}; repeats {args.repeats}; calibration: {calibration()}."
    record(f"Scale: read-only commands on {args.storage}", body, notes, save=not args.no_save)
    if not args.no_save:
        big = max(sizes)
        reads = ("studies", "best", "show", "trials --limit 50")
        worst = max(figures[f"{big}:{w}"]["seconds"] for w in reads)
        peak = max(figures[f"{big}:{w}"]["mb"] for w in reads)
        save_results("scale", {"targets": {f"scale.read.{args.storage}": {
            "measured": f"at {big} trials: " + ", ".join(f"{w} {figures[f'{big}:{w}']['seconds']:.2f} s / "
                                                           f"{figures[f'{big}:{w}']['mb']:.0f} MB" for w in reads)
                        + f"; the whole CSV {figures[f'{big}:trials --format csv (all)']['seconds']:.1f} s / "
                          f"{figures[f'{big}:trials --format csv (all)']['mb']:.0f} MB",
            "met": worst <= 0.5 and peak <= 200}}, "storage": args.storage, "figures": figures})


if __name__ == "__main__":
    main()
