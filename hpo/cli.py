"""The `hpo` command line: parse arguments, call the library, print results.

This is the only module that knows about click, and the only place where the project's errors
become one-line messages with a non-zero exit.
"""

from __future__ import annotations

import csv
import io
import json
import math
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import click

from hpo.errors import HpoError

F = TypeVar("F", bound=Callable[..., Any])

STORAGE_HELP = "Storage URL [env HPO_STORAGE; default sqlite:///hpo.db]."


class _Group(click.Group):
    """Turns the project's own errors into `Error: <one line>` and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HpoError as e:
            raise click.ClickException(str(e)) from None


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
    import logging

    import optuna

    optuna.logging.set_verbosity(logging.ERROR)  # hpo prints its own progress and failure reasons


def main() -> None:
    cli(prog_name="hpo")


# ---- helpers --------------------------------------------------------------------------------


def _open(url: str | None, *, create: bool) -> tuple[Any, str]:
    from hpo.storage import open_storage, resolve_url

    resolved = resolve_url(url)
    return open_storage(resolved, create=create), resolved


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}" if abs(value) < 1e-3 or abs(value) >= 1e5 else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


def _sigterm_as_interrupt() -> None:
    """SIGTERM (docker stop, Slurm, Kubernetes) ends a worker exactly like Ctrl-C."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


class _Progress:
    """Trial n/N, the epoch in flight, best so far, pruned and failed so far."""

    def __init__(self, total: int, metric: str, direction: str, epochs: int, quiet: bool) -> None:
        self.total, self.metric, self.epochs, self.quiet = total, metric, epochs, quiet
        self.maximize = direction == "maximize"
        self.tty = sys.stderr.isatty()
        self.start = time.monotonic()
        self.status = ""

    def _line(self, text: str, final: bool) -> None:
        if self.quiet:
            return
        if self.tty:
            click.echo("\r\033[K" + text, nl=final, err=True)
        elif final:
            click.echo(text, err=True)

    def _head(self, study: Any) -> str:
        from hpo.study import budget_status, summarize

        s = summarize(study)
        b = budget_status(study, self.total)
        done = b.finished + b.failed
        best = f"best {_fmt(s.best_value)} (#{s.best_number})" if s.best_number is not None else "best -"
        pruned, failed = s.counts.get("PRUNED", 0), b.failed
        elapsed = time.monotonic() - self.start
        return f"[{done}/{self.total}] {best} | pruned {pruned} failed {failed} | {elapsed:5.0f}s"

    # Listener interface
    def trial_started(self, number: int, params: Any, resumed_epoch: int) -> None:
        self.resumed = resumed_epoch
        if resumed_epoch:
            self._line(f"trial {number}: resuming from its checkpoint at epoch {resumed_epoch}", True)

    def epoch_done(self, number: int, result: Any, value: float) -> None:
        self._line(
            f"{self.status} | trial {number} epoch {result.epoch + 1}/{self.epochs} "
            f"{self.metric} {_fmt(value)}",
            False,
        )

    def trial_finished(self, study: Any, trial: Any) -> None:
        self.status = self._head(study)
        value = _fmt(trial.value) if trial.value is not None else "-"
        reason = trial.user_attrs.get("reason", "")
        line = f"trial {trial.number:>4} {trial.state.name:<8} {self.metric} {value:<8}"
        epochs = len(trial.intermediate_values)
        line += f" epochs {epochs:>3}"
        if trial.state.name == "FAIL" and reason:
            line += f"  ({reason[:100]})"
        if self.tty:
            self._line(self.status, False)
        else:
            self._line(f"{line}  {self.status}", True)


def _print_summary(summary: Any, elapsed: float | None = None) -> None:
    c = summary.counts
    parts = [f"{c.get(k, 0)} {k.lower()}" for k in ("COMPLETE", "PRUNED", "FAIL") if c.get(k)]
    total = sum(c.values())
    took = f" in {elapsed:.1f} s" if elapsed is not None else ""
    click.echo(f"\nStudy {summary.name}: {total} trials ({', '.join(parts) or 'none finished'}){took}")
    if summary.best_number is None:
        click.echo("No trial has completed yet.")
        return
    click.echo(f"Best trial #{summary.best_number}: {summary.metric} {_fmt(summary.best_value)}")
    width = max((len(k) for k in summary.best_params), default=0)
    for key, value in summary.best_params.items():
        click.echo(f"  {key:<{width}}  {_fmt(value)}")
    if summary.test:
        t = summary.test
        click.echo(f"Test {t['metric'].removeprefix('test_')} of the best model: {_fmt(t['value'])}")
        click.echo(f"Best model: {t['model_path']}")


# ---- commands -------------------------------------------------------------------------------


@cli.command()
@click.argument("spec_file", metavar="SPEC", type=click.Path(dir_okay=True))
def validate(spec_file: str) -> None:
    """Check a study file without running it.

    \b
    Example:
      hpo validate studies/digits_mlp.yaml
    """
    from hpo.spec import load_spec

    spec = load_spec(spec_file)
    tuned = [p.name for p in spec.space if p.tuned]
    click.echo(
        f"{spec_file}: ok - study {spec.name!r}, {spec.data.dataset} data, {spec.model} model, "
        f"{len(tuned)} tuned parameters ({', '.join(tuned)}), {spec.budget.n_trials} trials x "
        f"{spec.budget.epochs} epochs, {spec.sampler.name} sampler, {spec.pruner.name} pruner"
    )


@cli.command()
@click.argument("spec_file", metavar="SPEC", type=click.Path(dir_okay=True))
@storage_option
@click.option("--n-trials", type=click.IntRange(min=1), default=None,
              help="The study's total number of trials (overrides budget.n_trials).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop starting trials after this many seconds (overrides budget.timeout).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@artifacts_option
@click.option("-q", "--quiet", is_flag=True, help="No progress lines, only the summary.")
def run(
    spec_file: str,
    storage: str | None,
    n_trials: int | None,
    timeout: float | None,
    device: str,
    artifacts: str | None,
    quiet: bool,
) -> None:
    """Run (or resume) the study described in SPEC.

    The study's total is budget.n_trials: running the same file again resumes and runs only
    the missing trials. Ctrl-C stops cleanly; the trial in flight resumes on the next run.

    \b
    Example:
      hpo run studies/quickstart.yaml
      hpo run studies/digits_mlp.yaml --storage postgresql://user@db/hpo --n-trials 200
    """
    from hpo.spec import load_spec
    from hpo.study import Interrupted, choose_device, finalize, open_for_spec, run_worker, summarize

    spec = load_spec(spec_file)
    if n_trials is not None:
        spec = spec.with_budget(n_trials=n_trials)
    dev = choose_device(device)
    from hpo.data import DataCache

    data = DataCache(spec.data, spec.seed, dev)  # data errors surface before storage is touched
    store, url = _open(storage, create=True)
    handle = open_for_spec(spec, store, url, artifacts)
    _execute(handle, dev, data, timeout=timeout, n_trials=None, quiet=quiet, storage_url=url)


def _execute(handle: Any, dev: Any, data: Any, *, timeout: float | None, n_trials: int | None,
             quiet: bool, storage_url: str) -> None:
    from hpo.samplers import effective_n_trials
    from hpo.storage import mask
    from hpo.study import Interrupted, finalize, run_worker, summarize

    spec = handle.spec
    total = effective_n_trials(spec)
    if not quiet:
        click.echo(
            f"Study {spec.name}: {total} trials x {spec.budget.epochs} epochs on {dev}, "
            f"storage {mask(storage_url)}",
            err=True,
        )
    progress = _Progress(total, spec.metric, spec.direction, spec.budget.epochs, quiet)
    _sigterm_as_interrupt()
    start = time.monotonic()
    try:
        result = run_worker(handle, device=dev, n_trials=n_trials, timeout=timeout,
                            listener=progress, data=data)  # type: ignore[arg-type]
    except Interrupted as e:
        r = e.result
        click.echo("", err=True)
        if r.interrupted_trial is not None:
            click.echo(
                f"Interrupted: trial {r.interrupted_trial} is queued and resumes from epoch "
                f"{r.resumes_from_epoch} on the next run.",
                err=True,
            )
        else:
            click.echo("Interrupted.", err=True)
        sys.exit(130)
    if progress.tty and not quiet:
        click.echo("", err=True)
    finalize(handle, dev, data)
    _print_summary(summarize(handle.study), time.monotonic() - start)
    if not quiet and result.stopped:
        click.echo(f"Stopped: {result.stopped}.", err=True)


@cli.command()
@storage_option
def studies(storage: str | None) -> None:
    """List the studies in a storage.

    \b
    Example:
      hpo studies --storage sqlite:///hpo.db
    """
    import optuna

    store, url = _open(storage, create=False)
    summaries = optuna.get_all_study_summaries(store, include_best_trial=True)
    if not summaries:
        click.echo("No studies.")
        return
    rows = [["study", "trials", "direction", "best", "created"]]
    for s in summaries:
        best = _fmt(s.best_trial.value) if s.best_trial is not None else "-"
        created = s.datetime_start.strftime("%Y-%m-%d %H:%M") if s.datetime_start else "-"
        rows.append([s.study_name, str(s.n_trials), s.direction.name.lower(), best, created])
    _table(rows)


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _load(name: str, storage: str | None) -> Any:
    import optuna

    from hpo.errors import StorageError
    from hpo.storage import mask

    store, url = _open(storage, create=False)
    try:
        return optuna.load_study(study_name=name, storage=store)
    except KeyError:
        names = [s.study_name for s in store.get_all_studies()]
        hint = f"; studies there: {', '.join(names[:10])}" if names else "; it holds no studies"
        raise StorageError(f"no study named {name!r} in {mask(url)}{hint}") from None


@cli.command()
@click.argument("study")
@storage_option
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
def best(study: str, storage: str | None, fmt: str) -> None:
    """Show the best trial, its test score and where its model is saved.

    \b
    Example:
      hpo best quickstart
    """
    from hpo.study import summarize

    s = summarize(_load(study, storage))
    if fmt == "json":
        click.echo(json.dumps({
            "study": s.name, "metric": s.metric, "direction": s.direction,
            "best_trial": s.best_number, "best_value": s.best_value,
            "params": s.best_params, "test": s.test, "counts": s.counts,
        }, indent=2))
        return
    _print_summary(s)


@cli.command()
@click.argument("study")
@storage_option
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
def trials(study: str, storage: str | None, fmt: str) -> None:
    """List a study's trials: state, value, epochs, parameters.

    \b
    Example:
      hpo trials quickstart --format csv > trials.csv
    """
    loaded = _load(study, storage)
    ts = loaded.get_trials(deepcopy=False)
    param_names = sorted({k for t in ts for k in t.params})
    records = []
    for t in ts:
        duration = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        records.append({
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            "epochs": len(t.intermediate_values),
            "seconds": round(duration, 2) if duration is not None else None,
            "reason": t.user_attrs.get("reason", ""),
            **{f"params_{k}": t.params.get(k) for k in param_names},
        })
    if fmt == "json":
        click.echo(json.dumps(records, indent=2, default=str))
    elif fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(records[0]) if records else ["number"])
        writer.writeheader()
        writer.writerows(records)
        click.echo(buf.getvalue(), nl=False)
    else:
        if not records:
            click.echo("No trials.")
            return
        head = ["#", "state", "value", "epochs", "seconds", *param_names]
        rows = [head] + [
            [str(r["number"]), r["state"], _fmt(r["value"]) if r["value"] is not None else "-",
             str(r["epochs"]), _fmt(r["seconds"]) if r["seconds"] is not None else "-",
             *[_fmt(r[f"params_{k}"]) if r[f"params_{k}"] is not None else "-" for k in param_names]]
            for r in records
        ]
        _table(rows)


@cli.command()
@click.argument("study")
@storage_option
@click.option("--yes", is_flag=True, help="Really delete; required.")
def delete(study: str, storage: str | None, yes: bool) -> None:
    """Delete a study, its trials and its saved models and checkpoints.

    \b
    Example:
      hpo delete quickstart --yes
    """
    from hpo.study import delete_study

    loaded = _load(study, storage)
    if not yes:
        raise click.UsageError(f"this deletes study {study!r} and all its trials; add --yes to confirm")
    removed = delete_study(loaded)
    click.echo(f"Deleted study {study!r} ({removed} artifact files removed).")
