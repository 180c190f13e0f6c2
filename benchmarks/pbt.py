"""Population-based training against hpo's default search, on a problem where schedules matter.

The Fashion-MNIST MLP (10,000 training images, hpo's own loop) with SGD and momentum: the
learning rate, momentum and weight decay are searched, and the learning-rate schedule (none, cosine,
step) is a choice. Per seed, alternating which arm runs first:
- `pbt`: `search: {strategy: pbt, population: P, interval: I}` for E epochs (P x E epochs in all);
- `default`: the same study with hpo's default search (TPE, the median pruner), given PBT's wall
  time as its time budget (`budget: {time: ...}`), so what its pruner saves becomes more trials:
  its best trial is the best fixed configuration and schedule it found.
Both with `hpo run` and no other flag (2 workers on 2 cores), whole process. Reported per arm: the
best validation accuracy, the test accuracy of that best model (scored once), trials and wall; and
the differences pbt - default, paired by seed, with their standard error.

    python benchmarks/pbt.py [--seeds 0 1 2] [--population 8] [--epochs 12] [--interval 2] [--no-save]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from _common import HERE, calibration, record, save_results, table

SPACE: dict[str, Any] = {
    "optimizer": "momentum",
    "width": 256,
    "depth": 2,
    "batch_size": 128,
    "lr": {"type": "float", "low": 0.003, "high": 0.5, "log": True},
    "momentum": {"type": "float", "low": 0.5, "high": 0.99},
    "weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
    "scheduler": {"choices": ["none", "cosine", "step"]},
}


def spec(seed: int, epochs: int, search: dict[str, Any] | None, wall: float | None) -> dict[str, Any]:
    doc: dict[str, Any] = {"name": "bench", "metric": "val_accuracy", "seed": seed,
                           "data": {"dataset": "fashion_mnist", "n_train": 10000}, "space": SPACE,
                           "budget": {"epochs": epochs}}
    if search is not None:
        doc["search"] = search
    if wall is not None:
        doc["budget"]["time"] = round(wall, 1)
    return doc


def run(doc: dict[str, Any], folder: Path) -> dict[str, Any]:
    """`hpo run` on a fresh SQLite file, whole process; the study's best and its test score."""
    path = folder / f"{doc['name']}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    db = folder / "hpo.db"
    for leftover in folder.glob("hpo.db*"):
        leftover.unlink()
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    env.pop("HPO_STORAGE", None)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "hpo", "run", str(path), "--storage", f"sqlite:///{db}", "--quiet"],
                          cwd=folder, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"hpo run failed: {done.stderr[-2000:]}")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="bench", storage=f"sqlite:///{db}")
    from hpo.search.records import TEST_ATTR

    test = study.user_attrs.get(TEST_ATTR) or {}
    trials = study.get_trials(deepcopy=False)
    epochs = sum(len(t.intermediate_values) for t in trials)
    return {"best": study.best_value, "test": test.get("value"),
            "trials": len(trials), "epochs": epochs, "wall": wall,
            "best_params": {k: v for k, v in study.best_trial.params.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--population", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--interval", type=int, default=2)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    calib = calibration()
    search = {"strategy": "pbt", "population": args.population, "interval": args.interval}
    rows, pairs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            folder = Path(tmp) / f"seed{seed}"
            folder.mkdir()
            pbt = run(spec(seed, args.epochs, search, None), folder)
            default = run(spec(seed, args.epochs, None, pbt["wall"]), folder)
            for arm, r in (("pbt", pbt), ("default", default)):
                rows.append([seed, arm, r["best"], r["test"], r["trials"], r["epochs"], round(r["wall"], 1)])
            pairs.append({"seed": seed, "pbt": pbt, "default": default})
            print(json.dumps(pairs[-1]), flush=True)

    def diff(key: str) -> tuple[float, float]:
        d = [p["pbt"][key] - p["default"][key] for p in pairs if p["pbt"][key] is not None and p["default"][key] is not None]
        mean = statistics.fmean(d) if d else float("nan")
        se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else float("nan")
        return mean, se

    (val, val_se), (test, test_se) = diff("best"), diff("test")
    body = table(["seed", "arm", "best val accuracy", "test accuracy of the best", "trials", "epochs trained",
                  "wall s"], rows)
    body += (f"\n\npbt - default, paired by seed: best val accuracy {val * 100:+.2f} points (s.e. {val_se * 100:.2f}), "
             f"test accuracy of the best {test * 100:+.2f} points (s.e. {test_se * 100:.2f}); machine calibration: "
             f"{calib}")
    record("Population-based training vs the default search (Fashion-MNIST MLP, SGD + momentum)", body,
           save=not args.no_save)
    trials = statistics.median(p["pbt"]["trials"] for p in pairs)
    measured = (f"PBT (population {args.population}, {args.epochs} epochs, interval {args.interval}; "
                f"{trials:g} segments) - the default search at PBT's wall, {len(pairs)} seeds: best val accuracy "
                f"{val * 100:+.2f} points (s.e. {val_se * 100:.2f}), test accuracy of the best {test * 100:+.2f} "
                f"points (s.e. {test_se * 100:.2f})")
    if not args.no_save:
        target = "pbt.fashion" + ("" if args.interval == 2 else f".interval{args.interval}")
        save_results("pbt", {"targets": {target: {"measured": measured, "met": None}},
                             "problem": "fashion_mlp_sgd", "calibration": calib,
                             "population": args.population, "epochs": args.epochs, "interval": args.interval,
                             "runs": pairs, "val_diff": val, "val_diff_se": val_se, "test_diff": test,
                             "test_diff_se": test_se})


if __name__ == "__main__":
    main()
