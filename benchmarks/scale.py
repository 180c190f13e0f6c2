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
    # A fast user `train` (no torch work): what a trial costs is then the storage and the sampler.
    (tmp / "train.py").write_text("def train(trial):\n    p = trial.params\n"
                                  "    for epoch in range(trial.start_epoch, trial.epochs):\n"
                                  "        trial.report(epoch, score=-(p['lr'] - 0.01) ** 2 + 0.001 * p['depth'])\n")
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
        if engine.dialect.name == "postgresql":  # the ids given above did not advance the sequence
            conn.execute(text("SELECT setval(pg_get_serial_sequence('trials', 'trial_id'), "
                              "(SELECT MAX(trial_id) FROM trials))"))
            # The planner's statistics, as autovacuum keeps them for a study that grows over days
            # (a table just grown 100-fold in one transaction is planned as if it held 500 rows:
            # Optuna's read of the new trials then scans the whole study).
            conn.execute(text("ANALYZE"))
    engine.dispose()


def timed(args: list[str], cwd: Path) -> tuple[float, float]:
    """Seconds from launch and peak memory (MB, this process's own getrusage) of one command, its
    output thrown away."""
    seconds, status, usage, err = run_measured([str(Path(sys.executable).with_name("hpo")), *args], cwd,
                                               dict(os.environ, PYTHONPATH=""), read="stderr")
    if status != 0:
        raise SystemExit(f"hpo {' '.join(args)} failed: {err[-2000:]}")
    return seconds, usage.ru_maxrss / 1024  # KB on Linux


def per_trial(url: str, cwd: Path, n: int, env: dict[str, str] | None = None) -> tuple[float, float]:
    """`hpo worker big --n-trials n` at the study's depth: the whole process's seconds, and the
    median seconds between the starts of its consecutive trials (storage + sampler + hpo's own
    per-trial work, without the process's start and first read)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.connect() as conn:
        sid = conn.execute(text("SELECT study_id FROM studies WHERE study_name = 'big'")).scalar()
        top = conn.execute(text("SELECT MAX(number) FROM trials WHERE study_id = :s"), {"s": sid}).scalar()
    seconds, status, _, err = run_measured([str(Path(sys.executable).with_name("hpo")), "worker", "big", "--storage",
                                            url, "--n-trials", str(n), "--threads", "1", "--quiet"], cwd,
                                           dict(env or os.environ, PYTHONPATH=str(cwd)), read="stderr")
    if status != 0:
        raise SystemExit(f"hpo worker failed: {err[-2000:]}")
    with engine.connect() as conn:
        starts = [_when(v) for (v,) in conn.execute(text("SELECT datetime_start FROM trials WHERE study_id = :s AND "
                                                        "number > :n ORDER BY number"), {"s": sid, "n": top})]
    engine.dispose()
    gaps = [(b - a).total_seconds() for a, b in zip(starts, starts[1:])]
    return seconds, statistics.median(gaps)


def _when(value):
    from datetime import datetime

    return datetime.fromisoformat(value) if isinstance(value, str) else value


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--storage", default="sqlite", choices=["sqlite", "postgresql"])
    ap.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432", help="the PostgreSQL server")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--per-trial", type=int, default=40, help="trials a worker runs at each depth (0: none)")
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
        try:
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
                if args.per_trial:
                    whole, gap = per_trial(url, tmp, args.per_trial)
                    rows.append([size, f"hpo worker --n-trials {args.per_trial} (median s between trial starts)",
                                 f"{whole:.2f} ({gap:.3f} per trial)", "-"])
                    figures[f"{size}:per_trial"] = {"seconds": whole, "gap": gap}
                    print(rows[-1], flush=True)
        finally:
            if args.storage == "postgresql":  # the database made above, dropped whatever happened
                with create_engine(f"{args.pg}/postgres", isolation_level="AUTOCOMMIT").connect() as admin:
                    admin.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    body = table(["trials", "command", "seconds (whole process, median)", "peak MB"], rows)
    cal = calibration()
    notes = f"{args.storage}; repeats {args.repeats}; calibration: {cal}."
    record(f"Scale: read-only commands on {args.storage}", body, notes, save=not args.no_save)
    if not args.no_save:
        big, small = max(sizes), min(sizes)
        reads = ("studies", "best", "show", "trials --limit 50")
        worst = max(figures[f"{big}:{w}"]["seconds"] for w in reads)
        peak = max(figures[f"{big}:{w}"]["mb"] for w in reads)
        targets = {f"scale.read.{args.storage}": {
            "measured": f"at {big} trials: " + ", ".join(f"{w} {figures[f'{big}:{w}']['seconds']:.2f} s / "
                                                           f"{figures[f'{big}:{w}']['mb']:.0f} MB" for w in reads)
                        + f"; the whole CSV {figures[f'{big}:trials --format csv (all)']['seconds']:.1f} s / "
                          f"{figures[f'{big}:trials --format csv (all)']['mb']:.0f} MB"
                        # the same commands on a small study: what the process costs before the study's size
                        + (f"; at {small} trials the slowest {max(figures[f'{small}:{w}']['seconds'] for w in reads):.2f} s"
                           if small != big else ""),
            "met": worst <= 0.5 and peak <= 200}}
        if args.per_trial and small != big:
            at, base = figures[f"{big}:per_trial"], figures[f"{small}:per_trial"]
            targets[f"scale.per_trial.{args.storage}"] = {
                "measured": f"{at['gap']:.3f} s per trial at {big} trials, {base['gap']:.3f} s at {small} "
                            f"({at['gap'] / base['gap']:.1f}x); a worker's whole process for {args.per_trial} "
                            f"trials {at['seconds']:.1f} s vs {base['seconds']:.1f} s",
                "met": at["gap"] / base["gap"] <= 1.5}
        save_results("scale", {"targets": targets, "storage": args.storage, "figures": figures,
                               "calibration": cal})

if __name__ == "__main__":
    main()
