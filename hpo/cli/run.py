"""`hpo validate`, `run`, `create` and `worker`: parse arguments, call the library, print results.

This module, hpo/cli/studies.py and hpo/cli/base.py are the only ones that know about click, and
the only place where the project's errors become one-line messages with a non-zero exit.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import Any

import click

from hpo.cli.base import (
    F,
    artifacts_option,
    open_store,
    storage_option,
)
from hpo.cli.base import cli as cli
from hpo.errors import HpoError

# ---- commands -------------------------------------------------------------------------------


@cli.command()
@click.argument("spec_file", metavar="SPEC", type=click.Path(dir_okay=True))
def validate(spec_file: str) -> None:
    """Check a study file without running it.

    \b
    Example:
      hpo validate studies/digits_mlp.yaml
    """
    from hpo.spec.loading import load_spec
    from hpo.spec.user_code import load_references

    spec = load_spec(spec_file)
    load_references(spec)
    tuned = [p.name for p in spec.space if p.tuned]
    what = (f"train function {spec.train}" if spec.train is not None
            else f"{spec.builtin_data.dataset} data, {spec.model} model")
    goals = ""
    if not spec.plain:
        goals = f"objectives {', '.join(f'{o.name} ({o.direction[:3]})' for o in spec.goals)}"
        goals += f" pruned on {spec.metric}" if spec.multi_objective else ""
        goals += f", {len(spec.constraints)} constraint{'s' if len(spec.constraints) > 1 else ''}, " \
            if spec.constraints else ", "
    queued = (f", {len(spec.enqueue)} configuration{'s' if len(spec.enqueue) > 1 else ''} queued first"
              if spec.enqueue else "")
    click.echo(
        f"{spec_file}: ok - study {spec.name!r}, {what}, {goals}"
        f"{len(tuned)} tuned parameters ({', '.join(tuned)}), {spec.budget.describe()}, "
        f"{spec.sampler.name} sampler, {spec.pruner.name} pruner{queued}"
    )


@cli.command()
@click.argument("path", metavar="[FILE]", default="study.yaml", type=click.Path(dir_okay=False))
@click.option("--train", "with_train", is_flag=True,
              help="Also write train.py, a training function using hpo.Trial, and a study that runs it.")
@click.option("--example", default=None, metavar="NAME",
              help="Copy a study that ships with hpo instead (quickstart, digits_pareto, ...).")
@click.option("--force", is_flag=True, help="Overwrite files that exist.")
def init(path: str, with_train: bool, example: str | None, force: bool) -> None:
    """Write a commented starter study to FILE (default study.yaml), ready to validate and run.

    \b
    Example:
      hpo init && hpo run study.yaml
      hpo init --train              # and train.py, your own training code
      hpo init --example quickstart quickstart.yaml
    """
    from pathlib import Path

    from hpo.spec.starter import write_starter

    target = Path(path if example is None or path != "study.yaml" else f"{example.removesuffix('.yaml')}.yaml")
    written = write_starter(target, train=with_train, example=example, force=force)
    click.echo(f"Wrote {', '.join(str(p) for p in written)}. Next: hpo validate {target} && hpo run {target}")


def fuse_option(f: F) -> F:
    return click.option(
        "--fuse", type=click.IntRange(min=2, max=1024), default=None, metavar="K",
        help="Train K trials at once as one batched model (overrides execution in the spec).",
    )(f)


def procs_option(f: F) -> F:
    return click.option(
        "--procs-per-trial", type=click.IntRange(min=1), default=None, metavar="N", envvar="HPO_PROCS_PER_TRIAL",
        help="Run each trial on N processes with torch.distributed (overrides execution.processes_per_trial; "
             "env HPO_PROCS_PER_TRIAL; with --gpus, N GPUs per trial).",
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
    from hpo.storage.backends import Heartbeat

    base = Heartbeat()
    interval = interval or base.interval
    return Heartbeat(interval=interval, grace=grace or max(base.grace, 3 * interval))


@cli.command()
@click.argument("spec_file", metavar="SPEC", type=click.Path(dir_okay=True))
@storage_option
@click.option("--n-trials", type=click.IntRange(min=1), default=None,
              help="The study's total number of trials (overrides budget.n_trials).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop after this many seconds (overrides budget.time); a trial still running then is "
                   "queued and resumes from its checkpoint on the next run.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--workers", type=click.IntRange(min=1), default=None, envvar="HPO_WORKERS",
              help="Trials at once, each in its own worker process (overrides execution.workers; "
                   "env HPO_WORKERS) "
                   "[default: one per CPU core on one thread each, or one per --gpus].")
@click.option("--gpus", default=None, metavar="0,1,...",
              help="One worker per listed GPU, each pinned with CUDA_VISIBLE_DEVICES.")
@fuse_option
@procs_option
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
    procs_per_trial: int | None,
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
      hpo run studies/digits_mlp.yaml --workers 4
      hpo run studies/fashion_mnist_cnn.yaml --storage postgresql://user@db/hpo --gpus 0,1
    """
    from hpo.execution.headstart import head_start
    from hpo.execution.processes import parse_gpus
    from hpo.spec.loading import load_spec
    from hpo.storage.urls import resolve_url

    spec = load_spec(spec_file)
    if n_trials is not None:
        spec = spec.with_budget(n_trials=n_trials)
    url, gpu_ids = resolve_url(storage), parse_gpus(gpus) if gpus is not None else None
    with head_start(spec, url) as ahead:
        from hpo.execution.launch import (  # imports torch: after the head start forks
            RunOptions,
            run_study,
        )

        options = RunOptions(url, workers, gpu_ids, device, timeout, _heartbeat(heartbeat_interval, grace_period),
                             quiet, checkpoint_interval, artifacts, fuse, procs_per_trial)
        with _stops():
            handle, outcome, n_workers = run_study(spec, options, ahead)
    _end(handle, outcome, n_workers)


def _end(handle: Any, outcome: Any, n_workers: int, summary: bool = True) -> None:
    """The run's ending (hpo.execution.launch.run_ending, which hpo.run() reads too): a stop says
    what resumes where and exits 128 + its signal (0 for hpo stop); otherwise the summary, then
    one line and exit 1 when the run could not do what was asked."""
    from hpo.execution.launch import run_ending

    ending = run_ending(outcome, handle.spec.name, n_workers)
    if ending.stopped is not None:
        click.echo(ending.line, err=True)
        sys.exit(ending.code)
    if summary:
        _summary(handle, outcome.elapsed)
    if ending.error:
        raise HpoError(ending.line)


@contextlib.contextmanager
def _stops() -> Any:
    """A stop request: say what resumes where, exit 128 + the signal's number (Ctrl-C 130, SIGTERM
    143) or 0 (hpo stop)."""
    from hpo.execution.launch import Stopped
    from hpo.runtime import stopping

    try:
        with stopping.handling():
            yield
    except Stopped as e:
        click.echo(str(e), err=True)
        sys.exit(e.code)


def _summary(handle: Any, elapsed: float | None = None) -> None:
    from hpo.search.summary import summarize
    from hpo.ui.text import render_summary

    click.echo(render_summary(summarize(handle.study), elapsed))


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
    from hpo.search.study import open_for_spec
    from hpo.spec.loading import load_spec
    from hpo.storage.urls import mask

    spec = load_spec(spec_file)
    if n_trials is not None:
        spec = spec.with_budget(n_trials=n_trials)
    store, url = open_store(storage, create=True)
    for note in open_for_spec(spec, store, url, artifacts).notes:
        click.echo(note, err=True)
    click.echo(f"Study {spec.name} is ready in {mask(url)} ({spec.budget.describe()}); "
               f"start workers with: hpo worker {spec.name}")


@cli.command()
@click.argument("study")
@storage_option
@click.option("--n-trials", type=click.IntRange(min=1), default=None,
              help="Run at most this many trials here (the study's total still applies).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop after this many seconds; a trial still running then is queued to resume.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for this worker [default: its share of the CPUs it may use, divided among the hpo "
                   "workers of this host].")
@fuse_option
@procs_option
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
    procs_per_trial: int | None,
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
    from hpo.execution.processes import WorkerSettings
    from hpo.execution.share import HostSlot, device_for, wait_to_start

    if (given := WorkerSettings.take_from_environment()) is not None:  # started by `hpo run` (--gpus)
        _no_flags_beside(given)
        artifacts, device, threads, fuse, timeout = (given.artifacts, given.device, given.threads, given.fuse,
                                                     given.timeout)
        heartbeat_interval, grace_period, quiet = given.heartbeat_interval, given.grace_period, True
        checkpoint_interval, procs_per_trial = given.checkpoint_interval, given.procs_per_trial
    slot = HostSlot()  # this worker's place among the host's hpo workers: its threads, its GPU
    if not wait_to_start(slot, threads, _budget_used(storage, study), lambda line: click.echo(line, err=True)):
        click.echo(f"Stopped: study {study} used up its budget while this worker waited for a CPU.", err=True)
        return
    from hpo.execution.launch import RunOptions, join_study, run_here
    from hpo.storage.urls import resolve_url

    dev = device_for(device, slot)
    options = RunOptions(resolve_url(storage), device=device, timeout=timeout,
                         heartbeat=_heartbeat(heartbeat_interval, grace_period), quiet=quiet,
                         checkpoint_interval=checkpoint_interval, artifacts=artifacts, fuse=fuse,
                         procs_per_trial=procs_per_trial)
    with join_study(study, options, dev) as (handle, data), _stops():
        outcome = run_here(handle, dev, data, timeout=timeout, n_trials=n_trials, quiet=quiet,
                           storage_url=options.storage_url, checkpoint_interval=checkpoint_interval, slot=slot,
                           threads=threads, label_output=True)
    _end(handle, outcome, 1, summary=not quiet)


_SET_BY_THE_RUN = ("artifacts", "device", "threads", "fuse", "timeout", "heartbeat_interval", "grace_period",
                   "checkpoint_interval", "procs_per_trial")


def _no_flags_beside(settings: Any) -> None:
    """A worker `hpo run` started takes its settings from the run (the environment's
    WorkerSettings); a flag given beside them would be a second, disagreeing source: one line."""
    from hpo.execution.processes import ENV_SETTINGS

    ctx = click.get_current_context()
    for name in _SET_BY_THE_RUN:
        # (HPO_* variables it inherits from the run are the run's own settings, already in them)
        if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE:
            flag = f"--{name.replace('_', '-')}"
            raise click.UsageError(f"{flag} was given to a worker whose settings come from the run that started "
                                   f"it ({ENV_SETTINGS} says {name}={getattr(settings, name)!r}); give it to "
                                   "hpo run instead")


def _budget_used(storage: str | None, study: str) -> Callable[[], bool]:
    """Whether every trial of the study's budget is running or done, read with the storage alone
    (no torch): for a worker that waits for a CPU before it starts. A study that cannot be read
    counts as not done; the worker then starts and says why it cannot go on."""
    opened: list[Any] = []

    def used() -> bool:
        import optuna

        from hpo.search.budget import count_budget
        from hpo.search.records import SPEC_ATTR
        from hpo.search.samplers import effective_n_trials
        from hpo.spec.loading import spec_from_mapping
        from hpo.storage.backends import open_storage
        from hpo.storage.urls import resolve_url

        try:
            if not opened:
                optuna.logging.set_verbosity(optuna.logging.WARNING)
                store = open_storage(resolve_url(storage), create=False, heartbeat=None)
                opened.append(optuna.load_study(study_name=study, storage=store))
            found = opened[0]
            stored = found.user_attrs.get(SPEC_ATTR)
            if stored is None:
                return False
            total = effective_n_trials(spec_from_mapping(stored, study))
            return count_budget(found.get_trials(deepcopy=False), total).all_taken
        except Exception:
            return False

    return used
