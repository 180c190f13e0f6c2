"""Question 3: what does the median pruner save, and what does it cost in result quality?

The same spec run with hpo's default pruner (`pruner: median`, Optuna's MedianPruner defaults:
5 startup trials, no warm-up steps) and with none, same sampler seed and trial budget, for several
seeds. `--spec-pruner` uses the spec's own pruner settings instead. Reported: epochs trained,
wall time and best validation score of each.
Target: >= 50% of epochs saved, best score within 0.5 points.

    python benchmarks/pruning.py [--seeds 0,1,2] [--spec benchmarks/specs/digits_bench.yaml]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch
from _common import HERE, median, record, shown, table, warm_up

from hpo.execution.worker import run_worker
from hpo.search.study import open_for_spec
from hpo.spec.loading import load_spec
from hpo.spec.schema import PrunerSpec
from hpo.storage.backends import open_storage


def run(spec, pruner: PrunerSpec, seed: int) -> tuple[int, float, float]:
    spec = dataclasses.replace(spec, pruner=pruner, seed=seed, name=f"{spec.name}-{pruner.name}-{seed}")
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/hpo.db"
        handle = open_for_spec(spec, open_storage(url), url, f"{tmp}/artifacts")
        t0 = time.perf_counter()
        run_worker(handle, device=torch.device("cpu"))
        wall = time.perf_counter() - t0
        epochs = sum(len(t.intermediate_values) for t in handle.study.trials)
        return epochs, handle.study.best_value, wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--spec", type=Path, default=HERE / "specs" / "digits_bench.yaml")
    ap.add_argument("--spec-pruner", action="store_true", help="the spec's pruner settings, not the defaults")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    warm_up()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    spec = load_spec(args.spec)
    if not args.spec_pruner:
        spec = dataclasses.replace(spec, pruner=PrunerSpec("median"))
    rows, saved, gaps = [], [], []
    for seed in map(int, args.seeds.split(",")):
        pruned = run(spec, spec.pruner, seed)
        full = run(spec, PrunerSpec("none"), seed)
        saved.append(1 - pruned[0] / full[0])
        gaps.append((pruned[1] - full[1]) * 100)
        rows.append([seed, full[0], pruned[0], f"{saved[-1]:.0%}", full[1], pruned[1], f"{gaps[-1]:+.2f}",
                     full[2], pruned[2]])
    body = table(["seed", "epochs (none)", "epochs (median)", "epochs saved", "best val (none)",
                  "best val (median)", "points", "wall s (none)", "wall s (median)"], rows)
    notes = (f"Spec `{shown(args.spec)}` ({spec.budget.n_trials} trials x {spec.budget.epochs} "
             f"epochs), pruner {spec.pruner.name} {dict(spec.pruner.kwargs)} vs none. Median over seeds: "
             f"**{median(saved):.0%} of epochs saved** (target >= 50%), best val {median(gaps):+.2f} points "
             f"(target within 0.5).")
    record("Pruning: median pruner vs none", body, notes, save=not args.no_save)


if __name__ == "__main__":
    main()
