"""Every benchmark script runs (tiny settings, nothing saved); timings are never asserted.

Marked slow (outside the default suite, run by CI after it): they keep the scripts working, they
test no behaviour of hpo's own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "benchmarks" / "specs" / "smoke.yaml")
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("script,args,expect", [
    ("data_path.py", ["--repeats", "1", "--batch-sizes", "64"], "hpo / pure"),
    ("time_to_quality.py", ["--problems", "diabetes", "--seeds", "0", "1", "--equal-trials", "--hpo-arms",
                            "hpo,med", "--variant", "med={pruner: {name: median, n_warmup_steps: $e4}}",
                            "--script-trials", "4"],
     ("best at the script's wall", "hpo-trials", "| med |")),
    ("storage_overhead.py", ["--trials", "6", "--storages", "memory,sqlite,postgres"], "hpo adds"),
    ("workers.py", ["--repeats", "1", "--trials", "4", "--workers", "1,2", "--storage", "postgres"],
     "2 workers / 1 worker"),
    ("startup.py", ["--repeats", "1"], ("to its first trial", "the hand-written script")),
    ("hand_workers.py", ["--repeats", "1", "--trials", "3", "--workers", "2"], "no flags / --threads 1"),
    ("fused.py", ["--repeats", "1", "--spec", SMOKE, "--group-size", "2"], "Fused / one at a time"),
    ("fused.py", ["--seeds", "0,1", "--spec", SMOKE, "--group-size", "2", "--pad", "true"],
     ("padded minus one at a time", "at equal work the speed-up")),
    ("fused.py", ["--group-scaling", "--spec", SMOKE, "--group-size", "2"], "one fused group of K members"),
    ("trial_api.py", ["--repeats", "1", "--spec", SMOKE], ("hpo.Trial / Optuna directly", "same best value: True")),
    ("streamed.py", ["--repeats", "1", "--samples", "2000", "--workers", "0"], "hpo / hand-written"),
    ("pareto_pruning.py", ["--seeds", "0", "--spec", str(ROOT / "benchmarks" / "specs" / "pareto_smoke.yaml")],
     "of epochs saved"),
    ("python_api.py", ["--repeats", "1", "--spec", SMOKE], "hpo.run / hpo run"),
    ("ddp_trial.py", ["--n-train", "1000", "--epochs", "1", "--repeats", "1"], "2 processes / 1 process"),
    ("pbt.py", ["--seeds", "0", "--population", "2", "--epochs", "2", "--interval", "1"], "pbt - default, paired"),
])
def test_benchmark_script_runs(script: str, args: list[str], expect: str | tuple[str, ...]) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--no-save"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for e in (expect,) if isinstance(expect, str) else expect:
        assert e in out.stdout
    assert "| " in out.stdout  # a table was printed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks/gpu.py needs a CUDA GPU")
def test_gpu_benchmark_runs() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--epochs", "1",
                          "--study-trials", "2", "--no-save"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
