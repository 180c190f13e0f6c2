"""The read-only commands ask the database (issue 46): on a small study the SQL path prints what
Optuna's own path prints, on SQLite and PostgreSQL; neither imports optuna; `hpo trials` gains
--limit, --state and --sort."""

from __future__ import annotations

import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import env_without_storage, invoke, small_spec


@pytest.fixture
def mixed(write_spec, runner, backend_url, tmp_path, monkeypatch) -> str:
    """A study of every state a person meets: complete, pruned, failed, resumed (a stop queued
    it and its retry ran), waiting (queued again by hpo retry)."""
    spec = write_spec(small_spec(budget={"n_trials": 6, "epochs": 3}))
    assert invoke(runner, "run", spec, "--storage", backend_url).exit_code == 0
    study = optuna.load_study(study_name="small", storage=backend_url)
    from hpo.storage.retry import queue_retry, requeue

    stopped = study.ask()  # a trial a stop queued, and its retry run since
    stopped.suggest_float("lr", 1e-4, 1e-1, log=True)
    study.tell(stopped, state=TrialState.FAIL)
    requeue(study, stopped._trial_id, "interrupted (SIGINT) in epoch 1")
    failed = study.ask()
    failed.suggest_float("lr", 1e-4, 1e-1, log=True)
    study.tell(failed, state=TrialState.FAIL)
    queue_retry(study, study.trials[-1], "hpo retry: again", inherit=False)
    return backend_url


@pytest.mark.parametrize("backend_url", ["sqlite", "postgresql"], indirect=True)
def test_the_database_answers_what_optuna_answers(mixed) -> None:
    from hpo import _private
    from hpo.search import reading
    from hpo.search.summary import study_rows, summarize
    from hpo.storage.backends import open_storage
    from hpo.storage.tables import read_only

    study = optuna.load_study(study_name="small", storage=mixed)
    with read_only(mixed) as conn:
        sid = reading.study_id(conn, "small", mixed)
        assert reading.simple(conn, sid, "small")
        assert reading.summary(conn, sid, "small") == summarize(study)
        assert reading.study_rows(conn) == study_rows(open_storage(mixed, create=False, heartbeat=None))
        for state in (None, "complete", "pruned", "fail", "resumed", "waiting"):
            for sort in ("number", "value"):
                for limit in (None, 2):
                    names, rows = reading.trial_records(conn, sid, state=state, sort=sort, limit=limit,
                                                        maximize=_private.sql_directions(conn, sid)[0] == "maximize")
                    assert list(rows) == optuna_records(study, state, sort, limit), (state, sort, limit)


@pytest.mark.parametrize("backend_url", ["sqlite", "postgresql"], indirect=True)
def test_hpo_show_reads_one_trial_from_the_database_as_optuna_reads_it(mixed, runner) -> None:
    """`hpo show` and `hpo logs` read the trial alone from the tables; every trial of every state
    reads and renders as through Optuna's storage (the path a Redis journal takes)."""
    from hpo.search.reading import SqlTrials
    from hpo.search.study import open_existing
    from hpo.storage.backends import open_storage
    from hpo.storage.tables import read_only
    from hpo.ui.trial_view import OptunaTrials, log_of, render

    handle = open_existing("small", open_storage(mixed, create=False, heartbeat=None), mixed)
    through_optuna = OptunaTrials(handle)
    with read_only(mixed) as conn:
        from_sql = SqlTrials(conn, "small", mixed, None)
        assert from_sql.view.metric == through_optuna.view.metric
        assert from_sql.view.folder.path == through_optuna.view.folder.path
        states = set()
        for number in range(len(handle.study.trials)):
            mine, theirs = from_sql.trial(number), through_optuna.trial(number)
            assert mine == theirs, number
            assert render(from_sql, mine) == render(through_optuna, theirs)
            assert log_of(from_sql, mine) == log_of(through_optuna, theirs)
            states.add(mine.state)
    assert states == {"COMPLETE", "PRUNED", "FAIL", "WAITING"} or states >= {"COMPLETE", "FAIL", "WAITING"}
    shown = invoke(runner, "show", "small", "0", "--storage", mixed)
    assert shown.exit_code == 0 and shown.stdout.startswith("Trial 0 of study small: COMPLETE"), shown.output
    missing = invoke(runner, "show", "small", str(len(handle.study.trials)), "--storage", mixed)
    assert missing.exit_code == 1
    assert missing.stderr == f"Error: study small has no trial {len(handle.study.trials)} " \
                             f"(trials 0-{len(handle.study.trials) - 1})\n"


def optuna_records(study: optuna.Study, state: str | None, sort: str, limit: int | None) -> list[dict]:
    """`hpo trials`' rows from the Optuna study, as the command's own fallback makes them."""
    from hpo.search.budget import resumed_numbers

    ts = study.get_trials(deepcopy=False)
    resumed = resumed_numbers(ts)
    if sort == "value":
        ts = sorted(ts, key=lambda t: (t.value is None, -(t.value or 0.0), t.number))
    kept = [t for t in ts if state is None or state.upper() == (
        "RESUMED" if t.state.name == "FAIL" and t.number in resumed else t.state.name)][:limit]
    names = sorted({k for t in (kept if limit is not None else ts) for k in t.params})
    out = []
    for t in kept:
        shown = "RESUMED" if t.state.name == "FAIL" and t.number in resumed else t.state.name
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start \
            else None
        out.append({"number": t.number, "state": shown, "value": t.values[0] if t.values else None,
                    "epochs": len(t.intermediate_values), "seconds": round(seconds, 2) if seconds is not None else None,
                    "reason": t.user_attrs.get("reason", ""), **{f"params_{k}": t.params.get(k) for k in names}})
    return out


@pytest.mark.parametrize("backend_url", ["sqlite", "postgresql", "redis"], indirect=True)
def test_a_limited_listing_has_a_column_for_each_parameter_it_shows_and_no_other(backend_url, runner) -> None:
    """`hpo trials --limit N` names the parameters of the N trials it shows: asking a study of
    100,000 trials for every name it ever used scans all its parameter rows (most of the time
    the command took on PostgreSQL). The whole listing keeps the whole study's columns. Redis
    takes Optuna's path: the same columns."""
    from hpo.storage.backends import open_storage

    study = optuna.create_study(study_name="cond", storage=open_storage(backend_url, heartbeat=None),
                                direction="maximize")
    for name in ("a", "b", "b"):
        trial = study.ask()
        study.tell(trial, trial.suggest_float(name, 0.0, 1.0))
    first = invoke(runner, "trials", "cond", "--storage", backend_url, "--limit", "1", "--format", "csv")
    assert first.exit_code == 0, first.output
    assert first.stdout.splitlines()[0].endswith(",reason,params_a"), first.stdout
    five = invoke(runner, "trials", "cond", "--storage", backend_url, "--state", "complete", "--limit", "5",
                  "--format", "csv")
    assert five.stdout.splitlines()[0].endswith(",reason,params_a,params_b"), five.stdout
    every = invoke(runner, "trials", "cond", "--storage", backend_url, "--format", "csv")
    assert every.stdout.splitlines()[0].endswith(",reason,params_a,params_b") and len(every.stdout.splitlines()) == 4


@pytest.mark.parametrize("backend_url", ["sqlite"], indirect=True)
def test_hpo_trials_filters_sorts_and_limits_and_best_says_what_it_said(mixed, runner) -> None:
    best = invoke(runner, "trials", "small", "--storage", mixed, "--sort", "value", "--limit", "2")
    assert best.exit_code == 0, best.output
    rows = best.stdout.splitlines()
    assert len(rows) == 3 and rows[0].split()[:3] == ["#", "state", "value"]
    values = [float(r.split()[2]) for r in rows[1:]]
    assert values == sorted(values, reverse=True)
    # the table shows four decimals
    assert max(values) == pytest.approx(optuna.load_study(study_name="small", storage=mixed).best_value, abs=5e-5)
    resumed = invoke(runner, "trials", "small", "--storage", mixed, "--state", "resumed", "--format", "csv")
    lines = resumed.stdout.splitlines()
    assert lines[0].startswith("number,state,value,epochs,seconds,reason,params_") and len(lines) == 2
    assert lines[1].split(",")[1] == "RESUMED"
    shown = invoke(runner, "best", "small", "--storage", mixed)
    assert shown.exit_code == 0 and "1 resumed" in shown.stdout and "1 fail" in shown.stdout, shown.stdout


def test_read_only_commands_import_no_optuna(write_spec, runner, storage_url, tmp_path) -> None:
    """What makes them fast: no optuna, no Alembic (its import alone is a quarter to half a second)."""
    assert invoke(runner, "run", write_spec(small_spec(budget={"n_trials": 2, "epochs": 2})), "--storage",
                  storage_url).exit_code == 0
    probe = ("import sys\nfrom hpo.cli import cli\n"
             "try:\n    cli(sys.argv[1:], standalone_mode=False)\nfinally:\n"
             "    print('optuna' in sys.modules, 'torch' in sys.modules, file=sys.stderr)\n")
    for args in (["studies"], ["best", "small"], ["trials", "small", "--limit", "1"], ["show", "small", "1"],
                 ["logs", "small", "1"]):
        done = subprocess.run([sys.executable, "-c", probe, *args, "--storage", storage_url], capture_output=True,
                              text=True, env=env_without_storage(), cwd=tmp_path, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stderr.strip().splitlines()[-1] == "False False", (args, done.stderr)
