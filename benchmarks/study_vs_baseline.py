"""Question 1: a whole study with hpo against the hand-written Optuna script.

Same spec (space, data split, sampler seed, pruner, budget), run alternately A B A B, several
repeats; reported: median wall time of each, the ratio, and the best validation score of each.
hpo runs as a user runs it: SQLite storage, per-epoch checkpoints, the final test scoring. The
script keeps Optuna's in-memory storage, as the example does.
Target on CPU: hpo <= 0.8x the script's wall time, best score no worse than 0.3 points.

    python benchmarks/study_vs_baseline.py [--repeats 3] [--spec benchmarks/specs/digits_bench.yaml]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _common import HERE, alternate, median, record, shown, table, warm_up

from hpo.execution.worker import run_worker
from hpo.search.results import finalize
from hpo.search.study import open_for_spec
from hpo.spec.loading import load_spec
from hpo.spec.validate import with_fusion
from hpo.storage.backends import open_storage


def run_hpo(spec_path: Path, fuse: int | None = None) -> tuple[float, float]:
    spec = load_spec(spec_path)
    if fuse:
        spec = with_fusion(spec, fuse)
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/hpo.db"
        t0 = time.perf_counter()
        handle = open_for_spec(spec, open_storage(url), url, f"{tmp}/artifacts")
        device = torch.device("cpu")
        if fuse:
            from hpo.execution.fused_worker import run_fused_worker

            run_fused_worker(handle, device=device, group_size=fuse)
        else:
            run_worker(handle, device=device)
        finalize(handle, device)
        return time.perf_counter() - t0, handle.study.best_value


def run_baseline(spec_path: Path) -> tuple[float, float]:
    import baseline_script

    spec = load_spec(spec_path)
    t0 = time.perf_counter()
    study = baseline_script.run(spec)
    return time.perf_counter() - t0, study.best_value


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--spec", type=Path, default=HERE / "specs" / "digits_bench.yaml")
    ap.add_argument("--fuse", type=int, default=8, help="also run hpo with fused groups of this size (0: no)")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    warm_up()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    variants = {"hpo": lambda: run_hpo(args.spec), "script": lambda: run_baseline(args.spec)}
    if args.fuse:
        variants[f"hpo --fuse {args.fuse}"] = lambda: run_hpo(args.spec, args.fuse)
    results = alternate(variants, args.repeats)
    rows = []
    for name, runs in results.items():
        rows.append([name, median([r[0] for r in runs]), " ".join(f"{r[0]:.1f}" for r in runs),
                     max(r[1] for r in runs), " ".join(f"{r[1]:.4f}" for r in runs)])
    ratio = median([r[0] for r in results["hpo"]]) / median([r[0] for r in results["script"]])
    gap = (median([r[1] for r in results["script"]]) - median([r[1] for r in results["hpo"]])) * 100
    spec = load_spec(args.spec)
    body = table(["variant", "median wall s", "runs (s)", "best val", "best val per run"], rows)
    notes = (
        f"Spec `{shown(args.spec)}`: {spec.data.dataset}, {spec.budget.n_trials} trials x "
        f"{spec.budget.epochs} epochs, {spec.sampler.name} seed {spec.seed}, {spec.pruner.name} pruner.\n"
        f"**hpo / script wall time: {ratio:.2f}x** (target <= 0.8x); median best val: hpo is "
        f"{-gap:+.2f} points against the script (target: no worse than -0.3)."
    )
    if args.fuse:
        fused = results[f"hpo --fuse {args.fuse}"]
        f_ratio = median([r[0] for r in fused]) / median([r[0] for r in results["script"]])
        f_gap = (median([r[1] for r in fused]) - median([r[1] for r in results["script"]])) * 100
        notes += (f"\n**hpo --fuse {args.fuse} / script: {f_ratio:.2f}x**, best val {f_gap:+.2f} points "
                  "against the script.")
    record("Whole study: hpo vs the hand-written Optuna script", body, notes, save=not args.no_save)


if __name__ == "__main__":
    main()
