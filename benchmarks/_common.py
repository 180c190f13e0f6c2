"""Shared helpers for the benchmark scripts: machine facts, timing, and the record of each run."""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
HISTORY = RESULTS_DIR / "history.md"  # every run's table, as printed
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> str:
    import torch

    try:
        import optuna

        optuna_version = optuna.__version__
    except ImportError:
        optuna_version = "not installed"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu_model()}, {cores} cores, {gpu}; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), optuna {optuna_version}, Python {platform.python_version()}"
    )


def calibration() -> str:
    """What tells two machines of one description apart: `import torch` in a fresh interpreter
    and a fixed matmul on one thread (512 x 512, 200 times), each the median of three."""
    import subprocess

    import torch

    imports = []
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], check=True)
        imports.append(time.perf_counter() - t0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    a = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
    matmuls = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(200):
            a @ a
        matmuls.append(time.perf_counter() - t0)
    torch.set_num_threads(threads)
    return f"import torch {statistics.median(imports):.2f} s, 200 matmuls 512x512 on 1 thread {statistics.median(matmuls):.2f} s"


def command() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0], HERE.parent), *sys.argv[1:]])


def table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def record(title: str, body: str, notes: str = "", save: bool = True) -> None:
    """Print the result and append it, with date, machine and command, to results/history.md
    (RESULTS.md is generated from results/*.jsonl by summary.py)."""
    text = (
        f"\n## {title}\n\n"
        f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}\n"
        f"- machine: {machine()}\n"
        f"- command: `{command()}`\n\n{body}\n"
    )
    if notes:
        text += f"\n{notes}\n"
    print(text)
    if save:
        with HISTORY.open("a") as f:
            f.write(text)


def save_results(name: str, figures: dict[str, Any]) -> Path:
    """Append one run's figures, with date, machine and command, to results/NAME.jsonl: the
    machine-readable record `summary.py` builds RESULTS.md's table from."""
    import json

    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}.jsonl"
    line = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
            "command": command(), **figures}
    with path.open("a") as f:
        f.write(json.dumps(line) + "\n")
    return path


def warm_up() -> None:
    """First-use costs off the clock: torch.optim's first import pulls in torch._dynamo (~1 s)."""
    import torch

    w = torch.zeros(4, requires_grad=True)
    opt = torch.optim.Adam([w])
    (w * 2).sum().backward()
    opt.step()


def alternate(variants: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[Any]]:
    """Run each variant `repeats` times, interleaved (A B A B ...), so drift hits all alike."""
    out: dict[str, list[Any]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            out[name].append(fn())
    return out


def timed(fn: Callable[[], Any]) -> Callable[[], tuple[float, Any]]:
    def run() -> tuple[float, Any]:
        t0 = time.perf_counter()
        value = fn()
        return time.perf_counter() - t0, value

    return run


median = statistics.median


def run_measured(cmd: list[str], cwd: Path, env: dict[str, str], read: str = "stdout") -> tuple[float, int, Any, str]:
    """Run a command as a user would and measure it: seconds from launch, its wait status, its own
    resource usage (os.wait4: the CPU time and peak memory of that process, not of this one's other
    children) and what it wrote to `read` ("stdout" or "stderr"; the other stream is thrown away)."""
    import subprocess

    pipe = {"stdout": subprocess.PIPE, "stderr": subprocess.DEVNULL} if read == "stdout" else \
        {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, text=True, **pipe)
    stream = proc.stdout if read == "stdout" else proc.stderr
    assert stream is not None
    text = stream.read()
    _, status, usage = os.wait4(proc.pid, 0)
    return time.perf_counter() - t0, status, usage, text


def shown(path: Path) -> str:
    """A path relative to the repository when it is inside it."""
    try:
        return str(Path(path).resolve().relative_to(HERE.parent))
    except ValueError:
        return str(path)
