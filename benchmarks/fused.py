"""Issue 7: trials per hour, fused groups vs one trial at a time, on the same study and budget.

Both variants run the same spec (same sampler seed, pruner, trial budget) in this process,
alternately; reported: wall time, trials per hour, their ratio, and the best validation score of
each (the fused worker has K trials in flight, as K parallel workers would, so each is sampled
with a little less feedback; `--seeds` measures what that costs, and what each run trained:
K trials in flight lead the sampler to other widths and depths, so the same trial budget is not
the same work, and the sweep reports the speed-up at equal work too).
Targets: >= 2.5x on a 2-core CPU for the digits MLP study; >= 10x on a GPU for Fashion-MNIST MLP.

    python benchmarks/fused.py                                  # digits, CPU
    python benchmarks/fused.py --spec benchmarks/specs/fashion_fused.yaml --group-size 32   # GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import optuna
import torch
from _common import HERE, alternate, median, record, shown, table, warm_up

from hpo.data.splits import DataCache
from hpo.execution.fused_worker import run_fused_worker
from hpo.execution.worker import run_worker
from hpo.search.study import open_for_spec
from hpo.spec.loading import load_spec
from hpo.spec.params import Params
from hpo.storage.backends import open_storage
from hpo.training.fused import PADDED, SHARED, FusedGroup
from hpo.training.models import build_model
from hpo.training.trainer import Trainer


def run(spec, device: torch.device, data: DataCache, group: int | None) -> tuple[float, float, list]:
    name = f"{spec.name}-{'fused' if group else 'seq'}-{time.monotonic_ns()}"
    spec = dataclasses.replace(spec, name=name)
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/hpo.db"
        handle = open_for_spec(spec, open_storage(url), url, f"{tmp}/artifacts")
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if group:
            run_fused_worker(handle, device=device, group_size=group, data=data)
        else:
            run_worker(handle, device=device, data=data)
        wall = time.perf_counter() - t0
        return wall, handle.study.best_value, handle.study.trials


def structure(trial: optuna.trial.FrozenTrial) -> tuple:
    """What sets an epoch's cost: the values a fused group's members share, width and depth."""
    return tuple(trial.params.get(k) for k in (*SHARED, *PADDED))


def epoch_prices(runs: list[list[optuna.trial.FrozenTrial]]) -> dict[tuple, float]:
    """Median seconds of one unfused epoch per structure, from one-at-a-time runs' trials."""
    seconds: dict[tuple, list[float]] = {}
    for trials in runs:
        for t in trials:
            seconds.setdefault(structure(t), []).extend(t.user_attrs.get("epoch_seconds", []))
    return {k: median(v) for k, v in seconds.items() if v}


def work(trials: list[optuna.trial.FrozenTrial], prices: dict[tuple, float]) -> float:
    """The unfused training seconds these trials' epochs would take: how much the sampler chose
    to train, whatever ran it (K trials in flight pick other widths than one at a time do)."""
    fallback = median(list(prices.values()))
    return sum(len(t.intermediate_values) * prices.get(structure(t), fallback) for t in trials)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", type=Path, default=HERE / "specs" / "digits_fused.yaml")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n-trials", type=int, default=None, help="override the spec's budget")
    ap.add_argument("--epochs", type=int, default=None, help="override the spec's epochs")
    ap.add_argument("--seeds", default=None,
                    help="comma-separated study seeds: compare the best score per seed (one run of each)")
    ap.add_argument("--pad", choices=["auto", "true", "false"], default="auto",
                    help="group trials of other widths and depths together, padded (execution.pad; "
                         "auto: on a GPU only)")
    ap.add_argument("--group-scaling", action="store_true",
                    help="epoch time of one fused group by size and structure, against one unfused model")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    warm_up()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    spec = load_spec(args.spec).with_budget(n_trials=args.n_trials, epochs=args.epochs)
    pad = {"auto": None, "true": True, "false": False}[args.pad]
    spec = dataclasses.replace(spec, execution=dataclasses.replace(spec.execution, pad=pad))
    device = torch.device(args.device)
    label = f"fused x{args.group_size}" + (" padded" if spec.execution.pads(device.type) else "")
    data = DataCache(spec.data, spec.seed, device, spec.model)
    data.folds("standard")  # load and place the data once, outside the clocks
    if args.group_scaling:
        return group_scaling(args, spec, device, data)
    if args.seeds:
        return by_seed(args, spec, device, data, label)
    res = alternate({
        "one at a time": lambda: run(spec, device, data, None),  # noqa: E731
        label: lambda: run(spec, device, data, args.group_size),
    }, args.repeats)
    rows = []
    for name, runs in res.items():
        print(name, [(r[0], r[1], len(r[2])) for r in runs], flush=True)
        wall = median([r[0] for r in runs])
        rows.append([name, wall, len(runs[0][2]) / wall * 3600, max(r[1] for r in runs), " ".join(f"{r[0]:.1f}" for r in runs)])
    speedup = rows[0][1] / rows[1][1]
    body = table(["variant", "median wall s", "trials / hour", "best val", "runs (s)"], rows)
    notes = (f"Spec `{shown(args.spec)}`: {spec.data.dataset}, {spec.budget.n_trials} trials x "
             f"{spec.budget.epochs} epochs, {spec.sampler.name} seed {spec.seed}, {spec.pruner.name} pruner, on {device}.\n"
             f"**Fused / one at a time: {speedup:.2f}x trials per hour**; best val {rows[1][3]:.4f} fused vs "
             f"{rows[0][3]:.4f} one at a time.")
    record(f"Fused trials vs one at a time ({spec.data.dataset}, {device})", body, notes, save=not args.no_save)


def by_seed(args: argparse.Namespace, spec, device: torch.device, data: DataCache, label: str) -> None:
    """Best score at equal trial budget over several sampler seeds, one at a time vs fused. One
    seed's comparison is mostly luck (a few validation images), so the summary is the mean gap,
    its standard error and the wins, ties and losses."""
    seeds = [int(x) for x in args.seeds.split(",")]
    pairs = []
    for seed in seeds:
        seq = run(dataclasses.replace(spec, seed=seed), device, data, None)
        fused = run(dataclasses.replace(spec, seed=seed), device, data, args.group_size)
        pairs.append((seq, fused))
        print(seed, seq[:2], fused[:2], flush=True)
    # The same trial budget is not the same work: priced at unfused epoch times, what each run
    # trained; the speed-up at equal work is the time ratio scaled by fused work / sequential work.
    prices = epoch_prices([seq[2] for seq, _ in pairs])
    rows, gaps, ratios, fair = [], [], [], []
    for seed, (seq, fused) in zip(seeds, pairs):
        gaps.append((fused[1] - seq[1]) * 100)
        ratios.append(seq[0] / fused[0])
        more = work(fused[2], prices) / work(seq[2], prices)
        fair.append(ratios[-1] * more)
        rows.append([seed, seq[0], seq[1], fused[0], ratios[-1], more, fair[-1], fused[1], f"{gaps[-1]:+.2f}"])
    body = table(["seed", "one at a time s", "best val", f"{label} s", "speed-up", "work fused / one",
                  "speed-up at equal work", "best val", "points"], rows)
    mean = sum(gaps) / len(gaps)
    se = (sum((x - mean) ** 2 for x in gaps) / max(1, len(gaps) - 1) / len(gaps)) ** 0.5
    wins, ties = sum(x > 0.005 for x in gaps), sum(abs(x) <= 0.005 for x in gaps)
    seq_total, fused_total = sum(r[1] for r in rows), sum(r[3] for r in rows)
    n_val = len(data.folds("standard")[0].val)
    notes = (f"Spec `{shown(args.spec)}`: {spec.data.dataset}, {spec.budget.n_trials} trials x {spec.budget.epochs} "
             f"epochs, {spec.sampler.name} sampler, {spec.pruner.name} pruner, on {device}; the data split is the same "
             f"for every seed ({n_val} validation examples: one is {100 / n_val:.2f} points). {label} minus one at a "
             f"time: **mean gap {mean:+.2f} points (standard error {se:.2f}), better / equal / worse on {wins} / "
             f"{ties} / {len(gaps) - wins - ties} seeds, worst {min(gaps):+.2f}; speed-up median {median(ratios):.2f}x, "
             f"range {min(ratios):.2f}-{max(ratios):.2f}x, {seq_total / fused_total:.2f}x on the summed time "
             f"({seq_total:.0f} s vs {fused_total:.0f} s).** The runs do not train the same things: work is each run's "
             f"epochs priced at the one-at-a-time runs' median unfused epoch time for their width and depth "
             f"({', '.join(f'{k[-2]} x {k[-1]}: {v * 1000:.0f} ms' for k, v in sorted(prices.items(), key=str))}); at "
             f"equal work the speed-up is median {median(fair):.2f}x, range {min(fair):.2f}-{max(fair):.2f}x.")
    record(f"Fused trials: best score over seeds ({spec.data.dataset}, {device})", body, notes, save=not args.no_save)


def group_scaling(args: argparse.Namespace, spec, device: torch.device, data: DataCache) -> None:
    """What a fused group gains by size, per structure: an epoch (train and validation) of K
    members against K epochs of one unfused model. Fusion's speed-up in a study is bounded by
    these ratios for the structures the sampler picks."""
    split = data.folds("standard")[0]
    widths = next((p.possible_values() for p in spec.space if p.name == "width"), None) or [128]
    depths = next((p.possible_values() for p in spec.space if p.name == "depth"), None) or [2]
    sizes = [k for k in (1, 2, 4, 8, 16, 32) if k <= args.group_size]
    reps = 15
    rows = []
    for width in widths:
        for depth in depths:
            p = Params(optimizer="adam", lr=1e-3, width=int(width), depth=int(depth), dropout=0.2, batch_size=64)
            torch.manual_seed(0)
            trainer = Trainer(build_model("mlp", p, split.input_shape, split.n_outputs), p, split, reps + 1, device, 0)
            alone = median([r.seconds for r in trainer.fit()[1:]])
            row = [f"{width} x {depth}", alone]
            for k in sizes:
                group = FusedGroup(split, device)
                for i in range(k):
                    group.add(i, p, i, reps + 1)
                times = []
                for _ in range(reps + 1):
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    group.train_epoch()
                    group.after_epoch([v["loss"] for v in group.evaluate(split.val)])
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                row.append(f"{k * alone / median(times[1:]):.2f}x")
            rows.append(row)
            print(rows[-1], flush=True)
    body = table(["width x depth", "unfused epoch s", *[f"K={k}" for k in sizes]], rows)
    notes = (f"Trials per hour of one fused group of K members against one unfused model, per structure "
             f"({spec.data.dataset} train split, batch 64, Adam, dropout 0.2, median of {reps} epochs, on {device}).")
    record(f"Fused group speed-up by size and structure ({spec.data.dataset}, {device})", body, notes,
           save=not args.no_save)


if __name__ == "__main__":
    main()
