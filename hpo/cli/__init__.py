"""The `hpo` command line. Only this package knows about click and names flags; it turns the
library's errors into one-line messages and a non-zero exit."""

from __future__ import annotations

from hpo.cli import run, studies  # noqa: F401  (each registers its commands on `cli`)
from hpo.cli.base import cli

__all__ = ["cli", "main"]


def main() -> None:
    import sys

    args = sys.argv[1:]
    if args[:1] in (["run"], ["worker"]) and not {"-h", "--help"} & set(args):
        # Watched by a parent that takes back a trial the training code's process leaves running
        # when it ends under it (os._exit, a crash), and exits non-zero then.
        from hpo.execution.supervisor import supervise_self

        supervise_self()
    cli(prog_name="hpo")
