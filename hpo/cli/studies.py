"""`hpo` commands that read, serve or remove stored studies (registered on hpo.cli.run's group)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import warnings
from collections.abc import Iterator
from typing import Any

import click

from hpo.cli.base import (
    artifacts_option,
    cli,
    open_store,
    sigterm_as_interrupt,
    storage_option,
)
from hpo.errors import HpoError


@cli.command()
@storage_option
def studies(storage: str | None) -> None:
    """List the studies in a storage.

    \b
    Example:
      hpo studies --storage sqlite:///hpo.db
    """
    from hpo.storage.tables import read_only, reads_sql
    from hpo.storage.urls import resolve_url
    from hpo.ui.text import fmt

    url = resolve_url(storage)
    if reads_sql(url):  # the database answers: no study is loaded (hpo.search.reading)
        from hpo.search.reading import study_rows as rows_of

        with read_only(url) as conn:
            listed = rows_of(conn)
    else:
        from hpo.search.summary import study_rows

        listed = study_rows(open_store(storage, create=False)[0])
    if not listed:
        click.echo("No studies.")
        return
    rows = [["study", "trials", "direction", "best", "created"]]
    for r in listed:
        if r.problem is not None:  # the others are listed all the same
            rows.append([r.name, "-", "-", "-", f"cannot be read: {r.problem}"])
            continue
        created = r.created.strftime("%Y-%m-%d %H:%M") if r.created else "-"
        rows.append([r.name, str(r.trials), ", ".join(r.directions), fmt(r.best), created])
    _table(rows)


def _table(rows: list[list[str]]) -> None:
    from hpo.ui.text import table_lines

    for line in table_lines(rows):
        click.echo(line)


def _load(name: str, storage: str | None, check: bool = True) -> Any:
    """The study named `name`; one line when there is none, or (`check`) its attributes cannot be read."""
    import optuna

    from hpo._private import study_id, study_names
    from hpo.errors import StorageError
    from hpo.search.study import readable_attrs
    from hpo.storage.urls import mask

    store, url = open_store(storage, create=False)
    try:
        study = optuna.load_study(study_name=name, storage=store)
    except KeyError:
        names = [n for _, n in study_names(store)] or [s.study_name for s in store.get_all_studies()]
        hint = f"; studies there: {', '.join(names[:10])}" if names else "; it holds no studies"
        raise StorageError(f"no study named {name!r} in {mask(url)}{hint}") from None
    if check:
        readable_attrs(store, study_id(study), name)
    return study


@cli.command()
@click.argument("study")
@storage_option
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
def best(study: str, storage: str | None, fmt: str) -> None:
    """Show the best trial, its test score and where its model is saved; with several objectives,
    the Pareto front as a table, each trial's test score beside it.

    \b
    Example:
      hpo best quickstart
    """
    from hpo.storage.tables import read_only, reads_sql
    from hpo.storage.urls import resolve_url

    url = resolve_url(storage)
    if reads_sql(url):  # the counts, the best row and the test record, asked of the database
        from hpo.search import reading
        from hpo.search.saved import model_problem

        with read_only(url) as conn:
            sid = reading.study_id(conn, study, url)
            if reading.simple(conn, sid, study):
                s = reading.summary(conn, sid, study)
                _show_best(s, fmt)  # what is known is shown; a saved model that cannot be read back is the error
                number = s.best_number
                own = reading.trial_model(conn, sid, number) if number is not None else None
                if (problem := model_problem(study, s.test, own)) is not None:
                    raise HpoError(problem)
                return
    from hpo.search.saved import best_model_problem
    from hpo.search.summary import summarize

    loaded = _load(study, storage)
    s = summarize(loaded)
    _show_best(s, fmt)
    if (problem := best_model_problem(loaded, s.test)) is not None:
        raise HpoError(problem)


def _show_best(s: Any, fmt: str) -> None:
    from hpo.ui.text import render_summary

    if fmt == "json" and s.multi_objective:
        click.echo(json.dumps({
            "study": s.name, "objectives": [{"name": n, "direction": d} for n, d in s.objectives],
            "front": [{"trial": t.number, "values": t.values, "measured": t.measured, "params": t.params,
                       "test": t.test} for t in s.front],
            "counts": s.counts,
        }, indent=2))
        return
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
@click.argument("values", nargs=-1, required=True, metavar="NAME=VALUE...")
@storage_option
@click.option("--past-budget", is_flag=True,
              help="Queue it even though the study's budget is spent: it then runs as one trial more.")
def enqueue(study: str, values: tuple[str, ...], storage: str | None, past_budget: bool) -> None:
    """Queue a known configuration to run before any new trial (counted in the budget, once).

    Parameters left out are sampled as usual; each value is checked against the study's space,
    and a parameter must apply to the configuration (its `when:`).

    \b
    Example:
      hpo enqueue quickstart lr=0.01 batch_size=32 optimizer=adam
    """
    from hpo.search.records import stored_spec
    from hpo.search.study import enqueue as queue
    from hpo.spec.loading import parse_yaml, spec_from_mapping
    from hpo.spec.validate import Validator

    loaded = _load(study, storage)
    spec = spec_from_mapping(stored_spec(loaded.user_attrs, study), f"study {study!r}")
    config: dict[str, Any] = {}
    for item in values:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise click.UsageError(f"{item!r}: expected NAME=VALUE, e.g. lr=0.01")
        config[name] = parse_yaml(text, f"hpo enqueue: {name}") if text else ""
    params = Validator(f"hpo enqueue {study}").configuration(config, "enqueue", spec.space)
    shown = ", ".join(f"{k}={v}" for k, v in params.items())
    from hpo.search.budget import budget_status
    from hpo.search.samplers import effective_n_trials

    status = budget_status(loaded, effective_n_trials(spec))
    if status.remaining <= 0 and not past_budget:
        raise HpoError(f"study {study!r} has spent its budget of {status.total} trials ({status.finished} finished, "
                       f"{status.running} running, {status.waiting} queued): raise it (hpo run SPEC --n-trials "
                       f"{status.total + 1}) and queue again, or queue this one past the budget with --past-budget")
    number = queue(loaded, [params])[0]
    if number is None:
        click.echo(f"Already queued or run in study {study!r}: {shown}; not queued again.")
    else:
        click.echo(f"Queued trial {number} in study {study!r}: {shown}. It runs before any new trial, in the "
                   "next `hpo run` or `hpo worker` on this study.")


@cli.command()
@click.argument("study")
@storage_option
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, metavar="N", help="At most N trials.")
@click.option("--state", type=click.Choice(["complete", "pruned", "fail", "resumed", "running", "waiting"],
                                           case_sensitive=False), default=None, help="Only the trials in this state.")
@click.option("--sort", type=click.Choice(["number", "value"]), default="number", show_default=True,
              help="value: the best first (with --limit, the best N).")
def trials(study: str, storage: str | None, fmt: str, limit: int | None, state: str | None, sort: str) -> None:
    """List a study's trials: state, value, epochs, parameters. A trial stopped under it (Ctrl-C,
    hpo stop, a dead worker, a full disk) whose retry resumes it reads RESUMED, not FAIL. The
    database is asked for the page shown, so a study of 100,000 trials lists as fast as a small one
    (with --limit, a column for each parameter the trials shown have); the CSV of every trial streams.

    \b
    Example:
      hpo trials quickstart --format csv > trials.csv
      hpo trials quickstart --sort value --limit 10
    """
    from hpo.storage.tables import read_only, reads_sql
    from hpo.storage.urls import resolve_url

    url = resolve_url(storage)
    if reads_sql(url):
        from hpo import _private
        from hpo.search import reading

        with read_only(url) as conn:
            sid = reading.study_id(conn, study, url)
            if reading.simple(conn, sid, study):
                maximize = _private.sql_directions(conn, sid)[0] == "maximize"
                names, records = reading.trial_records(conn, sid, limit=limit, state=state, sort=sort,
                                                       maximize=maximize)
                _print_trials(records, names, fmt, constrained=False, several=False)
                return
    _optuna_trials(study, storage, fmt, limit, state, sort)


def _optuna_trials(study: str, storage: str | None, fmt: str, limit: int | None, state: str | None,
                   sort: str) -> None:
    """`hpo trials` from the Optuna study: several objectives, constraints, a journal or a proxy."""
    import optuna

    from hpo.search.budget import resumed_numbers
    from hpo.search.reading import shown_names

    loaded = _load(study, storage)
    ts = loaded.get_trials(deepcopy=False)
    constrained = any(t.constraints for t in ts)  # a column only for studies with constraints
    resumed = resumed_numbers(ts)  # stopped under it and resumed by a retry: not a failure
    if sort == "value" and len(loaded.directions) == 1:
        maximize = loaded.direction == optuna.study.StudyDirection.MAXIMIZE
        ts = sorted(ts, key=lambda t: (t.value is None, -(t.value or 0.0) if maximize else (t.value or 0.0), t.number))
    kept = []
    for t in ts:
        shown = "RESUMED" if t.state.name == "FAIL" and t.number in resumed else t.state.name
        if state is None or shown == state.upper():
            kept.append((t, shown))
        if limit is not None and len(kept) >= limit:
            break
    param_names = shown_names(t.params for t, _ in kept) if limit is not None else shown_names(t.params for t in ts)
    records = []
    for t, shown in kept:
        duration = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        records.append({
            "number": t.number,
            "state": shown,
            "value": (t.values[0] if t.values and len(t.values) == 1 else t.values),
            **({"feasible": all(c <= 0 for c in t.constraints.values()) if t.constraints else None}
               if constrained else {}),
            "epochs": len(t.intermediate_values),
            "seconds": round(duration, 2) if duration is not None else None,
            "reason": t.user_attrs.get("reason", ""),
            **{f"params_{k}": t.params.get(k) for k in param_names},
        })
    _print_trials(iter(records), param_names, fmt, constrained, several=len(loaded.directions) > 1)


def _print_trials(records: Any, param_names: list[str], fmt: str, constrained: bool, several: bool) -> None:
    """The rows as a table, CSV or JSON; CSV and JSON are written as the rows come (memory stays flat)."""
    if fmt == "json":  # as json.dumps(rows, indent=2) writes the whole list, one row at a time
        first = True
        for r in records:
            item = "  " + json.dumps(r, indent=2, default=str).replace("\n", "\n  ")
            click.echo(("[\n" if first else ",\n") + item, nl=False)
            first = False
        click.echo("[]" if first else "\n]")
    elif fmt == "csv":
        head = ["number", "state", "value", *(["feasible"] if constrained else []), "epochs", "seconds", "reason",
                *[f"params_{k}" for k in param_names]]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=head)
        writer.writeheader()
        for i, r in enumerate(records):
            writer.writerow(r)
            if i % 1000 == 999:
                click.echo(buf.getvalue(), nl=False)
                buf.seek(0)
                buf.truncate()
        click.echo(buf.getvalue(), nl=False)
    else:
        rows_in = list(records)
        if not rows_in:
            click.echo("No trials.")
            return
        from hpo.ui.text import fmt as show

        feasible = {True: "yes", False: "no", None: "-"}
        head = ["#", "state", "values" if several else "value", *(["feasible"] if constrained else []), "epochs",
                "seconds", *param_names]
        rows = [head] + [
            [str(r["number"]), r["state"],
             " ".join(map(show, r["value"])) if isinstance(r["value"], list) else show(r["value"]),
             *([feasible[r["feasible"]]] if constrained else []), str(r["epochs"]), show(r["seconds"]),
             *[show(r[f"params_{k}"]) for k in param_names]]
            for r in rows_in
        ]
        _table(rows)


@contextlib.contextmanager
def _trials(name: str, storage: str | None, artifacts: str | None) -> Iterator[Any]:
    """The study's trials, one at a time: asked of the database's tables where it has them (no
    optuna, a 100,000-trial study costs what one trial costs), else through Optuna's storage."""
    from hpo.storage.tables import read_only, reads_sql
    from hpo.storage.urls import resolve_url

    url = resolve_url(storage)
    if reads_sql(url):
        from hpo.search.reading import SqlTrials

        with read_only(url) as conn:
            source = SqlTrials(conn, name, url, artifacts)
            if source.note is not None:
                click.echo(source.note, err=True)
            yield source
        return
    from hpo.ui.trial_view import OptunaTrials

    yield OptunaTrials(_handle(name, storage, artifacts))


def _handle(name: str, storage: str | None, artifacts: str | None) -> Any:
    from hpo.search.study import open_existing

    store, url = open_store(storage, create=False)
    handle = open_existing(name, store, url, artifacts)
    for note in handle.notes:
        click.echo(note, err=True)
    return handle


@cli.command()
@click.argument("study")
@click.argument("number", metavar="TRIAL", type=click.IntRange(min=0))
@storage_option
@artifacts_option
@click.option("--lines", type=click.IntRange(min=0), default=20, show_default=True,
              help="How many of the log's last lines to show.")
def show(study: str, number: int, storage: str | None, artifacts: str | None, lines: int) -> None:
    """Show one trial whole: state, reason, parameters, each metric per epoch, attributes, the
    traceback (your frames first), its checkpoint and model files and the end of its log.

    \b
    Example:
      hpo show quickstart 12
    """
    from hpo.ui.trial_view import render

    with _trials(study, storage, artifacts) as source:
        click.echo(render(source, source.trial(number), lines))


@cli.command()
@click.argument("study")
@click.argument("number", metavar="TRIAL", type=click.IntRange(min=0))
@storage_option
@artifacts_option
@click.option("-f", "--follow", is_flag=True, help="Keep printing while the trial runs.")
def logs(study: str, number: int, storage: str | None, artifacts: str | None, follow: bool) -> None:
    """Print what a trial's code wrote to stdout and stderr (and how it ended).

    Logs are kept in the study's artifact folder: for trials that ran on other machines, pass the
    shared folder with --artifacts.

    \b
    Example:
      hpo logs quickstart 12
      hpo logs mystudy 40 --follow --storage postgresql://user@db/hpo
    """
    from hpo.ui import trial_view

    with _trials(study, storage, artifacts) as source:
        if follow:
            try:
                trial_view.follow(source, number, lambda text: click.echo(text, nl=False))
            except KeyboardInterrupt:
                pass
            return
        trial = source.trial(number)
        text = trial_view.log_of(source, trial)
    if text is None:
        state = trial.state.lower()
        click.echo(f"Trial {number} ({state}) has no log: it printed nothing"
                   f"{', or has not started' if state == 'waiting' else ''}.", err=True)
        return
    click.echo(text, nl=False)


@cli.command()
@click.argument("study")
@storage_option
@artifacts_option
@click.option("--out", "out_file", type=click.Path(dir_okay=False), required=True,
              help="The file to write (e.g. best.pt).")
@click.option("--trial", "number", type=click.IntRange(min=0), default=None,
              help="With several objectives: the Pareto front member to export.")
def export(study: str, storage: str | None, artifacts: str | None, out_file: str, number: int | None) -> None:
    """Write the best model (weights, every parameter, spec, values, test score) to one file that
    torch.load(path, weights_only=True) reads; hpo.load_best(path) rebuilds the model from it.

    \b
    Example:
      hpo export quickstart --out best.pt
    """
    import os
    import tempfile
    from pathlib import Path

    import torch

    from hpo.search.export import exported
    from hpo.ui.text import fmt

    data = exported(_handle(study, storage, artifacts), number)
    out = Path(out_file).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    os.close(fd)
    torch.save(data, tmp)
    os.replace(tmp, out)  # never half a file under the name asked for
    values = ", ".join(f"{k} {fmt(v)}" for k, v in data["values"].items())
    test = "".join(f", test {k} {fmt(v)}" for k, v in (data["test"] or {}).items() if not k.endswith("loss"))
    what = "model" if "model" in data else "final state"
    click.echo(f"Wrote {out}: the {what} of trial {data['trial']} ({values}{test}). "
               f"Load it with hpo.load_best({str(out)!r}) or torch.load(path, weights_only=True).")


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
    from hpo.search.results import delete_study

    loaded = _load(study, storage, check=False)  # a study that cannot be read can still be deleted
    if not yes:
        raise click.UsageError(f"this deletes study {study!r} and all its trials; add --yes to confirm")
    removed = delete_study(loaded)
    click.echo(f"Deleted study {study!r} ({removed} artifact files removed).")


@cli.command()
@click.argument("study")
@storage_option
def stop(study: str, storage: str | None) -> None:
    """Stop every worker of a study, wherever it runs: each stops at its next report, queues its
    trial to resume from its checkpoint and exits. The next `hpo run` or `hpo worker` resumes.

    \b
    Example:
      hpo stop quickstart --storage postgresql://user@db/hpo
    """
    from hpo.search.slots import request_stop

    store, url = open_store(storage, create=False)
    running = request_stop(store, study, url)
    click.echo(f"Asked every worker of study {study!r} to stop ({running} trial{'s' if running != 1 else ''} running); "
               "each queues its trial at its next report. Resume with hpo run or hpo worker.")


@cli.command()
@click.argument("study")
@click.argument("numbers", metavar="[TRIAL]...", nargs=-1, type=click.IntRange(min=0))
@storage_option
def retry(study: str, numbers: tuple[int, ...], storage: str | None) -> None:
    """Queue the study's failed trials again, with their parameters, after fixing their cause.

    Failed trials do not count against the budget; the next `hpo run` or `hpo worker` runs the
    queued ones first. Given trial numbers, only those: a completed one runs again (its parameters
    and seed) when the model it saved cannot be read back, and its new model is written over it.

    \b
    Example:
      hpo retry quickstart
      hpo retry quickstart 12
    """
    from hpo.search.study import rerun_completed, retry_failed

    if numbers:
        loaded = _load(study, storage)
        for number in numbers:
            new = rerun_completed(loaded, number)
            click.echo(f"Queued trial {number} again as #{new} (its parameters and seed); run it with: hpo run SPEC, "
                       f"or hpo worker {study}")
        return
    queued = retry_failed(_load(study, storage))
    if not queued:
        click.echo(f"Study {study!r} has no failed trial to retry.")
        return
    pairs = ", ".join(f"#{old} as #{new}" for old, new in queued[:10]) + (" ..." if len(queued) > 10 else "")
    click.echo(f"Queued {len(queued)} failed trial{'s' if len(queued) > 1 else ''} again ({pairs}); "
               f"run them with: hpo run SPEC, or hpo worker {study}")


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

    from hpo import _private
    from hpo.search.proxy import BudgetedStorage
    from hpo.storage.urls import mask

    threads = 10  # Optuna's default for the proxy's thread pool, given explicitly: one connection each
    store, url = open_store(storage, create=True, connections=threads)
    click.echo(f"Serving {mask(url)} on grpc://{host}:{port} (Ctrl-C to stop)", err=True)
    sigterm_as_interrupt()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # Optuna's in-process cache, as a worker has it: each worker's read of the study then costs the
            # proxy the trials that changed, not the whole study (which made it the bottleneck at ~1
            # trial a second with 8 workers on 300 trials).
            cached = optuna.storages.get_storage(store)
            from concurrent.futures import ThreadPoolExecutor

            server = _private.grpc_proxy_server(BudgetedStorage(cached), host, port,  # type: ignore[arg-type]
                                                ThreadPoolExecutor(max_workers=threads))
    except ImportError as e:
        raise HpoError(f"hpo proxy needs grpcio and protobuf ({e.name} is missing): pip install 'hpo[grpc]'") from None
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        # Refuse new requests and let those running end (a trial's write is never cut in half).
        server.stop(grace=5).wait()
        click.echo("Proxy stopped.", err=True)


@cli.command()
@storage_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on; 0.0.0.0 exposes the dashboard to the network.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@artifacts_option
def dashboard(storage: str | None, host: str, port: int, artifacts: str | None) -> None:
    """Serve optuna-dashboard over the storage: live trials, learning curves, artifacts; and at
    /hpo/ hpo's study summaries, which open at any size.

    \b
    Example:
      hpo dashboard                                   # sqlite:///hpo.db on http://127.0.0.1:8080
      hpo dashboard --storage postgresql://user@db/hpo --port 8081
    """
    from hpo.storage.backends import open_storage
    from hpo.storage.urls import mask, resolve_url
    from hpo.ui.dashboard import artifact_folder, make_server_for

    url = resolve_url(storage)
    store = open_storage(url, create=False, heartbeat=None)
    folder = artifact_folder(store, url, artifacts)
    server = make_server_for(store, url, folder, host, port)
    click.echo(f"Dashboard for {mask(url)} on http://{host}:{server.server_port} (Ctrl-C to stop); summaries that "
               f"open at any size on http://{host}:{server.server_port}/hpo/", err=True)
    sigterm_as_interrupt()
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

    from hpo.ui.report import write_report

    try:
        written = write_report(_load(study, storage), Path(out_dir))
    except OSError as e:
        raise HpoError(f"cannot write the report to {out_dir}: {e.strerror}") from None
    for path in written:
        click.echo(str(path))
