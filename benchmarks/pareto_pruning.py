"""Pruning with several objectives: what median pruning on val_accuracy saves on a Pareto study,
and what it costs the front.

`studies/digits_pareto.yaml` (val_accuracy against n_params, a latency constraint) is run whole,
through `hpo run` with its default workers, with its median pruner and with none, same seed and
trial budget, for several seeds. Reported per seed: epochs trained, wall seconds, the size of the
final feasible front and its hypervolume. Hypervolume is measured on (validation error, log10 of
n_params), both minimised, against the reference point (error 0.5, 10^5 parameters): the area of
that box dominated by the front (log10, because parameter counts span three orders of magnitude
and a linear axis would count only the largest models).
Targets: >= 40% of epochs saved, hypervolume within 2% of no pruning.

    python benchmarks/pareto_pruning.py [--seeds 0,1,2] [--spec studies/digits_pareto.yaml]
        [--pruner '{name: percentile, percentile: 40}'] [--keep DIR]

`--pruner` replaces the spec's pruner; `--keep DIR` keeps each run's storage there and reuses a
finished one (the no-pruning runs do not depend on the pruner tried).
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from _common import HERE, median, record, shown, table

REFERENCE = (0.5, 5.0)  # (validation error, log10 n_params)


def hypervolume_2d(points: list[tuple[float, float]], reference: tuple[float, float]) -> float:
    """Area dominated by `points` (both objectives minimised) inside the box up to `reference`."""
    inside = sorted((x, y) for x, y in points if x < reference[0] and y < reference[1])
    area, best_y = 0.0, reference[1]
    for i, (x, y) in enumerate(inside):
        if y >= best_y:
            continue
        next_x = next((x2 for x2, y2 in inside[i + 1:] if y2 < y), reference[0])
        area += (next_x - x) * (reference[1] - y)
        best_y = y
    return area


def hv_staircase(points: list[tuple[float, float]], reference: tuple[float, float]) -> float:
    """The same area by sweeping the front left to right (a cross-check of hypervolume_2d)."""
    front, best = [], math.inf
    for x, y in sorted(p for p in points if p[0] < reference[0] and p[1] < reference[1]):
        if y < best:
            front.append((x, y))
            best = y
    edges = [x for x, _ in front[1:]] + [reference[0]]
    return sum((x2 - x) * (reference[1] - y) for (x, y), x2 in zip(front, edges))


def run(spec_doc: dict, pruner: dict, seed: int, tmp: Path) -> tuple[int, float, int, float]:
    import hashlib

    import optuna

    tag = hashlib.sha1(repr(sorted(pruner.items())).encode()).hexdigest()[:6]
    name = f"{spec_doc['name']}-{pruner['name']}-{tag}-{seed}"
    path = tmp / f"{name}.yaml"
    url = f"sqlite:///{tmp}/{name}.db"
    wall_file = tmp / f"{name}.seconds"
    if not wall_file.exists():  # not run yet (or not to the end): run it whole
        path.write_text(yaml.safe_dump(spec_doc | {"name": name, "seed": seed, "pruner": pruner}, sort_keys=False))
        (tmp / f"{name}.db").unlink(missing_ok=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "hpo", "run", str(path), "--storage", url], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp)
        wall_file.write_text(str(time.perf_counter() - t0))
    wall = float(wall_file.read_text())
    study = optuna.load_study(study_name=name, storage=url)
    epochs = sum(len(t.intermediate_values) for t in study.trials)
    front = study.best_trials  # feasible, completed, non-dominated
    points = [(1 - t.values[0], math.log10(t.values[1])) for t in front]
    area = hypervolume_2d(points, REFERENCE)
    assert abs(area - hv_staircase(points, REFERENCE)) < 1e-9
    return epochs, wall, len(front), area


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--spec", type=Path, default=HERE.parent / "studies" / "digits_pareto.yaml")
    ap.add_argument("--pruner", type=yaml.safe_load, default=None, help="replaces the spec's pruner (YAML)")
    ap.add_argument("--keep", type=Path, default=None, help="keep runs here and reuse finished ones")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    doc = yaml.safe_load(args.spec.read_text())
    if args.pruner is not None:
        doc["pruner"] = args.pruner
    data = doc.get("data", {})
    if isinstance(data.get("path"), str):  # relative to the spec, which is copied elsewhere
        data["path"] = str((args.spec.parent / data["path"]).resolve())
    rows, saved, ratios = [], [], []
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep or Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        for seed in map(int, args.seeds.split(",")):
            pruned = run(doc, doc.get("pruner", {"name": "median"}), seed, Path(tmp))
            full = run(doc, {"name": "none"}, seed, Path(tmp))
            saved.append(1 - pruned[0] / full[0])
            ratios.append(pruned[3] / full[3] if full[3] else 1.0)
            rows.append([seed, full[0], pruned[0], f"{saved[-1]:.0%}", round(full[1], 1), round(pruned[1], 1),
                         full[2], pruned[2], round(full[3], 4), round(pruned[3], 4), f"{ratios[-1] - 1:+.2%}"])
            print(rows[-1], flush=True)
    p = doc.get("pruner", {}).get("name", "median")
    body = table(["seed", "epochs (none)", f"epochs ({p})", "epochs saved", "wall s (none)", f"wall s ({p})",
                  "front (none)", f"front ({p})", "HV (none)", f"HV ({p})", "HV change"], rows)
    notes = (f"`{shown(args.spec)}` ({doc['budget']['n_trials']} trials x {doc['budget']['epochs']} epochs, "
             f"`hpo run` with its default workers), its pruner {doc.get('pruner')} vs none, same seed. "
             f"Hypervolume on (1 - val_accuracy, log10 n_params), reference {REFERENCE}. Median over seeds: "
             f"**{median(saved):.0%} of epochs saved** (target >= 40%), hypervolume "
             f"**{median(ratios) - 1:+.2%}** (target within 2%; worst seed {min(ratios) - 1:+.2%}).")
    record(f"Several objectives: {p} pruning on val_accuracy vs none (digits_pareto)", body, notes,
           save=not args.no_save)


if __name__ == "__main__":
    main()
