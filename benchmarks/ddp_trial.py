"""What a trial of two processes costs against one, at the same global batch: hpo's CNN on a
Fashion-MNIST subsample (compute dominates), one trial with fixed parameters, the whole `hpo run`
process timed, A B A B. One process gets the worker's two threads; two processes one thread each
(execution.processes_per_trial splits the worker's threads between the ranks), so on a CPU the
question is what DDP's gradient all-reduce and the second process cost against intra-op threads.

    python benchmarks/ddp_trial.py                      # 3 pairs, 6,000 images, 3 epochs
    python benchmarks/ddp_trial.py --n-train 2000 --epochs 1 --repeats 1 --no-save
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from _common import HERE, alternate, median, record, table

ROOT = HERE.parent


def spec(n_train: int, epochs: int) -> dict[str, object]:
    return {
        "name": "ddp_cost",
        "metric": "val_accuracy",
        "model": "cnn",
        "seed": 0,
        "data": {"dataset": "fashion_mnist", "n_train": n_train, "split": {"train": 0.9, "val": 0.1}},
        "space": {"lr": [0.002], "optimizer": "adam", "batch_size": 128, "width": 32, "depth": 2,
                  "dropout": 0.0, "norm": "none", "kernel_size": 3, "pooling": "max"},
        "pruner": {"name": "none"},
        "budget": {"n_trials": 1, "epochs": epochs},
    }


def run(spec_path: Path, procs: int, tmp: Path) -> dict[str, float]:
    import optuna

    url = f"sqlite:///{tmp / f'ddp-{procs}-{time.monotonic_ns()}.db'}"
    env = dict(os.environ, HPO_WORKERS="1")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "hpo", "run", str(spec_path), "--storage", url, "--procs-per-trial",
                    str(procs), "-q", "--artifacts", str(tmp / "art")], check=True, env=env, cwd=tmp,
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    (trial,) = optuna.load_study(study_name="ddp_cost", storage=url).trials
    seconds = trial.user_attrs["epoch_seconds"]
    return {"wall": wall, "epoch": median(seconds), "value": float(trial.value or 0.0),
            "val_loss": trial.user_attrs["val_loss"][-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=6000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        spec_path = tmp / "ddp.yaml"
        spec_path.write_text(yaml.safe_dump(spec(args.n_train, args.epochs)))
        out = alternate({"1": lambda: run(spec_path, 1, tmp), "2": lambda: run(spec_path, 2, tmp)}, args.repeats)
    one, two = out["1"], out["2"]
    rows = [[f"{n} process{'es' if n == '2' else ''}", f"{median([r['wall'] for r in rs]):.2f}",
             f"{median([r['epoch'] for r in rs]):.3f}", f"{rs[-1]['value']:.4f}", f"{rs[-1]['val_loss']:.5f}"]
            for n, rs in (("1", one), ("2", two))]
    wall = median([b["wall"] / a["wall"] for a, b in zip(one, two)])
    epoch = median([b["epoch"] / a["epoch"] for a, b in zip(one, two)])
    body = table(["trial on", "whole run s (median)", "s per epoch (median)", "val_accuracy", "val_loss"], rows)
    body += (f"\n\n2 processes / 1 process: whole run {wall:.3f}x, per epoch {epoch:.3f}x "
             f"(median of {args.repeats} A B pairs)")
    record(f"A trial on two processes against one (CNN, Fashion-MNIST {args.n_train} images, {args.epochs} epochs)",
           body, save=not args.no_save)


if __name__ == "__main__":
    main()
