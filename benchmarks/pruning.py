"""Pruning: what each pruner saves against none, and what it costs in the best score.

The time-to-quality studies (`ttq_problems`: digits, or the Fashion-MNIST MLP on 10,000 images;
30 trials x 15 epochs) run with hpo's own loop, one worker in this process, the same sampler seed
for every pruner, over several seeds. `default` is the spec without a `pruner:` key (hpo's
default); the others are `pruner:` mappings as a study file writes them. Reported per pruner:
the share of epochs saved against no pruning (median over seeds), the best validation score's
difference in points (mean, and the worst seed), and wall time.
Target for hpo's default: >= 70% of epochs saved, best within 0.5 points.

    python benchmarks/pruning.py [--problem digits] [--seeds 0,1,2] [--pruners 'default;{name: median}']
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from _common import median, record, save_results, table, warm_up
from time_to_quality import hpo_spec

from hpo.execution.worker import run_worker
from hpo.search.study import open_for_spec
from hpo.spec.loading import load_spec
from hpo.storage.backends import open_storage

CANDIDATES = ("default; {name: none}; {name: median}; {name: median, n_warmup_steps: 2}; {name: percentile, "
              "percentile: 25.0}; {name: successive_halving}; {name: successive_halving, min_resource: 1, "
              "reduction_factor: 3}; {name: hyperband}")


def run(problem: str, pruner: Any, seed: int, budget: dict[str, int]) -> tuple[int, float, float]:
    """(epochs trained, best value, wall seconds) of one study."""
    raw = hpo_spec(problem, seed, budget, own_loop=True, pruner=pruner)
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "study.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        spec = load_spec(Path(tmp, "study.yaml"))
        url = f"sqlite:///{tmp}/hpo.db"
        handle = open_for_spec(spec, open_storage(url), url, f"{tmp}/artifacts")
        t0 = time.perf_counter()
        run_worker(handle, device=torch.device("cpu"))
        wall = time.perf_counter() - t0
        epochs = sum(len(t.intermediate_values) for t in handle.study.trials)
        return epochs, handle.study.best_value, wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problem", default="digits", choices=["digits", "fashion"])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--pruners", default=CANDIDATES, help="';'-separated: 'default' or a pruner mapping in YAML")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    warm_up()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    budget = {"n_trials": args.trials, "epochs": args.epochs}
    pruners = [p.strip() for p in args.pruners.split(";")]
    if "{name: none}" not in pruners:
        pruners.insert(0, "{name: none}")
    seeds = [int(s) for s in args.seeds.split(",")]
    runs: dict[str, list[tuple[int, float, float]]] = {p: [] for p in pruners}
    for seed in seeds:
        for p in pruners:
            runs[p].append(run(args.problem, None if p == "default" else yaml.safe_load(p), seed, budget))
            print(p, seed, runs[p][-1], flush=True)
    none = runs["{name: none}"]
    rows, figures = [], {}
    for p, mine in runs.items():
        saved = [1 - m[0] / n[0] for m, n in zip(mine, none)]
        gaps = [(m[1] - n[1]) * 100 for m, n in zip(mine, none)]
        figures[p] = {"saved": saved, "gap_points": gaps, "wall": [m[2] for m in mine], "epochs": [m[0] for m in mine]}
        rows.append([p, " ".join(f"{s:.0%}" for s in saved), f"{median(saved):.0%}", f"{statistics.mean(gaps):+.2f}",
                     f"{min(gaps):+.2f}", f"{median([m[2] for m in mine]):.1f}"])
    body = table(["pruner", "epochs saved per seed", "median", "best - none's, mean points", "worst seed",
                  "wall s (median)"], rows)
    notes = (f"{args.problem}, {args.trials} trials x {args.epochs} epochs, hpo's own loop, one worker, seeds {seeds}; "
             "`default` is hpo's default pruner. Target for it: >= 70% of epochs saved, best within 0.5 points.")
    record(f"Pruning: what each pruner saves ({args.problem})", body, notes, save=not args.no_save)
    if not args.no_save and "default" in figures:
        save_results("pruning", {"targets": {f"pruning.{args.problem}": target(figures["default"], "hpo's default")},
                                 "problem": args.problem, "trials": args.trials, "epochs": args.epochs, "seeds": seeds,
                                 "pruners": figures})


def target(f: dict[str, list[float]], which: str) -> dict[str, Any]:
    """One pruner's figures as summary.py's target line."""
    saved, gaps = median(f["saved"]), f["gap_points"]
    return {"measured": f"{which}: {saved:.0%} of epochs saved (median; {', '.join(f'{s:.0%}' for s in f['saved'])}), "
                        f"best {statistics.mean(gaps):+.2f} points (worst seed {min(gaps):+.2f})",
            "met": saved >= 0.7 and abs(statistics.mean(gaps)) <= 0.5}

if __name__ == "__main__":
    main()
