"""Time to quality on the problem suite: hpo against the hand-written Optuna script, at equal wall time.

For each problem (`suite.py`) and sampler seed, as fresh processes, whole process (imports, data,
storage, and for hpo the final test scoring), timed from each process's launch:

- `script`: benchmarks/ttq_script.py, plain Optuna + PyTorch (TPE, MedianPruner, one thread, a
  DataLoader, the whole validation set at once), the problem's trials x epochs;
- `hpo`: `hpo run` with no flags on a spec whose `train:` is the script's own training code and
  whose budget is the script's wall time on that seed (`budget: {time: ..., epochs: ...}`, no trial
  count): hpo's defaults, given the same time;
- `hpo-trials` (`--equal-trials`): the same with the script's trial count instead of its time;
- a variant (`--variant NAME='YAML'`): `hpo` with keys of the spec replaced (a pruner, a sampler),
  for choosing defaults; `--hpo-arms` picks which hpo arms run (default: `hpo`);
- peers (`--peers`, each needing an interpreter with the peer: `--peer-python PY`): Ray Tune with
  ASHA, Hyperopt's TPE and SMAC3's multi-fidelity facade, each with its documented defaults and the
  script's wall time.

Reported per problem and arm: the best at the script's wall time against the script's final best
(in points for accuracy, in the metric's units for RMSE; positive: better than the script), its
standard error over seeds, the time its best-so-far first reached the script's final best (over
the script's wall), and trials and epochs run. Every run is one JSON line in
benchmarks/results/time_to_quality.jsonl, naming the problem's split (development or held-out)
and the machine with a calibration figure.

    python benchmarks/time_to_quality.py --problems development [--seeds 0 1 2 3 4]
        [--variant 'median={pruner: {name: median}}' ...] [--hpo-arms hpo,median] [--equal-trials] [--no-save]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import string
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from _common import HERE, calibration, median, record, save_results, table
from suite import DEVELOPMENT, HELD_OUT, PROBLEMS, Problem, spec_space

HPO_STARTUP_SLACK = 0.0  # seconds added to hpo's time budget (none: it is timed from launch like the script)


@dataclass
class Run:
    problem: str
    arm: str
    seed: int
    wall: float
    best: float  # the best at the end of the run
    epochs: int
    trials: int
    finished: list[tuple[float, float]] = field(default_factory=list)  # (seconds from launch, value) of complete trials

    def best_by(self, problem: Problem, seconds: float) -> float | None:
        """The best complete trial's value by `seconds` after launch."""
        done = [v for t, v in self.finished if t <= seconds and v is not None and math.isfinite(v)]
        if not done:
            return None
        return max(done) if problem.direction == "maximize" else min(done)

    def reached(self, problem: Problem, target: float) -> float | None:
        """Seconds from launch until a complete trial scored at least as well as `target`."""
        return next((t for t, v in sorted(self.finished) if v is not None and problem.better(v, target)), None)


def launch(cmd: list[str], cwd: str, env: dict[str, str] | None = None) -> tuple[float, float, str]:
    env = dict(os.environ, PYTHONPATH="", **(env or {}))
    t0 = time.time()
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    wall = time.time() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-1000:]}\n{done.stderr[-3000:]}")
    return t0, wall, done.stdout


def run_script(problem: Problem, seed: int, python: str = sys.executable, script: str = "ttq_script.py",
               arm: str = "script", extra: list[str] | None = None) -> Run:
    with tempfile.TemporaryDirectory() as tmp:
        t0, wall, out = launch([python, str(HERE / script), "--problem", problem.name, "--seed", str(seed),
                                *(extra or [])], tmp)
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    trials = [x for x in lines if "t" in x]
    done = [(x["t"] - t0, x["value"]) for x in trials if x["state"] == "COMPLETE"]
    return Run(problem.name, arm, seed, wall, lines[-1]["best"], sum(x["epochs"] for x in trials), len(trials), done)


TRAIN_MODULE = """\
import sys
sys.path.insert(0, {bench!r})
from suite import PROBLEMS

PROBLEM = PROBLEMS[{problem!r}]
_data = None


def train(trial):
    global _data
    if _data is None:
        _data = PROBLEM.load({seed})
    if PROBLEM.lightning:
        from hpo.integrations.lightning import TrialCallback
        from suite import fit_lightning

        fit_lightning(trial.params, _data, trial.epochs, TrialCallback(trial))
    else:
        PROBLEM.fit(trial.params, _data, trial.epochs, lambda epoch, value: trial.report(epoch, **{{PROBLEM.metric: value}}))
"""


def hpo_spec(problem: Problem, seed: int, budget: dict[str, Any], overrides: str) -> dict[str, Any]:
    """`overrides`: YAML of spec keys to replace, where $e2, $e3 and $e4 stand for the problem's
    epochs divided by 2, 3 and 4 (a warm-up as a share of the epochs); its `priors:` key gives
    space entries a prior each."""
    spec: dict[str, Any] = {"name": f"ttq-{problem.name}", "metric": problem.metric, "direction": problem.direction,
                            "seed": seed, "train": "ttq_train.py:train", "space": spec_space(problem),
                            "budget": budget}
    e = problem.epochs
    changes = yaml.safe_load(string.Template(overrides).substitute(e2=e // 2, e3=e // 3, e4=e // 4)) or {}
    for name, prior in changes.pop("priors", {}).items():  # `priors: {lr: {value: 0.003, confidence: high}}`
        entry = spec["space"][name]
        spec["space"][name] = {**(entry if isinstance(entry, dict) else {"choices": entry}), "prior": prior}
    spec.update(changes)
    return spec


def run_hpo(problem: Problem, seed: int, arm: str, budget: dict[str, Any], overrides: str) -> Run:
    import optuna

    spec = hpo_spec(problem, seed, budget, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "ttq_train.py").write_text(TRAIN_MODULE.format(bench=str(HERE), problem=problem.name, seed=seed))
        Path(tmp, "study.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        hpo = str(Path(sys.executable).with_name("hpo"))
        t0, wall, _ = launch([hpo, "run", "study.yaml", "-q"], tmp)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.load_study(study_name=spec["name"], storage=f"sqlite:///{tmp}/hpo.db")
        trials = study.get_trials(deepcopy=False)
    done = [(t.datetime_complete.timestamp() - t0, t.value) for t in trials
            if t.state == optuna.trial.TrialState.COMPLETE and t.datetime_complete and t.value is not None]
    best = study.best_value if done else float("nan")
    return Run(problem.name, arm, seed, wall, best, sum(len(t.intermediate_values) for t in trials), len(trials), done)


PEERS = {"ray": "peer_ray.py", "hyperopt": "peer_hyperopt.py", "smac": "peer_smac.py"}


def _mean_se(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else float("nan"))


def summarize(problem: Problem, runs: list[Run], seeds: list[int]) -> tuple[list[list[Any]], dict[str, dict[str, Any]]]:
    """Per arm: the best at the script's wall against the script's best, time to the script's best."""
    by = {(r.arm, r.seed): r for r in runs}
    script = [by["script", s] for s in seeds]
    rows, figures = [], {}
    for arm in dict.fromkeys(r.arm for r in runs):
        mine = [by[arm, s] for s in seeds if (arm, s) in by]
        pairs = [(m, by["script", m.seed]) for m in mine]
        at_wall = [m.best_by(problem, sc.wall) for m, sc in pairs]
        gains = [problem.gain(v, sc.best) if v is not None else -math.inf for v, (_, sc) in zip(at_wall, pairs)]
        finite = [g for g in gains if math.isfinite(g)]
        gain, se = _mean_se(finite) if len(finite) == len(gains) else (-math.inf, float("nan"))
        final_gain, final_se = _mean_se([problem.gain(m.best, sc.best) for m, sc in pairs if math.isfinite(m.best)])
        reach = [(m.reached(problem, sc.best) or math.inf) / sc.wall for m, sc in pairs]
        figures[arm] = {"gain_at_wall": gain, "gain_at_wall_se": se, "gains": gains, "final_gain": final_gain,
                        "final_gain_se": final_se, "time_to_script_best": reach,
                        "wall": [m.wall / sc.wall for m, sc in pairs], "trials": [m.trials for m in mine],
                        "epochs": [m.epochs for m in mine], "script_wall": [sc.wall for _, sc in pairs]}
        rows.append([arm, f"{gain:+.3f} ({se:.3f})", " ".join(f"{g:+.2f}" for g in gains),
                     " ".join("never" if x == math.inf else f"{x:.2f}" for x in reach), _med(reach),
                     f"{median([m.trials for m in mine]):.0f}", f"{median([m.epochs for m in mine]):.0f}",
                     f"{median([m.wall / sc.wall for m, sc in pairs]):.2f}"])
    return rows, figures


def _med(xs: list[float]) -> str:
    m = median(xs)
    return "never" if m == math.inf else f"{m:.2f}"


def _med_x(xs: list[float]) -> str:
    """A median of times over the script's wall, for a sentence: "0.45x median", "never (median)"."""
    m = _med(xs)
    return "never (median)" if m == "never" else f"{m}x median"


def targets(problem: Problem, figures: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The figures as summary.py's targets, for hpo's defaults (the `hpo` and `hpo-trials` arms)."""
    out: dict[str, dict[str, Any]] = {}
    unit = "points" if problem.unit == 100 else problem.metric.removeprefix("val_")
    if "hpo" in figures:
        f = figures["hpo"]
        limit = 0.3 if median(f["script_wall"]) >= 60 else 0.5
        reach = f["time_to_script_best"]
        met = f["gain_at_wall"] >= -f["gain_at_wall_se"] and median(reach) <= limit
        out[f"suite.{problem.name}"] = {
            "measured": f"best at the script's wall {f['gain_at_wall']:+.3f} {unit} (s.e. {f['gain_at_wall_se']:.3f}), "
                        f"time to the script's best {_med_x(reach)} (reached on "
                        f"{sum(x != math.inf for x in reach)} of {len(reach)} seeds; target <= {limit}x), "
                        f"{median(f['trials']):.0f} trials in the script's {median(f['script_wall']):.0f} s",
            "met": met, "split": problem.split}
    if "hpo-trials" in figures:
        f = figures["hpo-trials"]
        out[f"suite.{problem.name}.trials"] = {
            "measured": f"best at the script's trial count {f['final_gain']:+.3f} {unit} (s.e. {f['final_gain_se']:.3f}), "
                        f"in {median(f['wall']):.2f}x the script's wall",
            "met": f["final_gain"] >= -f["final_gain_se"], "split": problem.split}
    if "nopriors" in figures:  # the priors measurement: a good and a wrong prior against none, seed by seed
        base = figures["nopriors"]
        for arm, tid in (("good", "priors.good"), ("wrong", "priors.wrong")):
            if arm not in figures:
                continue
            f = figures[arm]
            diff, se = _mean_se([a - b for a, b in zip(f["gains"], base["gains"])])
            out[f"{tid}.{problem.name}"] = {
                "measured": f"{problem.name}: best at the script's wall {diff:+.3f} {unit} against no prior (s.e. "
                            f"{se:.3f}); time to the script's best {_med_x(f['time_to_script_best'])} against "
                            f"{_med_x(base['time_to_script_best'])} with no prior",
                "met": (diff >= -se) if arm == "wrong" else (median(f["time_to_script_best"])
                                                              <= median(base["time_to_script_best"])),
                "split": problem.split}
    for peer in PEERS:
        if peer in figures:
            f = figures[peer]
            ours = f"; hpo's defaults {figures['hpo']['gain_at_wall']:+.3f}" if "hpo" in figures else ""
            out[f"peer.{peer}.{problem.name}"] = {
                "measured": f"best at the script's wall {f['gain_at_wall']:+.3f} {unit} (s.e. {f['gain_at_wall_se']:.3f}), "
                            f"time to the script's best {_med_x(f['time_to_script_best'])}{ours}",
                "met": None, "split": problem.split}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", default="development",
                    help="development, held-out, all, or names separated by commas")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=YAML",
                    help="an hpo arm with spec keys replaced, e.g. 'median={pruner: {name: median}}'")
    ap.add_argument("--hpo-arms", default="hpo", help="hpo arms to run: hpo and variant names, by commas")
    ap.add_argument("--equal-trials", action="store_true", help="also hpo with the script's trial count (hpo-trials)")
    ap.add_argument("--peers", default="", help="ray,hyperopt,smac: run with --peer-python")
    ap.add_argument("--peer-python", default=None, help="an interpreter that has the peers installed")
    ap.add_argument("--script-trials", type=int, default=None, help="the script's trial count (default: the "
                                                                       "problem's); for smoke runs")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    names = {"development": list(DEVELOPMENT), "held-out": list(HELD_OUT),
             "all": list(PROBLEMS)}.get(args.problems) or args.problems.split(",")
    variants = {"hpo": ""}
    for item in args.variant:
        name, _, text = item.partition("=")
        variants[name] = text
    arms = args.hpo_arms.split(",")
    peers = [p for p in args.peers.split(",") if p]
    calib = calibration()
    for name in names:
        problem = PROBLEMS[name]
        runs: list[Run] = []
        for i, seed in enumerate(args.seeds):
            script = run_script(problem, seed, extra=["--trials", str(args.script_trials)] if args.script_trials else [])
            runs.append(script)
            budget = {"time": round(script.wall + HPO_STARTUP_SLACK, 1), "epochs": problem.epochs}
            order = arms if i % 2 == 0 else arms[::-1]
            for arm in order:
                runs.append(run_hpo(problem, seed, arm, budget, variants[arm]))
                print(json.dumps({k: v for k, v in asdict(runs[-1]).items() if k != "finished"}), flush=True)
            if args.equal_trials:
                runs.append(run_hpo(problem, seed, "hpo-trials", {"n_trials": args.script_trials or problem.trials,
                                                                  "epochs": problem.epochs}, ""))
            for peer in peers:
                runs.append(run_script(problem, seed, args.peer_python or sys.executable, PEERS[peer], peer,
                                       ["--time", f"{script.wall:.1f}"]))
        rows, figures = summarize(problem, runs, args.seeds)
        body = table(["arm", "best at the script's wall - script's best (s.e.)", "per seed",
                      "time to the script's best / script wall", "median", "trials", "epochs", "wall / script"], rows)
        notes = (f"{problem.about}; {problem.split} problem; the script: {problem.trials} trials x {problem.epochs} "
                 f"epochs; seeds {args.seeds}; hpo arms given the script's wall time as their time budget. Variants: "
                 f"{json.dumps({k: v for k, v in variants.items() if k in arms and v})}. Calibration: {calib}.")
        record(f"Time to quality: {problem.name} ({problem.split})", body, notes, save=not args.no_save)
        if not args.no_save:
            save_results("time_to_quality", {
                "targets": targets(problem, figures),
                "problem": problem.name, "split": problem.split, "seeds": args.seeds, "calibration": calib,
                "variants": {k: v for k, v in variants.items() if k in arms}, "arms": figures,
                "runs": [asdict(r) for r in runs]})


if __name__ == "__main__":
    main()
