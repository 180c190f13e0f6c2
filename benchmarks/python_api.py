"""`hpo.run()` from a script against `hpo run` on the command line: the same study, whole process.

Each repeat runs, in alternating order and each in a fresh temporary folder with its own SQLite
file, `hpo run SPEC -q` and `python -c "import hpo; hpo.run(SPEC, quiet=True)"` (the same local
workers, one per core by default). Reported: wall seconds of each and the ratio of medians. The
trials that run depend on which worker finishes first, so single runs vary by a few seconds.

    python benchmarks/python_api.py [--spec studies/quickstart.yaml] [--repeats 3] [--no-save]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import HERE, alternate, median, record, table


def timed(cmd: list[str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        done = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True,
                              env={k: v for k, v in os.environ.items() if k not in ("HPO_STORAGE", "HPO_WORKERS")})
        wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", default=str(HERE.parent / "studies" / "quickstart.yaml"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    spec = str(Path(args.spec).resolve())
    hpo = str(Path(sys.executable).with_name("hpo"))
    cases = {
        "cli": lambda: timed([hpo, "run", spec, "-q"]),
        "api": lambda: timed([sys.executable, "-c", f"import hpo; hpo.run({spec!r}, quiet=True)"]),
    }
    res = alternate(cases, args.repeats)
    cli, api = median(res["cli"]), median(res["api"])
    body = table(["hpo run (s)", "hpo.run() (s)", "hpo.run / hpo run", "runs (hpo run / hpo.run)"],
                 [[round(cli, 1), round(api, 1), round(api / cli, 2),
                   " ".join(f"{a:.1f}/{b:.1f}" for a, b in zip(res["cli"], res["api"]))]])
    notes = (f"{Path(spec).name}, whole process, each in a fresh folder: **hpo.run / hpo run: {api / cli:.2f}x** "
             "(the same local workers; before issue 27 hpo.run ran one in-process worker: 75 s against 14 s).")
    record("hpo.run() against hpo run", body, notes, save=not args.no_save)


if __name__ == "__main__":
    main()
