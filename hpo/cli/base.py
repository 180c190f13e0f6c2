"""What every `hpo` command shares: the click group, the one-line error handling, common options,
opening a storage, and SIGTERM as Ctrl-C. The commands live in hpo/cli/run.py and hpo/cli/studies.py;
both import this module, neither imports the other's internals.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from hpo.errors import (
    HpoError,
    SettingError,
    StudyExistsError,
    UnreadableStudyError,
    is_storage_failure,
)

F = TypeVar("F", bound=Callable[..., Any])

STORAGE_HELP = "Storage URL [env HPO_STORAGE; default sqlite:///hpo.db]."


class _Group(click.Group):
    """Every error a user can cause ends as one line, `Error: ...`, and a non-zero exit."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SettingError as e:  # the library names the setting; here it is the flag that set it
            raise click.ClickException(f"--{e.setting}: {e.message}") from None
        except (StudyExistsError, UnreadableStudyError) as e:
            raise click.ClickException(f"{e} (hpo delete {e.name} --yes)") from None
        except HpoError as e:
            raise click.ClickException(str(e)) from None
        except Exception as e:
            if not is_storage_failure(e):
                raise  # a bug in hpo: keep the traceback
            from hpo.storage.urls import reason

            raise click.ClickException(f"storage error: {reason(e)}") from None

    def main(self, *args: Any, **kwargs: Any) -> Any:
        """Click prints usage errors as a usage block plus the error; we print the error alone
        (with where to look), so every mistake is one line."""
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except click.UsageError as e:
            hint = f" (see: {e.ctx.command_path} --help)" if e.ctx is not None else ""
            click.echo(f"Error: {e.format_message()}{hint}", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(130)


def storage_option(f: F) -> F:
    return click.option("--storage", metavar="URL", default=None, help=STORAGE_HELP)(f)


def artifacts_option(f: F) -> F:
    return click.option(
        "--artifacts",
        metavar="PATH",
        default=None,
        help="Artifact folder shared by the workers [env HPO_ARTIFACTS; default beside the SQLite "
        "file, else ./hpo-artifacts].",
    )(f)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hpo")
def cli() -> None:
    """hpo: hyperparameter optimization for PyTorch, on Optuna.

    \b
    Example:
      hpo run studies/quickstart.yaml
      hpo best quickstart
    """
    if {"-h", "--help"} & set(sys.argv[1:]):
        return  # help imports nothing more (Optuna alone takes ~0.25 s)
    if click.get_current_context().invoked_subcommand not in READ_WITHOUT_OPTUNA:
        quiet_optuna()


# Commands that can answer from the database alone (hpo.search.reading): optuna is imported only
# if they fall back to it (open_store), so they answer in a fraction of a second.
READ_WITHOUT_OPTUNA = ("studies", "best", "trials", "show", "logs", "init")


def quiet_optuna() -> None:
    """hpo prints its own progress and failure reasons: Optuna's INFO lines are not printed."""
    import logging

    import optuna

    optuna.logging.set_verbosity(logging.ERROR)


# ---- helpers --------------------------------------------------------------------------------


def open_store(url: str | None, *, create: bool, heartbeat: Any = None, connections: int = 4) -> tuple[Any, str]:
    from hpo.storage.backends import Heartbeat, open_storage
    from hpo.storage.urls import resolve_url

    quiet_optuna()
    resolved = resolve_url(url)
    return open_storage(resolved, create=create, heartbeat=heartbeat or Heartbeat(), connections=connections), resolved


def sigterm_as_interrupt() -> None:
    """SIGTERM (docker stop, Slurm, Kubernetes) ends a worker exactly like Ctrl-C.

    SIGINT gets Python's handler back too: a process started in the background by a shell
    script inherits SIGINT as *ignored*, and would otherwise shrug off Ctrl-C and `kill -INT`.
    """

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
