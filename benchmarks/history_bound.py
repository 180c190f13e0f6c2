"""What the sampler's bounded history (hpo.storage.ledger) costs in search quality.

Past RECENT + BEST trials (1,000 + 100) the sampler reads the most recent trials, the best
complete ones and the unfinished ones; a median pruner compares with every complete trial (until
ec830e2 it too read the recent trials alone, which cost digits about one validation image on 4
of 10 seeds at 250,25). Studies that large take days on the problem
suite, so the bound is measured scaled down: `hpo run` with no flags on a suite problem, the
script's training code, an equal trial budget, once with every trial read (no bound reached) and
once with $HPO_HISTORY at RECENT,BEST, on the same seeds, the order alternating by seed. Reported:
the best at the end, bounded minus whole (positive: the bound found better), its standard error
over seeds (paired by seed).

Two scales. 20,5 over 90 trials (the default) is harsher than the real bound: TPE's good group is
ceil(10%) of the trials it reads, capped at 25, so reading 25 of 90 shrinks it from 9 trials to 3. 250,25 over 600 trials keeps what
the real bound keeps: past 250 trials TPE's good group is 25 trials whether it reads all or the
bound, and they are the same 25 (the best are kept); only old trials of the rest are left out,
as past 1,100 trials at 1,000,100. (Before ec830e2 the 20,5 scale also had the median pruner
compare with 20 trials instead of 90.) What neither scale reproduces: TPE weighs the rest by age, and
at 100,000 trials the old ones hold most of that weight, so leaving them out changes the rest's
density more there than at 600.

    python benchmarks/history_bound.py [--problems digits,diabetes] [--seeds 0 1 2 3 4]
        [--trials 90] [--bound 20,5] [--no-save]
    python benchmarks/history_bound.py --trials 600 --bound 250,25 [--more --seeds 5 6 7 8 9]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from dataclasses import asdict

from _common import RESULTS_DIR, calibration, record, save_results, table
from suite import PROBLEMS
from time_to_quality import Run, run_hpo

DEFAULT_BOUND = "20,5"  # harsher than the real bound, see above


def one(problem_name: str, seed: int, trials: int, bound: str | None) -> Run:
    problem = PROBLEMS[problem_name]
    before = os.environ.pop("HPO_HISTORY", None)
    if bound:
        os.environ["HPO_HISTORY"] = bound
    try:
        return run_hpo(problem, seed, "bounded" if bound else "whole", {"n_trials": trials, "epochs": problem.epochs}, "")
    finally:
        os.environ.pop("HPO_HISTORY", None)
        if before is not None:
            os.environ["HPO_HISTORY"] = before


def _earlier(trials: int, bound: str) -> list[Run]:
    """The runs of the latest saved record with these trials and bound (--more)."""
    path = RESULTS_DIR / "history_bound.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    same = [x for x in lines if x.get("trials") == trials and x.get("bound") == bound]
    if not same:
        raise SystemExit(f"--more: no saved run of {trials} trials at bound {bound} in {path}")
    return [Run(**{**r, "finished": [tuple(f) for f in r["finished"]]}) for r in same[-1]["runs"]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", default="digits,diabetes")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--trials", type=int, default=90)
    ap.add_argument("--bound", default=DEFAULT_BOUND)
    ap.add_argument("--more", action="store_true",
                    help="add these seeds to the latest saved run of the same problems, trials and bound: the "
                         "figures are over every seed of both")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    calib = calibration()
    rows, targets, runs = [], {}, []
    earlier = _earlier(args.trials, args.bound) if args.more else []
    seeds = [*dict.fromkeys([*(r.seed for r in earlier), *args.seeds])]
    for name in args.problems.split(","):
        problem = PROBLEMS[name]
        pairs = []
        for seed in dict.fromkeys(r.seed for r in earlier if r.problem == name):
            mine = {r.arm: r for r in earlier if r.problem == name and r.seed == seed}
            runs.extend(mine.values())
            pairs.append((mine["whole"], mine["bounded"]))
        for i, seed in enumerate(args.seeds):
            order = [None, args.bound] if i % 2 == 0 else [args.bound, None]
            got = {}
            for bound in order:
                run = one(name, seed, args.trials, bound)
                got[run.arm] = run
                runs.append(run)
                print(json.dumps({k: v for k, v in asdict(run).items() if k != "finished"}), flush=True)
            pairs.append((got["whole"], got["bounded"]))
        diffs = [problem.gain(b.best, w.best) for w, b in pairs]  # positive: the bounded run found better
        mean = statistics.mean(diffs)
        se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
        rows.append([f"{name} ({problem.split})", f"{statistics.mean(w.best for w, _ in pairs):.4f}",
                     f"{statistics.mean(b.best for _, b in pairs):.4f}", f"{mean:+.3f} ({se:.3f})",
                     " ".join(f"{d:+.2f}" for d in diffs), f"{statistics.mean(w.wall for w, _ in pairs):.0f} / "
                     f"{statistics.mean(b.wall for _, b in pairs):.0f}"])
        key = f"history_bound.{name}" + ("" if args.bound == DEFAULT_BOUND else "." + args.bound.replace(",", "_"))
        targets[key] = {
            "measured": f"bounded ({args.bound}) minus whole history, best after {args.trials} trials: {mean:+.3f} "
                        f"(s.e. {se:.3f}) {problem.metric} {'points' if problem.unit == 100 else 'units'}, seeds {seeds}",
            "met": mean >= -se}
    unit = "points for accuracy, units for RMSE"
    body = table(["problem", "best, whole history", f"best, bounded {args.bound}", f"bounded - whole (s.e.), {unit}",
                  "per seed", "wall s (whole / bounded)"], rows)
    notes = (f"hpo's defaults, {args.trials} trials each, the problem's epochs; bounded: HPO_HISTORY={args.bound} (the "
             f"sampler reads the {args.bound.split(',')[0]} most recent trials, the "
             f"{args.bound.split(',')[1]} best and the unfinished ones past the first "
             f"{sum(int(x) for x in args.bound.split(','))}; the median pruner compares with every complete trial). "
             f"Calibration: {calib}.")
    record("Bounded sampler history against the whole history (equal trials)", body, notes, save=not args.no_save)
    if not args.no_save:
        save_results("history_bound", {"targets": targets, "trials": args.trials, "bound": args.bound,
                                       "seeds": seeds, "calibration": calib,
                                       "runs": [asdict(r) for r in runs]})


if __name__ == "__main__":
    main()
