"""Time to quality: how soon hpo has a model as good as the hand-written script's best.

For each sampler seed, as fresh processes in alternating order, whole process (imports, data,
storage, and for hpo the final test scoring):

- `script`: benchmarks/ttq_script.py, plain Optuna + PyTorch (TPE, MedianPruner, one thread, a
  DataLoader, the whole validation set at once);
- `hpo-train`: `hpo run` with no flags on a spec whose `train:` is the script's own training
  (`ttq_problems.fit`), sampler and pruner left to hpo's defaults;
- `hpo-loop`: `hpo run` with no flags on the equivalent spec for hpo's own loop (same data, split,
  space and MLP);
- `hpo-train-1w` (`--one-worker`): `hpo-train` with `--workers 1`, for search quality with one
  worker against several at an equal number of trials;
- `ray` (`--ray-python PY`): Ray Tune, ASHA with OptunaSearch, two trials at a time
  (benchmarks/ray_tune_ttq.py, run by an interpreter that has ray[tune]).

Each finished trial's time is taken from the process's launch. Reported per arm: wall time, best
validation accuracy, the time its best-so-far first reached the script's final best (over the
script's wall time), and the epochs it trained. Every run is one JSON line in
benchmarks/results/time_to_quality.jsonl.

    python benchmarks/time_to_quality.py --problem digits [--seeds 0 1 2 3 4] [--trials 30] [--epochs 15]
        [--one-worker] [--ray-python PY] [--pruner YAML] [--no-save]
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from _common import HERE, median, record, save_results, table
from ttq_problems import FASHION_N_TRAIN, spec_space


@dataclass
class Run:
    arm: str
    seed: int
    wall: float
    best: float
    epochs: int
    finished: list[tuple[float, float]] = field(default_factory=list)  # (seconds from launch, value)

    def reached(self, target: float) -> float | None:
        """Seconds from launch until a finished trial scored at least `target`."""
        return next((t for t, v in sorted(self.finished) if v >= target - 1e-6), None)


def launch(cmd: list[str], cwd: str) -> tuple[float, float, str]:
    env = dict(os.environ, PYTHONPATH="")
    t0 = time.time()
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    wall = time.time() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-1000:]}\n{done.stderr[-2000:]}")
    return t0, wall, done.stdout


def run_script(problem: str, seed: int, budget: dict[str, int], python: str = sys.executable,
               script: str = "ttq_script.py", arm: str = "script") -> Run:
    with tempfile.TemporaryDirectory() as tmp:
        t0, wall, out = launch([python, str(HERE / script), "--problem", problem, "--seed", str(seed),
                                "--trials", str(budget["n_trials"]), "--epochs", str(budget["epochs"])], tmp)
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    trials = [x for x in lines if "t" in x]
    done = [(x["t"] - t0, x["value"]) for x in trials if x["state"] == "COMPLETE"]
    return Run(arm, seed, wall, lines[-1]["best"], sum(x["epochs"] for x in trials), done)


TRAIN_MODULE = """\
import sys
sys.path.insert(0, {bench!r})
from ttq_problems import fit, load

_data = None


def train(trial):
    global _data
    if _data is None:
        _data = load({problem!r}, {seed})
    fit(trial.params, _data, trial.epochs, lambda epoch, accuracy: trial.report(epoch, val_accuracy=accuracy))
"""


def hpo_spec(problem: str, seed: int, budget: dict[str, int], own_loop: bool, pruner: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": f"ttq-{problem}", "metric": "val_accuracy", "seed": seed,
                            "space": spec_space(), "budget": budget}
    if own_loop:
        spec["data"] = ({"dataset": "digits", "split": {"train": 0.7, "val": 0.15, "test": 0.15}}
                        if problem == "digits" else
                        {"dataset": "fashion_mnist", "n_train": FASHION_N_TRAIN, "split": {"train": 0.85, "val": 0.15}})
        spec["space"]["momentum"].pop("when")  # hpo's loop samples momentum only for momentum SGD
    else:
        spec["train"] = "ttq_train.py:train"
    if pruner is not None:
        spec["pruner"] = pruner
    return spec


def run_hpo(problem: str, seed: int, budget: dict[str, int], arm: str, pruner: Any) -> Run:
    import optuna

    spec = hpo_spec(problem, seed, budget, arm == "hpo-loop", pruner)
    flags = ["--workers", "1"] if arm == "hpo-train-1w" else []
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "ttq_train.py").write_text(TRAIN_MODULE.format(bench=str(HERE), problem=problem, seed=seed))
        Path(tmp, "study.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        hpo = str(Path(sys.executable).with_name("hpo"))
        t0, wall, _ = launch([hpo, "run", "study.yaml", "-q", *flags], tmp)
        study = optuna.load_study(study_name=spec["name"], storage=f"sqlite:///{tmp}/hpo.db")
        trials = study.get_trials(deepcopy=False)
    done = [(t.datetime_complete.timestamp() - t0, t.value) for t in trials
            if t.state == optuna.trial.TrialState.COMPLETE and t.datetime_complete and t.value is not None]
    return Run(arm, seed, wall, study.best_value, sum(len(t.intermediate_values) for t in trials), done)


def _gap(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a - b in points, and its standard error."""
    gaps = [(x - y) * 100 for x, y in zip(a, b)]
    se = statistics.stdev(gaps) / len(gaps) ** 0.5 if len(gaps) > 1 else float("nan")
    return statistics.mean(gaps), se


def summary(runs: list[Run], seeds: list[int]) -> tuple[list[list[Any]], dict[str, dict[str, Any]]]:
    """Per arm: median time to the script's best over the script's wall, whole-study ratio, best gap."""
    by = {(r.arm, r.seed): r for r in runs}
    script = [by["script", s] for s in seeds]
    rows, figures = [], {}
    for arm in dict.fromkeys(r.arm for r in runs):
        mine = [by[arm, s] for s in seeds]
        reach = [(m.reached(sc.best) or float("inf")) / sc.wall for m, sc in zip(mine, script)]
        whole = [m.wall / sc.wall for m, sc in zip(mine, script)]
        gap, se = _gap([m.best for m in mine], [sc.best for sc in script])
        figures[arm] = {"time_to_script_best": reach, "whole_study": whole, "best_gap_points": gap, "best_gap_se": se,
                        "epochs": [m.epochs for m in mine]}
        rows.append([arm, " ".join(f"{x:.2f}" for x in reach), f"{median(reach):.2f}",
                     " ".join(f"{x:.2f}" for x in whole), f"{median(whole):.2f}", f"{gap:+.2f} ({se:.2f})",
                     f"{median([m.epochs for m in mine]):.0f}"])
    if "hpo-train-1w" in figures:
        figures["hpo-train"]["vs_one_worker"] = _gap([by["hpo-train", s].best for s in seeds],
                                                     [by["hpo-train-1w", s].best for s in seeds])
    return rows, figures


def targets(problem: str, trials: int, epochs: int, figures: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The figures as summary.py's targets: (measured sentence, met)."""
    out: dict[str, dict[str, Any]] = {}

    def ttq(arm: str, goal: bool) -> dict[str, Any]:
        f = figures[arm]
        reach, n = f["time_to_script_best"], len(f["time_to_script_best"])
        ok = median(reach) <= 0.2 and f["best_gap_points"] >= -f["best_gap_se"]
        mid = "never (median)" if median(reach) == float("inf") else f"{median(reach):.2f}x median"
        return {"measured": f"{mid} ({', '.join(f'{x:.2f}' for x in reach)}; reached on "
                            f"{sum(x != float('inf') for x in reach)} of {n} seeds), best {f['best_gap_points']:+.2f} "
                            f"points (s.e. {f['best_gap_se']:.2f}), whole study {median(f['whole_study']):.2f}x",
                "met": ok if goal else None}

    if (trials, epochs) == (30, 15):
        if "hpo-train" in figures:
            out[f"ttq.{problem}"] = ttq("hpo-train", True)
        if "hpo-loop" in figures:
            out[f"ttq.{problem}.loop"] = ttq("hpo-loop", False)
        if "ray" in figures:
            out[f"ray.{problem}"] = ttq("ray", False)
    if "hpo-train" not in figures:  # a run of other arms (`--arms script --ray-python PY`)
        return out
    f = figures["hpo-train"]
    out[f"whole.{problem}.{trials}x{epochs}"] = {
        "measured": f"{median(f['whole_study']):.2f}x median ({', '.join(f'{x:.2f}' for x in f['whole_study'])}), "
                    f"best {f['best_gap_points']:+.2f} points (s.e. {f['best_gap_se']:.2f})",
        "met": median(f["whole_study"]) <= 0.5 and f["best_gap_points"] >= -f["best_gap_se"]}
    if "vs_one_worker" in f:
        gap, se = f["vs_one_worker"]
        out[f"parallel.{problem}"] = {"measured": f"2 workers minus 1: {gap:+.2f} points (s.e. {se:.2f}), "
                                                  f"{len(f['whole_study'])} seeds, {trials} x {epochs}",
                                      "met": gap >= -se}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problem", default="digits", choices=["digits", "fashion"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--arms", default="script,hpo-train,hpo-loop")
    ap.add_argument("--one-worker", action="store_true", help="also hpo-train with --workers 1")
    ap.add_argument("--ray-python", default=None, help="an interpreter with ray[tune]: also Ray Tune (ASHA)")
    ap.add_argument("--pruner", default=None, help="a pruner for the hpo specs, as YAML (default: hpo's)")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    budget = {"n_trials": args.trials, "epochs": args.epochs}
    pruner = yaml.safe_load(args.pruner) if args.pruner else None
    arms = args.arms.split(",") + (["hpo-train-1w"] if args.one_worker else [])
    runs: list[Run] = []
    for i, seed in enumerate(args.seeds):
        for arm in (arms if i % 2 == 0 else arms[::-1]):
            if arm == "script":
                runs.append(run_script(args.problem, seed, budget))
            else:
                runs.append(run_hpo(args.problem, seed, budget, arm, pruner))
            print(json.dumps({k: v for k, v in asdict(runs[-1]).items() if k != "finished"}), flush=True)
        if args.ray_python:
            runs.append(run_script(args.problem, seed, budget, args.ray_python, "ray_tune_ttq.py", "ray"))
    rows, figures = summary(runs, args.seeds)
    pruned = f"pruner {args.pruner}" if args.pruner else "hpo's default pruner"
    body = table(["arm", "time to the script's best / script wall, per seed", "median", "whole study / script wall, per seed",
                  "median", "best - script's best, points (s.e.)", "epochs (median)"], rows)
    notes = (f"{args.problem}, {args.trials} trials x {args.epochs} epochs, seeds {args.seeds}, no flags, "
             f"{pruned}. 'inf': the arm's best never reached the script's final best.")
    name = f"Time to quality: {args.problem} {args.trials}x{args.epochs}"
    record(name, body, notes, save=not args.no_save)
    if not args.no_save:
        save_results("time_to_quality", {"targets": {} if args.pruner else targets(args.problem, args.trials, args.epochs, figures),
                                          "problem": args.problem, "trials": args.trials, "epochs": args.epochs,
                                          "seeds": args.seeds, "pruner": args.pruner, "arms": figures,
                                          "runs": [asdict(r) for r in runs]})


if __name__ == "__main__":
    main()
