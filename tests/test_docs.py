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
    assert first_two[1] in ci_lines, ".ci/run must run the README's test command verbatim"


def test_readme_installs_the_cpu_torch_build() -> None:
    for command in readme_commands()[:2]:
        assert "torch==2.13.0" in command  # an unpinned torch pulls a multi-GB CUDA build


def test_every_study_the_readme_runs_exists() -> None:
    names = re.findall(r"hpo (?:run|validate) (studies/[\w.-]+\.yaml)", (ROOT / "README.md").read_text())
    assert names
    for name in names:
        assert (ROOT / name).is_file(), name
