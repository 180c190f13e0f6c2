"""Question 4: what does storage cost per trial, and how much does hpo add on top of Optuna?

A. Optuna alone: a trivial objective that reports 10 values (one per "epoch") and asks the pruner,
   at 100 and 1,000 trials, on in-memory, SQLite and PostgreSQL storage.
B. hpo's addition: a tiny model (one step per epoch, 10 epochs) trained by the same Trainer in a
   plain Optuna loop, against hpo's run_worker on the same storage object. The difference per
   trial is what hpo adds (budget check, checkpoints, attributes, model upload, progress).
C. Where the time goes: cProfile of B's hpo run, top functions by own time.
Target: hpo adds <= 5 ms per trial on top of Optuna's own cost.

    python benchmarks/storage_overhead.py [--trials 100,1000] [--storages memory,sqlite,postgres]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
import time
import uuid
from contextlib import contextmanager

import optuna
import torch
from _common import record, table

from hpo.data.splits import DataCache
from hpo.execution.worker import run_worker
from hpo.search.study import open_for_spec
from hpo.spec.loading import spec_from_mapping
from hpo.spec.space import suggest
from hpo.storage.backends import Heartbeat, open_storage
from hpo.training.models import build_model
from hpo.training.trainer import Trainer

EPOCHS = 10
TINY = {
    "name": "tiny",
    "seed": 0,
    "data": {"dataset": "synthetic", "n_samples": 64, "n_features": 4, "n_classes": 2},
    "space": {"lr": {"low": 1e-3, "high": 1e-1, "log": True}, "width": 4, "depth": 1, "batch_size": 64},
    "sampler": {"name": "random"},
    "pruner": {"name": "median", "n_startup_trials": 5, "n_warmup_steps": 3},
    "budget": {"n_trials": 100, "epochs": EPOCHS},
}


@contextmanager
def storage_url(kind: str, tmp: str):
    if kind == "memory":
        yield None
    elif kind == "sqlite":
        yield f"sqlite:///{tmp}/{uuid.uuid4().hex}.db"
    else:
        import psycopg

        name = f"hpo_bench_{uuid.uuid4().hex[:10]}"
        admin = dict(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", autocommit=True)
        with psycopg.connect(**admin) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"postgresql://postgres@127.0.0.1:5432/{name}"
        finally:
            with psycopg.connect(**admin) as c:
                c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def optuna_alone(url: str | None, n: int) -> float:
    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", -1, 1)
        for step in range(EPOCHS):
            trial.report(x * step, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return x

    study = optuna.create_study(storage=url, pruner=optuna.pruners.MedianPruner(5, 3),
                                sampler=optuna.samplers.RandomSampler(0))
    t0 = time.perf_counter()
    study.optimize(objective, n_trials=n)
    return (time.perf_counter() - t0) / n


def plain_training(url: str | None, n: int) -> float:
    """The same tiny training in a plain Optuna loop: what a user's script would cost."""
    spec = spec_from_mapping(dict(TINY, budget=dict(TINY["budget"], n_trials=n)), "tiny")
    cache = DataCache(spec.data, spec.seed, torch.device("cpu"))
    storage = open_storage(url) if url else None

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, spec)
        data = cache.get(params.scaling)
        torch.manual_seed(trial.number)
        t = Trainer(build_model("mlp", params, data.input_shape, data.n_outputs), params, data, EPOCHS,
                    torch.device("cpu"), trial.number)
        value = 0.0
        for r in t.fit():
            value = r.val["accuracy"]
            trial.report(value, r.epoch)
            if r.epoch < EPOCHS - 1 and trial.should_prune():
                raise optuna.TrialPruned()
        return value

    from hpo.search.samplers import make_pruner, make_sampler

    study = optuna.create_study(storage=storage, direction="maximize", sampler=make_sampler(spec),
                                pruner=make_pruner(spec))
    t0 = time.perf_counter()
    study.optimize(objective, n_trials=n)
    return (time.perf_counter() - t0) / n


def hpo_training(url: str | None, n: int, tmp: str, profile: cProfile.Profile | None = None) -> float:
    spec = spec_from_mapping(dict(TINY, budget=dict(TINY["budget"], n_trials=n)), "tiny")
    if url is None:
        storage = optuna.storages.InMemoryStorage()
    else:
        storage = open_storage(url, heartbeat=Heartbeat())
    handle = open_for_spec(spec, storage, url or "memory", f"{tmp}/artifacts-{uuid.uuid4().hex}")
    data = DataCache(spec.data, spec.seed, torch.device("cpu"))
    t0 = time.perf_counter()
    if profile:
        profile.enable()
    run_worker(handle, device=torch.device("cpu"), data=data)
    if profile:
        profile.disable()
    return (time.perf_counter() - t0) / n


N_PARAMS = 8


def suggest_path(storage: optuna.storages.BaseStorage, n: int) -> tuple[float, float]:
    """ms and committed transactions per trial of a study that suggests N_PARAMS parameters."""
    from sqlalchemy import event

    commits = [0]
    event.listen(storage.engine, "commit", lambda conn: commits.__setitem__(0, commits[0] + 1))  # type: ignore[attr-defined]

    def objective(trial: optuna.Trial) -> float:
        xs = [trial.suggest_float(f"x{i}", -1, 1) for i in range(N_PARAMS)]
        for step in range(EPOCHS):
            trial.report(sum(xs) * step, step)
        return sum(xs)

    study = optuna.create_study(storage=storage, sampler=optuna.samplers.RandomSampler(0))
    study.optimize(objective, n_trials=2)  # first-use costs off the clock
    before = commits[0]
    t0 = time.perf_counter()
    study.optimize(objective, n_trials=n)
    return (time.perf_counter() - t0) / n * 1e3, (commits[0] - before) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", default="100,1000")
    ap.add_argument("--storages", default="memory,sqlite,postgres")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    torch.set_num_threads(1)
    counts = [int(c) for c in args.trials.split(",")]
    kinds = args.storages.split(",")
    rows_a, rows_b = [], []
    profile = cProfile.Profile()
    with tempfile.TemporaryDirectory() as tmp:
        # Warm-up: imports and first-use costs (torch.optim pulls in torch._dynamo) off the clock.
        with storage_url("sqlite", tmp) as url:
            plain_training(url, 3)
            hpo_training(url.replace(".db", "-w.db"), 3, tmp)
        for n in counts:
            for kind in kinds:
                with storage_url(kind, tmp) as url:
                    rows_a.append([kind, n, optuna_alone(url, n) * 1e3])
                with storage_url(kind, tmp) as url:
                    plain = plain_training(url, n)
                with storage_url(kind, tmp) as url:
                    ours = hpo_training(url, n, tmp)
                with storage_url(kind, tmp) as url:  # and the plain loop again: drift cancels
                    plain = (plain + plain_training(url, n)) / 2
                rows_b.append([kind, n, plain * 1e3, ours * 1e3, (ours - plain) * 1e3])
        with storage_url("sqlite", tmp) as url:  # profiled apart: the profiler slows what it watches
            hpo_training(url, counts[0], tmp, profile)
        rows_d = []
        for kind in kinds:
            if kind == "memory":
                continue
            for _ in range(2):  # A B A B
                for name, make in (("Optuna RDBStorage", optuna.storages.RDBStorage),
                                   ("hpo's storage", lambda u: open_storage(u, heartbeat=None))):
                    with storage_url(kind, tmp) as url:
                        store = make(url)
                        ms, commits = suggest_path(store, counts[0])
                        store.engine.dispose()
                    rows_d.append([kind, name, ms, commits])
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out).sort_stats("cumulative")
    stats.print_stats(r"hpo/(execution|runtime|search|storage)/", 15)  # hpo's own parts
    top = "\n".join(ln for ln in out.getvalue().splitlines() if ln.strip())[-2500:]
    body = (
        "A. Optuna alone, ms per trial (10 reports + pruner checks):\n\n"
        + table(["storage", "trials", "ms / trial"], rows_a)
        + "\n\nB. Tiny model, 10 epochs: plain Optuna loop vs hpo, ms per trial:\n\n"
        + table(["storage", "trials", "plain loop", "hpo", "hpo adds"], rows_b)
        + f"\n\nC. Where hpo's time goes (SQLite, {counts[0]} trials, cProfile, hpo's functions by cumulative time):\n\n```\n{top}\n```"
        + f"\n\nD. {N_PARAMS} parameters and {EPOCHS} reports per trial, {counts[0]} trials, A B A B: ms and "
          "committed transactions per trial:\n\n"
        + table(["storage", "class", "ms / trial", "commits / trial"], rows_d)
    )
    worst = max(r[4] for r in rows_b)
    notes = f"Target: hpo adds <= 5 ms per trial. Largest measured addition: **{worst:.1f} ms**."
    in_memory = {r[1]: r[3] for r in rows_b if r[0] == "memory"}
    costs = [f"{r[0]}, {r[1]} trials: **{r[3] - in_memory[r[1]]:.1f} ms**" for r in rows_b
             if r[0] != "memory" and r[1] in in_memory]
    if costs:
        notes += (" What a trial of hpo's costs in storage and sampler calls (hpo on that storage minus hpo on "
                  "Optuna's in-memory storage, same trials): " + "; ".join(costs)
                  + " (target: <= 20 ms on SQLite at 1,000 trials).")
    record("Storage overhead per trial", body, notes, save=not args.no_save)


if __name__ == "__main__":
    main()
