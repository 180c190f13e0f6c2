"""hpo with no flags against the script a user would write instead, whole process, over seeds.

For each sampler seed, `hpo run` (a copy of benchmarks/specs/digits_bench.yaml with that seed, the
embedded SQLite default, no flags) and benchmarks/handwritten_digits.py (plain Optuna + PyTorch,
one thread, a DataLoader, the whole validation set scored at once) run one after the other in
alternating order, each as a fresh process: imports, data loading, study creation and (for hpo)
checkpoints and the final test scoring all count. Reported: wall and CPU seconds of each, the
ratio per seed and its median, and the best validation score's gap (mean and standard error).

    python benchmarks/whole_process.py [--seeds 0 1 2 3 4] [--ray-python PY] [--no-save]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from _common import HERE, median, record, table


def timed_run(cmd: list[str], cwd: str) -> tuple[float, float, str]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=""))
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.stdout


def run_hpo(seed: int, extra: list[str], budget: dict[str, int]) -> tuple[float, float, float]:
    import optuna

    spec = yaml.safe_load((HERE / "specs" / "digits_bench.yaml").read_text()) | {"seed": seed, "budget": budget}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "study.yaml"
        path.write_text(yaml.safe_dump(spec))
        hpo = str(Path(sys.executable).with_name("hpo"))
        wall, cpu, _ = timed_run([hpo, "run", str(path), "-q", *extra], tmp)
        best = optuna.load_study(study_name=spec["name"], storage=f"sqlite:///{tmp}/hpo.db").best_value
    return wall, cpu, best


def run_script(seed: int, budget: dict[str, int]) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        wall, cpu, out = timed_run([sys.executable, str(HERE / "handwritten_digits.py"), "--seed", str(seed),
                                    "--trials", str(budget["n_trials"]), "--epochs", str(budget["epochs"])], tmp)
    return wall, cpu, float(json.loads(out.strip().splitlines()[-1])["best"])


def run_ray(python: str, seed: int, budget: dict[str, int]) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        wall, cpu, out = timed_run([python, str(HERE / "ray_tune_digits.py"), "--seed", str(seed),
                                    "--trials", str(budget["n_trials"]), "--epochs", str(budget["epochs"])], tmp)
    return wall, cpu, float(json.loads(out.strip().splitlines()[-1])["best"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--hpo-args", default="", help="flags for hpo run (default: none, as a user runs it)")
    ap.add_argument("--ray-python", default=None,
                    help="an interpreter with ray[tune] installed: also run benchmarks/ray_tune_digits.py")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    extra = args.hpo_args.split()
    budget = {"n_trials": args.trials, "epochs": args.epochs}
    rows: list[list[Any]] = []
    ratios, cpu_ratios, gaps = [], [], []
    ray_rows: list[list[Any]] = []
    for i, seed in enumerate(args.seeds):
        runs = {}
        for name in (["hpo", "script"] if i % 2 == 0 else ["script", "hpo"]):
            runs[name] = run_hpo(seed, extra, budget) if name == "hpo" else run_script(seed, budget)
        if args.ray_python:
            runs["ray"] = run_ray(args.ray_python, seed, budget)
            ray_rows.append([seed, f"{runs['ray'][0]:.1f}", f"{runs['ray'][0] / runs['script'][0]:.2f}",
                             f"{runs['hpo'][0] / runs['ray'][0]:.2f}", f"{runs['ray'][2]:.4f}"])
        (hw, hc, hb), (sw, sc, sb) = runs["hpo"], runs["script"]
        ratios.append(hw / sw)
        cpu_ratios.append(hc / sc)
        gaps.append(hb - sb)
        rows.append([seed, f"{hw:.1f}", f"{sw:.1f}", f"{hw / sw:.2f}", f"{hc:.1f}", f"{sc:.1f}",
                     f"{hb:.4f}", f"{sb:.4f}"])
        print(rows[-1], flush=True)
    mean = statistics.mean(gaps)
    se = statistics.stdev(gaps) / len(gaps) ** 0.5 if len(gaps) > 1 else float("nan")
    body = table(["seed", "hpo wall s", "script wall s", "ratio", "hpo CPU s", "script CPU s", "hpo best val",
                  "script best val"], rows)
    flags = f"`hpo run {args.hpo_args}`" if extra else "`hpo run` with no flags"
    notes = (f"{flags} against benchmarks/handwritten_digits.py, whole process, digits_bench ({args.trials} "
             f"trials x {args.epochs} epochs, TPE, median pruner), {len(args.seeds)} seeds.\n**hpo / script wall time: median "
             f"{median(ratios):.2f}x** (per seed {min(ratios):.2f}-{max(ratios):.2f}; target <= 0.5x); CPU time "
             f"{median(cpu_ratios):.2f}x. Best validation score, hpo minus script: mean {mean * 100:+.2f} points, "
             f"standard error {se * 100:.2f} points.")
    if ray_rows:
        body += "\n\nRay Tune (function trainable, OptunaSearch TPE, MedianStoppingRule, one CPU per trial):\n\n"
        body += table(["seed", "Ray Tune wall s", "Ray / script", "hpo / Ray", "Ray best val"], ray_rows)
        notes += (f" Ray Tune / script wall time: median {median([float(r[2]) for r in ray_rows]):.2f}x; "
                  f"hpo / Ray Tune: median {median([float(r[3]) for r in ray_rows]):.2f}x.")
    record("Whole process: hpo (no flags) vs the hand-written script, over seeds", body, notes, save=not args.no_save)


if __name__ == "__main__":
    main()
