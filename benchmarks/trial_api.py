"""What the trial API costs: hpo's own loop run through hpo.Trial against the same loop calling
Optuna directly, and the whole `hpo run` process against an earlier revision.

In-process (default): the digits quickstart study twice per repeat, alternating: (a) `run_worker`,
where hpo's loop is a training function over hpo.Trial (reports, checkpoint policy, endings,
attributes); (b) the same Trainer, seeds and model in a plain Optuna objective that calls
`trial.report` / `trial.should_prune` itself, what a user calling Optuna directly would write. Both
use a fresh SQLite file and the same sampler seed, so they should find the same best value.

Whole process (`--rev REV`): `hpo run SPEC` from a checkout of REV (a git worktree) and from this
tree, alternating, wall and CPU time of each finished process.

    python benchmarks/trial_api.py                 # per-epoch cost of the API over Optuna
    python benchmarks/trial_api.py --rev 461d743   # the whole quickstart, before and after
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import HERE, alternate, median, record, run_measured, table, timed, warm_up

ROOT = HERE.parent
QUICKSTART = ROOT / "studies" / "quickstart.yaml"


def through_api(spec_path: Path, tmp: Path) -> tuple[float, int]:
    import torch

    from hpo.execution.worker import run_worker
    from hpo.search.study import open_for_spec
    from hpo.spec.loading import load_spec
    from hpo.storage.backends import Heartbeat, open_storage

    spec = load_spec(spec_path)
    url = f"sqlite:///{tmp / f'api-{time.monotonic_ns()}.db'}"
    handle = open_for_spec(spec, open_storage(url, create=True, heartbeat=Heartbeat()), url, str(tmp / "art"))
    run_worker(handle, device=torch.device("cpu"))
    return handle.study.best_value, sum(len(t.intermediate_values) for t in handle.study.trials)


def direct_optuna(spec_path: Path, tmp: Path) -> tuple[float, int]:
    """The same training and seeds in an objective that talks to Optuna itself."""
    import optuna
    import torch

    from hpo.data.splits import DataCache
    from hpo.runtime.trial import trial_seed
    from hpo.search.samplers import make_pruner, make_sampler
    from hpo.spec.loading import load_spec
    from hpo.spec.space import sample
    from hpo.training.builtin import fold_seed
    from hpo.training.models import build_model
    from hpo.training.trainer import Trainer, metric_value

    spec = load_spec(spec_path)
    data = DataCache(spec.builtin_data, spec.seed, torch.device("cpu"), spec.model)

    def objective(trial: optuna.Trial) -> float:
        values = sample(trial, spec)
        from hpo.spec.params import Params

        p = Params.from_mapping(values)
        seed = trial_seed(spec.seed, trial.number)
        fold = data.get(p.scaling)
        torch.manual_seed(fold_seed(seed, 0))
        model = build_model(spec.model, values, fold.input_shape, fold.n_outputs)
        t = Trainer(model, p, fold, spec.budget.epochs, torch.device("cpu"), seed)
        torch.manual_seed(seed)
        value = float("nan")
        for epoch in range(spec.budget.epochs):
            r = t.run_epoch()
            value = metric_value(spec.metric, r.val)
            trial.report(value, epoch)
            if epoch + 1 < spec.budget.epochs and trial.should_prune():
                raise optuna.TrialPruned()
        return value

    url = f"sqlite:///{tmp / f'direct-{time.monotonic_ns()}.db'}"
    study = optuna.create_study(storage=url, direction=spec.direction, sampler=make_sampler(spec),
                                pruner=make_pruner(spec))
    study.optimize(objective, n_trials=spec.budget.n_trials)
    return study.best_value, sum(len(t.intermediate_values) for t in study.trials)


def in_process(args: argparse.Namespace) -> None:
    import logging

    import optuna
    import torch

    optuna.logging.set_verbosity(logging.WARNING)
    torch.set_num_threads(args.threads)
    warm_up()
    spec = Path(args.spec)
    with tempfile.TemporaryDirectory() as tmp:
        through_api(spec, Path(tmp))  # first-use costs (imports, allocators) off the clock, for both
        direct_optuna(spec, Path(tmp))
        runs = alternate({"through hpo.Trial": timed(lambda: through_api(spec, Path(tmp))),
                          "Optuna directly": timed(lambda: direct_optuna(spec, Path(tmp)))}, args.repeats)
    api = [s for s, _ in runs["through hpo.Trial"]]
    direct = [s for s, _ in runs["Optuna directly"]]
    epochs = runs["through hpo.Trial"][0][1][1]
    ratios = [a / d for a, d in zip(api, direct)]
    per_epoch_ms = (median(api) - median(direct)) / max(1, epochs) * 1000
    rows = [[name, median([s for s, _ in r]), r[0][1][0], r[0][1][1]] for name, r in runs.items()]
    body = table(["variant", "median s", "best value", "epochs trained"], rows)
    body += (f"\n\nhpo.Trial / Optuna directly: **{median(ratios):.3f}x** (pairs {min(ratios):.3f}-"
             f"{max(ratios):.3f}, {args.repeats} repeats); API cost per epoch: {per_epoch_ms:.2f} ms; "
             f"same best value: {runs['through hpo.Trial'][0][1][0] == runs['Optuna directly'][0][1][0]}")
    record(f"Trial API cost: {spec.name}, hpo.Trial vs Optuna directly", body, save=not args.no_save)


def whole_process(args: argparse.Namespace) -> None:
    """`hpo run SPEC` at REV and here, alternating; wall and CPU seconds of each process."""
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.rev],
                       check=True, capture_output=True)
        try:
            trees = {f"at {args.rev}": old, "this tree": ROOT}

            runs = alternate({name: (lambda t=tree: _timed_process(t, args.spec, Path(tmp)))
                              for name, tree in trees.items()}, args.repeats)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], capture_output=True)
    rows = [[name, median([w for w, _, _ in r]), median([c for _, c, _ in r]), r[0][2]] for name, r in runs.items()]
    names = list(runs)
    ratios = [a[0] / b[0] for a, b in zip(runs[names[1]], runs[names[0]])]
    body = table(["tree", "median wall s", "median CPU s", "best (first run)"], rows)
    body += (f"\n\nthis tree / {args.rev}: **{median(ratios):.3f}x** wall time (pairs {min(ratios):.3f}-"
             f"{max(ratios):.3f}, {args.repeats} repeats)")
    record(f"Whole `hpo run` before and after: {Path(args.spec).name}", body, save=not args.no_save)


def _timed_process(tree: Path, spec: str, tmp: Path) -> tuple[float, float, str]:
    work = Path(tempfile.mkdtemp(dir=tmp))
    env = dict(os.environ, PYTHONPATH=str(tree))
    env.pop("HPO_STORAGE", None)
    wall, status, usage, out = run_measured([sys.executable, "-m", "hpo", "run", str(Path(spec).resolve())], work, env)
    if status != 0:
        raise SystemExit(f"hpo run failed in {tree} (status {status})")
    best = next((line for line in out.splitlines() if line.startswith("Best trial")), "?")
    return wall, usage.ru_utime + usage.ru_stime, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(QUICKSTART))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rev", default=None, help="compare the whole `hpo run` against this git revision")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    whole_process(args) if args.rev else in_process(args)


if __name__ == "__main__":
    main()
