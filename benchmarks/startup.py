"""Start-up: commands that train nothing, and the time from `hpo run` to its first trial.

Each command runs as a fresh process (`--help`, `validate`, and `studies`, `best`, `trials` on a
finished study), several times; reported: the median wall time. For `hpo run
studies/quickstart.yaml` the time to the first trial is that trial's start in the storage,
measured from the moment the process was launched (and the first trained epoch, its start plus
the epoch's seconds); the hand-written script's own start-up (benchmarks/ttq_script.py, to its
first trial's start) is measured alongside. The phases before hpo's first trial are timed
in-process the same way the command runs them (imports, the spec, torch, the data, the storage,
the study). Targets: the first trial within 1.5 s; each command that trains nothing within 0.5 s.

    python benchmarks/startup.py [--repeats 5] [--no-save]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import HERE, median, record, save_results, table

HPO = str(Path(sys.executable).with_name("hpo"))  # the console script a user runs
SPEC = HERE / "specs" / "digits_bench.yaml"
QUICKSTART = HERE.parent / "studies" / "quickstart.yaml"
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
from hpo._private import import_dynamo
import_dynamo(); lap("import torch._dynamo (every optimizer's constructor needs it)")
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


def first_trial(tmp: str) -> tuple[float, float]:
    """Seconds from launching `hpo run studies/quickstart.yaml` to its first trial's start, and to
    the end of that trial's first epoch."""
    import optuna

    for f in Path(tmp).glob("hpo.db*"):
        f.unlink()
    launched = time.time()
    subprocess.run([HPO, "run", str(QUICKSTART), "-q", "--n-trials", "2"], cwd=tmp, check=True, capture_output=True)
    trials = optuna.load_study(study_name="quickstart", storage=f"sqlite:///{tmp}/hpo.db").trials
    start = min(t.datetime_start.timestamp() for t in trials if t.datetime_start)
    epoch = min(t.datetime_start.timestamp() + t.user_attrs["epoch_seconds"][0] for t in trials if t.datetime_start)
    return start - launched, epoch - launched


def script_first_trial(tmp: str) -> tuple[float, float]:
    """The hand-written script's start-up: launch to its first trial's start, and to the end of
    that trial (one epoch, scored)."""
    launched = time.time()
    out = subprocess.run([sys.executable, str(HERE / "ttq_script.py"), "--trials", "1", "--epochs", "1"], cwd=tmp,
                         check=True, capture_output=True, text=True).stdout
    first = json.loads(out.splitlines()[0])
    return float(first["start"]) - launched, float(first["t"]) - launched


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    hpo = [HPO]
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
        firsts, epochs, script, script_epochs = [], [], [], []
        for _ in range(args.repeats):
            for name, cmd in commands.items():
                times[name].append(wall(cmd, tmp))
            first, epoch = first_trial(tmp)
            firsts.append(first)
            epochs.append(epoch)
            start, epoch = script_first_trial(tmp)
            script.append(start)
            script_epochs.append(epoch)
        phases = subprocess.run([sys.executable, "-c", PHASES, str(QUICKSTART)], cwd=tmp, check=True,
                                capture_output=True, text=True).stdout.strip()
    rows = [[name, f"{median(v):.2f}", " ".join(f"{x:.2f}" for x in v)] for name, v in times.items()]
    rows.append(["`hpo run studies/quickstart.yaml` to its first trial", f"{median(firsts):.2f}",
                 " ".join(f"{x:.2f}" for x in firsts)])
    rows.append(["... to the end of that trial's first epoch", f"{median(epochs):.2f}", " ".join(f"{x:.2f}" for x in epochs)])
    rows.append(["the hand-written script to its first trial", f"{median(script):.2f}", " ".join(f"{x:.2f}" for x in script)])
    rows.append(["... to the end of that trial's first epoch", f"{median(script_epochs):.2f}",
                 " ".join(f"{x:.2f}" for x in script_epochs)])
    body = table(["command", "median s", "runs (s)"], rows)
    body += ("\n\nThe work before the first trial, done one step after another in one process (`hpo run` makes the "
             "data and a new file's tables in a second process while it imports torch):\n\n")
    body += table(["phase", "s"], [p.split("=") for p in phases.split(";")])
    notes = "Targets: the first trial within 1.5 s of the launch; commands that train nothing within 0.5 s each."
    record("Start-up: commands that train nothing, and `hpo run` to its first trial", body, notes,
           save=not args.no_save)
    if not args.no_save:
        read = {name: median(v) for name, v in times.items() if name != "hpo --help"}
        save_results("startup", {"targets": {
            "startup.first_trial": {"measured": f"{median(firsts):.2f} s (first epoch done at {median(epochs):.2f} s; "
                                                f"the script starts its first trial at {median(script):.2f} s and ends its first "
                                                f"epoch at {median(script_epochs):.2f} s)",
                                    "met": median(firsts) <= 1.5},
            "startup.read": {"measured": ", ".join(f"{n.split()[1]} {v:.2f} s" for n, v in read.items()),
                             "met": max(read.values()) <= 0.5}},
            "commands": times, "first_trial": firsts, "first_epoch": epochs, "script_first_trial": script,
            "script_first_epoch": script_epochs})


if __name__ == "__main__":
    main()
