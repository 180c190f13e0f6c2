"""The `hpo` command line: parse arguments, call the library, print results.

This is the only module that knows about click, and the only place where the project's errors
become one-line messages with a non-zero exit.
"""

from __future__ import annotations

import csv
import io
import json
import signal
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import click

from hpo.errors import HpoError

F = TypeVar("F", bound=Callable[..., Any])

STORAGE_HELP = "Storage URL [env HPO_STORAGE; default sqlite:///hpo.db]."


class _Group(click.Group):
    """Every error a user can cause ends as one line, `Error: ...`, and a non-zero exit."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HpoError as e:
            raise click.ClickException(str(e)) from None
        except Exception as e:
            if not _is_storage_failure(e):
                raise  # a bug in hpo: keep the traceback
            from hpo.storage import reason

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


def _is_storage_failure(e: BaseException) -> bool:
    """The database refused a write or a query (read-only file, lost server past the retries)."""
    try:
        from optuna.exceptions import StorageInternalError
        from sqlalchemy.exc import SQLAlchemyError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(e, (SQLAlchemyError, StorageInternalError))


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


def _open(url: str | None, *, create: bool, heartbeat: Any = None) -> tuple[Any, str]:
    from hpo.storage import Heartbeat, open_storage, resolve_url

    resolved = resolve_url(url)
    return open_storage(resolved, create=create, heartbeat=heartbeat or Heartbeat()), resolved


def _sigterm_as_interrupt() -> None:
    """SIGTERM (docker stop, Slurm, Kubernetes) ends a worker exactly like Ctrl-C.

    SIGINT gets Python's handler back too: a process started in the background by a shell
    script inherits SIGINT as *ignored*, and would otherwise shrug off Ctrl-C and `kill -INT`.
    """

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)


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


def fuse_option(f: F) -> F:
    return click.option(
        "--fuse", type=click.IntRange(min=2, max=1024), default=None, metavar="K",
        help="Train K trials at once as one batched model (overrides execution in the spec).",
    )(f)


def checkpoint_option(f: F) -> F:
    return click.option(
        "--checkpoint-interval", type=click.FloatRange(min=0), default=2.0, show_default=True,
        envvar="HPO_CHECKPOINT_INTERVAL", metavar="S",
        help="Checkpoint a trial at the end of an epoch once S seconds passed since the last (0: every epoch).",
    )(f)


def heartbeat_options(f: F) -> F:
    f = click.option("--grace-period", type=click.IntRange(min=1), default=None, metavar="S",
                     help="Seconds without a heartbeat before a trial counts as dead [default 30].")(f)
    f = click.option("--heartbeat-interval", type=click.IntRange(min=1), default=None, metavar="S",
                     help="Seconds between a running trial's heartbeats [default 10].")(f)
    return f


def _heartbeat(interval: int | None, grace: int | None) -> Any:
    from hpo.storage import Heartbeat

    base = Heartbeat()
    interval = interval or base.interval
    return Heartbeat(interval=interval, grace=grace or max(base.grace, 3 * interval))


@cli.command()
@click.argument("spec_file", metavar="SPEC", type=click.Path(dir_okay=True))
@storage_option
@click.option("--n-trials", type=click.IntRange(min=1), default=None,
              help="The study's total number of trials (overrides budget.n_trials).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop starting trials after this many seconds (overrides budget.timeout).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Local worker processes (needs a server storage when > 1) [default 1, or one per --gpus].")
@click.option("--gpus", default=None, metavar="0,1,...",
              help="One worker per listed GPU, each pinned with CUDA_VISIBLE_DEVICES.")
@fuse_option
@artifacts_option
@heartbeat_options
@checkpoint_option
@click.option("-q", "--quiet", is_flag=True, help="No progress lines, only the summary.")
def run(
    spec_file: str,
    storage: str | None,
    n_trials: int | None,
    timeout: float | None,
    device: str,
    workers: int | None,
    gpus: str | None,
    fuse: int | None,
    artifacts: str | None,
    heartbeat_interval: int | None,
    grace_period: int | None,
    checkpoint_interval: float,
    quiet: bool,
) -> None:
    """Run (or resume) the study described in SPEC.

    The study's total is budget.n_trials: running the same file again resumes and runs only
    the missing trials. Ctrl-C stops cleanly; the trial in flight resumes on the next run.

    \b
    Example:
      hpo run studies/quickstart.yaml
      hpo run studies/digits_mlp.yaml --storage postgresql://user@db/hpo --workers 2
      hpo run studies/fashion_mnist_cnn.yaml --storage postgresql://user@db/hpo --gpus 0,1
    """
    from hpo.data import DataCache
    from hpo.spec import load_spec
    from hpo.storage import resolve_url
    from hpo.study import choose_device, open_for_spec
    from hpo.workers import check_parallel_storage, parse_gpus

    spec = load_spec(spec_file)
    if n_trials is not None:
        spec = spec.with_budget(n_trials=n_trials)
    if fuse is not None:
        spec = spec.fused(fuse)
    gpu_ids = parse_gpus(gpus) if gpus is not None else None
    n_workers = workers or (len(gpu_ids) if gpu_ids else 1)
    check_parallel_storage(resolve_url(storage), n_workers)
    dev = choose_device("cuda" if gpu_ids else device)
    data = DataCache(spec.data, spec.seed, dev, spec.model)  # data errors come before storage
    hb = _heartbeat(heartbeat_interval, grace_period)
    store, url = _open(storage, create=True, heartbeat=hb)
    handle = open_for_spec(spec, store, url, artifacts)
    if n_workers == 1 and not gpu_ids:
        _work(handle, dev, data, timeout=timeout, n_trials=None, quiet=quiet, storage_url=url,
              checkpoint_interval=checkpoint_interval)
    else:
        _work_in_processes(handle, url, n_workers, gpu_ids, device, timeout, hb, quiet, checkpoint_interval)


def _work(handle: Any, dev: Any, data: Any, *, timeout: float | None, n_trials: int | None,
          quiet: bool, storage_url: str, summary: bool = True, checkpoint_interval: float = 2.0) -> None:
    """Run trials in this process, then score the best model and print the summary."""
    from hpo.progress import Progress, render_summary
    from hpo.samplers import effective_n_trials
    from hpo.storage import mask
    from hpo.study import Interrupted, finalize, run_worker, summarize

    spec = handle.spec
    progress = Progress(effective_n_trials(spec), spec.metric, spec.budget.epochs, quiet)
    fused = f", fused in groups of {spec.execution.group_size}" if spec.execution.mode == "fused" else ""
    progress.say(f"Study {spec.name}: {progress.total} trials x {spec.budget.epochs} epochs on {dev}{fused}, "
                 f"storage {mask(storage_url)}")
    _sigterm_as_interrupt()
    start = time.monotonic()
    try:
        if spec.execution.mode == "fused":
            from hpo.fused_study import run_fused_worker

            result = run_fused_worker(handle, device=dev, group_size=spec.execution.group_size,
                                      n_trials=n_trials, timeout=timeout, listener=progress, data=data,
                                      checkpoint_interval=checkpoint_interval)
        else:
            result = run_worker(handle, device=dev, n_trials=n_trials, timeout=timeout,
                                listener=progress, data=data, checkpoint_interval=checkpoint_interval)
    except Interrupted as e:
        progress.close()
        r = e.result
        if r.interrupted_trial is not None:
            click.echo(f"Interrupted: trial {r.interrupted_trial} is queued and resumes from epoch "
                       f"{r.resumes_from_epoch} on the next run.", err=True)
        else:
            click.echo("Interrupted.", err=True)
        sys.exit(130)
    progress.close()
    finalize(handle, dev, data)
    if summary:
        click.echo(render_summary(summarize(handle.study), time.monotonic() - start))
    progress.say(f"Stopped: {result.stopped}.")


def _work_in_processes(handle: Any, url: str, n_workers: int, gpu_ids: list[int] | None,
                       device: str, timeout: float | None, hb: Any, quiet: bool,
                       checkpoint_interval: float) -> None:
    """Start local `hpo worker` processes, show their progress from the storage, then summarize."""
    from hpo.progress import Progress, render_summary
    from hpo.samplers import effective_n_trials
    from hpo.storage import mask
    from hpo.study import finalize, summarize
    from hpo.workers import launch, plan, supervise

    spec, study = handle.spec, handle.study
    plans = plan(n_workers, gpu_ids, device)
    progress = Progress(effective_n_trials(spec), spec.metric, spec.budget.epochs, quiet)
    where = f"GPUs {','.join(map(str, gpu_ids))}" if gpu_ids else f"{plans[0].device}, {plans[0].threads} threads each"
    progress.say(f"Study {spec.name}: {progress.total} trials x {spec.budget.epochs} epochs, "
                 f"{n_workers} workers ({where}), storage {mask(url)}")
    extra = ["--heartbeat-interval", str(hb.interval), "--grace-period", str(hb.grace),
             "--checkpoint-interval", str(checkpoint_interval)]
    if spec.execution.mode == "fused":
        extra += ["--fuse", str(spec.execution.group_size)]
    if timeout is not None:
        extra += ["--timeout", str(timeout)]
    seen: set[int] = set()

    def tick() -> None:
        for t in study.get_trials(deepcopy=False):
            if t.state.is_finished() and t.number not in seen:
                seen.add(t.number)
                progress.trial_finished(study, t)

    _sigterm_as_interrupt()
    start = time.monotonic()
    procs = launch(spec.name, url, str(handle.artifacts.path.resolve()), plans, extra)
    try:
        codes = supervise(procs, tick)
    except KeyboardInterrupt:
        progress.close()
        click.echo("Interrupted: every worker queued its trial; the next run resumes them.", err=True)
        sys.exit(130)
    progress.close()
    from hpo.study import choose_device

    finalize(handle, choose_device("cuda" if gpu_ids else device))
    click.echo(render_summary(summarize(study), time.monotonic() - start))
    if any(codes):
        raise HpoError(f"{sum(1 for c in codes if c)} of {n_workers} workers exited with an error "
                       f"(exit codes {codes})")


@cli.command()
@click.argument("spec_file", metavar="SPEC", type=click.Path(dir_okay=True))
@storage_option
@artifacts_option
@click.option("--n-trials", type=click.IntRange(min=1), default=None,
              help="The study's total number of trials (overrides budget.n_trials).")
def create(spec_file: str, storage: str | None, artifacts: str | None, n_trials: int | None) -> None:
    """Create (or update the budget of) the study in SPEC without running a trial.

    For clusters: create the study once, then start any number of `hpo worker` processes.

    \b
    Example:
      hpo create studies/digits_mlp.yaml --storage postgresql://user@db/hpo
    """
    from hpo.spec import load_spec
    from hpo.storage import mask
    from hpo.study import open_for_spec

    spec = load_spec(spec_file)
    if n_trials is not None:
        spec = spec.with_budget(n_trials=n_trials)
    store, url = _open(storage, create=True)
    open_for_spec(spec, store, url, artifacts)
    click.echo(f"Study {spec.name} is ready in {mask(url)} ({spec.budget.n_trials} trials); "
               f"start workers with: hpo worker {spec.name}")


@cli.command()
@click.argument("study")
@storage_option
@click.option("--n-trials", type=click.IntRange(min=1), default=None,
              help="Run at most this many trials here (the study's total still applies).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop starting trials after this many seconds.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for this worker.")
@fuse_option
@artifacts_option
@heartbeat_options
@checkpoint_option
@click.option("-q", "--quiet", is_flag=True, help="No progress lines and no summary.")
def worker(
    study: str,
    storage: str | None,
    n_trials: int | None,
    timeout: float | None,
    device: str,
    threads: int | None,
    fuse: int | None,
    artifacts: str | None,
    heartbeat_interval: int | None,
    grace_period: int | None,
    checkpoint_interval: float,
    quiet: bool,
) -> None:
    """Join an existing study as one more worker, from the spec stored in the study.

    A worker needs only the study name and the storage: no spec file. It stops when the
    study's total budget is reached, counted across all workers.

    \b
    Example:
      HPO_STORAGE=postgresql://user@db/hpo hpo worker digits_mlp
      hpo worker digits_mlp --storage postgresql://user@db/hpo --n-trials 10 --device cuda:1
    """
    from hpo.data import DataCache
    from hpo.study import choose_device, open_existing

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    dev = choose_device(device)
    store, url = _open(storage, create=False, heartbeat=_heartbeat(heartbeat_interval, grace_period))
    handle = open_existing(study, store, url, artifacts)
    if fuse is not None:
        handle.spec = handle.spec.fused(fuse)
    data = DataCache(handle.spec.data, handle.spec.seed, dev, handle.spec.model)
    _work(handle, dev, data, timeout=timeout, n_trials=n_trials, quiet=quiet, storage_url=url,
          summary=not quiet, checkpoint_interval=checkpoint_interval)


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
    from hpo.progress import fmt

    rows = [["study", "trials", "direction", "best", "created"]]
    for s in summaries:
        best = fmt(s.best_trial.value) if s.best_trial is not None else "-"
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
    from hpo.progress import render_summary
    from hpo.study import summarize

    s = summarize(_load(study, storage))
    if fmt == "json":
        click.echo(json.dumps({
            "study": s.name, "metric": s.metric, "direction": s.direction,
            "best_trial": s.best_number, "best_value": s.best_value,
            "params": s.best_params, "test": s.test, "counts": s.counts,
        }, indent=2))
        return
    click.echo(render_summary(s))


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
        from hpo.progress import fmt

        head = ["#", "state", "value", "epochs", "seconds", *param_names]
        rows = [head] + [
            [str(r["number"]), r["state"], fmt(r["value"]), str(r["epochs"]), fmt(r["seconds"]),
             *[fmt(r[f"params_{k}"]) for k in param_names]]
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


@cli.command()
@storage_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=13000, show_default=True)
def proxy(storage: str | None, host: str, port: int) -> None:
    """Serve a storage to many workers through Optuna's gRPC storage proxy.

    Hundreds of workers then share one database connection pool; they connect with
    --storage grpc://HOST:PORT.

    \b
    Example:
      hpo proxy --storage postgresql://user@db/hpo --host 0.0.0.0 --port 13000
      hpo worker digits_mlp --storage grpc://proxy-host:13000
    """
    import optuna

    from hpo.storage import mask

    store, url = _open(storage, create=True)
    click.echo(f"Serving {mask(url)} on grpc://{host}:{port} (Ctrl-C to stop)", err=True)
    _sigterm_as_interrupt()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.run_grpc_proxy_server(store, host=host, port=port)
    except ImportError as e:
        raise HpoError(f"hpo proxy needs grpcio and protobuf ({e.name} is missing): pip install 'hpo[grpc]'") from None
    except KeyboardInterrupt:
        click.echo("Proxy stopped.", err=True)


@cli.command()
@storage_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on; 0.0.0.0 exposes the dashboard to the network.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@artifacts_option
def dashboard(storage: str | None, host: str, port: int, artifacts: str | None) -> None:
    """Serve optuna-dashboard over the storage: live trials, learning curves, artifacts.

    \b
    Example:
      hpo dashboard                                   # sqlite:///hpo.db on http://127.0.0.1:8080
      hpo dashboard --storage postgresql://user@db/hpo --port 8081
    """
    from hpo.dashboard import artifact_folder, make_server_for
    from hpo.storage import mask, open_storage, resolve_url

    url = resolve_url(storage)
    store = open_storage(url, create=False, heartbeat=None)
    folder = artifact_folder(store, url, artifacts)
    server = make_server_for(store, folder, host, port)
    click.echo(f"Dashboard for {mask(url)} on http://{host}:{server.server_port} (Ctrl-C to stop)", err=True)
    _sigterm_as_interrupt()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        click.echo("Dashboard stopped.", err=True)
    finally:
        server.server_close()


@cli.command()
@click.argument("study")
@storage_option
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Folder for the PNG plots and summary.md (created if missing).")
def report(study: str, storage: str | None, out_dir: str) -> None:
    """Write PNG plots and a Markdown summary of a study, for reading without a browser.

    \b
    Example:
      hpo report quickstart --out reports/quickstart
    """
    from pathlib import Path

    from hpo.report import write_report

    try:
        written = write_report(_load(study, storage), Path(out_dir))
    except OSError as e:
        raise HpoError(f"cannot write the report to {out_dir}: {e.strerror}") from None
    for path in written:
        click.echo(str(path))
