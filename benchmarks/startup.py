"""Start-up: commands that train nothing, and the time from `hpo run` to its first trained epoch.

Each command runs as a fresh process (`--help`, `validate`, and `studies`, `best`, `trials` on a
finished study), several times; reported: the median wall time. For `hpo run` the time to the
first epoch is the trial's start in the storage plus its first epoch's seconds, measured from the
moment the process was launched, with the phases before it timed in-process the same way the
command runs them (imports, the spec, torch, the data, the storage, the study).

    python benchmarks/startup.py [--repeats 5] [--no-save]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import HERE, median, record, table

SPEC = HERE / "specs" / "digits_bench.yaml"
PHASES = r'''
import time, sys
t = time.perf_counter(); out = []
def lap(name):
    global t
    now = time.perf_counter(); out.append(f"{name}={now - t:.3f}"); t = now
import hpo.cli; lap("import hpo.cli")
from hpo.spec.loading import load_spec
spec = load_spec(sys.argv[1]); lap("read and check the spec (imports optuna)")
from hpo.search.study import choose_device, open_for_spec
device = choose_device("auto"); lap("import torch")
from hpo.execution.launch import prepare
data = prepare(spec, device); lap("load the data (imports scikit-learn)")
from hpo.storage.backends import open_storage
storage = open_storage("sqlite:///phases.db"); lap("create the storage (Optuna's tables, Alembic)")
open_for_spec(spec, storage, "sqlite:///phases.db"); lap("create the study")
print(";".join(out))
'''


def wall(cmd: list[str], cwd: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - t0


def first_epoch(tmp: str) -> float:
    import optuna

    for f in Path(tmp).glob("hpo.db*"):
        f.unlink()
    launched = time.time()
    subprocess.run([sys.executable, "-m", "hpo", "run", str(SPEC), "-q", "--n-trials", "4"], cwd=tmp, check=True,
                   capture_output=True)
    trials = optuna.load_study(study_name="digits_bench", storage=f"sqlite:///{tmp}/hpo.db").trials
    return min(t.datetime_start.timestamp() + t.user_attrs["epoch_seconds"][0] for t in trials) - launched


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    hpo = [sys.executable, "-m", "hpo"]
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([*hpo, "run", str(SPEC), "-q", "--n-trials", "2", "--storage", "sqlite:///done.db"], cwd=tmp,
                       check=True, capture_output=True)
        commands = {
            "hpo --help": [*hpo, "--help"],
            "hpo validate SPEC": [*hpo, "validate", str(SPEC)],
            "hpo studies": [*hpo, "studies", "--storage", "sqlite:///done.db"],
            "hpo best NAME": [*hpo, "best", "digits_bench", "--storage", "sqlite:///done.db"],
            "hpo trials NAME": [*hpo, "trials", "digits_bench", "--storage", "sqlite:///done.db"],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        firsts = []
        for _ in range(args.repeats):
            for name, cmd in commands.items():
                times[name].append(wall(cmd, tmp))
            firsts.append(first_epoch(tmp))
        phases = subprocess.run([sys.executable, "-c", PHASES, str(SPEC)], cwd=tmp, check=True, capture_output=True,
                                text=True).stdout.strip()
    rows = [[name, f"{median(v):.2f}", " ".join(f"{x:.2f}" for x in v)] for name, v in times.items()]
    rows.append(["`hpo run` to its first trained epoch", f"{median(firsts):.2f}", " ".join(f"{x:.2f}" for x in firsts)])
    body = table(["command", "median s", "runs (s)"], rows)
    body += "\n\nWhere `hpo run`'s time before the first trial goes (one run, in-process):\n\n"
    body += table(["phase", "s"], [p.split("=") for p in phases.split(";")])
    notes = ("Target: commands that train nothing under 0.5 s each. `hpo run` runs "
             f"{SPEC.name} with its default workers.")
    record("Start-up: commands that train nothing, and `hpo run` to its first epoch", body, notes,
           save=not args.no_save)


if __name__ == "__main__":
    main()
