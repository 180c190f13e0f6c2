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
    try:
        cli(prog_name="hpo")
    finally:
        # What the command made (torch's modules, the study's objects) lives until the process
        # ends: frozen, the interpreter's last garbage collection skips it (it took ~1.5 s after
        # every `hpo run` or `hpo worker` had printed its result). Files and connections still close.
        import gc

        gc.freeze()
