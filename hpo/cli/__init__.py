"""The `hpo` command line. Only this package knows about click and names flags; it turns the
library's errors into one-line messages and a non-zero exit."""

from __future__ import annotations

from hpo.cli import run, studies  # noqa: F401  (each registers its commands on `cli`)
from hpo.cli.base import cli

__all__ = ["cli", "main"]


def main() -> None:
    cli(prog_name="hpo")
