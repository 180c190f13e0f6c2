"""The README's promises: its commands are the ones CI and users run."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [line.strip() for block in blocks for line in block.strip().splitlines()]


def test_ci_runs_the_readme_test_command() -> None:
    first_two = readme_commands()[:2]
    assert "hpo run studies/quickstart.yaml" in first_two[0]
    assert "pytest" in first_two[1]
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    steps = [step.strip() for step in first_two[1].split("&&")]
    # Each step on a line of its own, in order: under `set -e` an early failure in an && chain is ignored.
    at = [ci_lines.index(step) if step in ci_lines else -1 for step in steps]
    assert -1 not in at and at == sorted(at), ".ci/run must run each step of the README's test command, in order"
    assert not any("&&" in line and "pip install" in line for line in ci_lines)


def test_readme_installs_the_cpu_torch_build() -> None:
    for command in readme_commands()[:2]:
        assert "torch==2.13.0" in command  # an unpinned torch pulls a multi-GB CUDA build


def test_every_study_the_readme_runs_exists() -> None:
    names = re.findall(r"hpo (?:run|validate) (studies/[\w.-]+\.yaml)", (ROOT / "README.md").read_text())
    assert names
    for name in names:
        assert (ROOT / name).is_file(), name


def test_results_page_and_readme_figures_are_generated_from_the_recorded_results(tmp_path: Path) -> None:
    """RESULTS.md and the README's table of figures are what benchmarks/summary.py makes of the
    JSON lines under benchmarks/results/: neither is edited by hand, and a new result changes both."""
    import json
    import shutil
    import subprocess
    import sys

    summary = ROOT / "benchmarks" / "summary.py"
    check = subprocess.run([sys.executable, str(summary), "--check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    # In a copy: a newer line for a target replaces the older figure on both pages.
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "benchmarks", copy / "benchmarks", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "README.md", copy / "README.md")
    line = {"date": "2999-01-01 00:00 UTC", "machine": "Test CPU, 2 cores, no GPU; torch x", "command": "python x.py",
            "targets": {"startup.read": {"measured": "studies 0.01 s", "met": True}}}
    with (copy / "benchmarks" / "results" / "startup.jsonl").open("a") as f:
        f.write(json.dumps(line) + "\n")
    stale = subprocess.run([sys.executable, str(copy / "benchmarks" / "summary.py"), "--check"], capture_output=True,
                           text=True)
    assert stale.returncode == 1 and "RESULTS.md" in stale.stderr and "README.md" in stale.stderr
    subprocess.run([sys.executable, str(copy / "benchmarks" / "summary.py")], check=True)
    for page in (copy / "benchmarks" / "RESULTS.md", copy / "README.md"):
        row = next(r for r in page.read_text().splitlines() if "`hpo studies`, `best`" in r)
        assert "studies 0.01 s" in row and "2999-01-01" in row and "`python x.py`" in row


def test_every_test_the_readme_names_as_proof_exists() -> None:
    """The "What survives what" table names, for each fault, the test that proves it: a renamed or
    removed test breaks this, not the promise silently."""
    import ast

    text = (ROOT / "README.md").read_text()
    table = text[text.index("### What survives what"):text.index("**Threat model.**")]
    named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", table)
    assert len(named) >= 12
    for path, name in named:
        tree = ast.parse((ROOT / path).read_text())
        tests = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert name in tests, f"{path}::{name} is named in the README but does not exist"
