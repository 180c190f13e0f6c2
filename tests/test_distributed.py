"""Many workers on one study over real PostgreSQL and Redis: exact budgets and crash recovery."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import (
    env_without_storage,
    invoke,
    pg_admin,
    small_spec,
    wait_for,
)

pytestmark = pytest.mark.postgres

FAST = small_spec(
    space={"lr": {"low": 1e-3, "high": 5e-2, "log": True}, "width": {"low": 8, "high": 32}},
    data={"dataset": "synthetic", "n_samples": 300, "n_features": 8, "n_classes": 2},
    pruner={"name": "none"},
)


# Trials long enough (8 epochs of 20,000 rows) to be caught in flight by a kill, a freeze or a delete.
LONG = dict(
    FAST,
    data={"dataset": "synthetic", "n_samples": 20000, "n_features": 64, "n_classes": 4},
    space={"lr": {"low": 1e-3, "high": 1e-2, "log": True}, "width": 256},
    budget={"n_trials": 3, "epochs": 8},
)


def worker_cmd(study: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "hpo", "worker", study, "--quiet", "--threads", "1", *args]


def env_for(url: str, artifacts: Path) -> dict[str, str]:
    env = env_without_storage()
    env.update(HPO_STORAGE=url, HPO_ARTIFACTS=str(artifacts), OMP_NUM_THREADS="1", HPO_CHECKPOINT_INTERVAL="0")
    return env


def create(runner, write_spec, url: str, spec: dict, tmp_path: Path) -> None:
    """Create the study and store its spec without running a trial, as `hpo run` would."""
    from hpo.search.study import open_for_spec
    from hpo.spec.loading import load_spec
    from hpo.storage.backends import open_storage

    open_for_spec(load_spec(write_spec(spec)), open_storage(url), url, str(tmp_path / "artifacts"))


@pytest.mark.slow
def test_four_workers_share_one_exact_budget(pg_url, write_spec, runner, tmp_path) -> None:
    spec = dict(FAST, name="four", budget={"n_trials": 100, "epochs": 2})
    create(runner, write_spec, pg_url, spec, tmp_path)
    env = env_for(pg_url, tmp_path / "artifacts")
    procs = [subprocess.Popen(worker_cmd("four", "--n-trials", "25"), env=env, cwd=tmp_path,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], errors
    trials = optuna.load_study(study_name="four", storage=pg_url).trials
    assert len(trials) == 100
    assert sorted(t.number for t in trials) == list(range(100))
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}


def test_run_with_workers_never_overshoots_the_budget(pg_url, write_spec, runner) -> None:
    spec = dict(FAST, name="overshoot", budget={"n_trials": 30, "epochs": 1})
    result = invoke(runner, "run", write_spec(spec), "--storage", pg_url, "--workers", "3")
    assert result.exit_code == 0, result.output
    trials = optuna.load_study(study_name="overshoot", storage=pg_url).trials
    assert len(trials) == 30 and all(t.state == TrialState.COMPLETE for t in trials)
    assert "Study overshoot: 30 trials (30 complete)" in result.stdout


@pytest.mark.slow  # ~20 s
def test_killed_worker_trial_is_retried_from_its_checkpoint(pg_url, write_spec, runner, tmp_path) -> None:
    spec = dict(LONG, name="killed")
    create(runner, write_spec, pg_url, spec, tmp_path)
    env = env_for(pg_url, tmp_path / "artifacts")
    hb = ["--heartbeat-interval", "1", "--grace-period", "3"]
    # Its own process group: `hpo worker` and the process that trains under it go down together.
    victim = subprocess.Popen(worker_cmd("killed", *hb), env=env, cwd=tmp_path, start_new_session=True)
    study = optuna.load_study(study_name="killed", storage=pg_url)

    def running_with_two_epochs() -> bool:
        return any(t.state == TrialState.RUNNING and len(t.intermediate_values) >= 2
                   for t in study.get_trials(deepcopy=False))

    wait_for(running_with_two_epochs, "the victim's trial to report 2 epochs")
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    # A worker started with only the study name and the storage (HPO_STORAGE) takes over.
    rescuer = subprocess.run(worker_cmd("killed", *hb), env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
    assert rescuer.returncode == 0, rescuer.stderr
    trials = study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    assert TrialState.RUNNING not in states
    assert states.count(TrialState.COMPLETE) == 3
    assert states.count(TrialState.FAIL) == 1  # the killed attempt, superseded by its retry
    retry = next(t for t in trials if t.system_attrs.get("retry_history"))
    assert retry.state == TrialState.COMPLETE
    assert retry.user_attrs["resumed_from_epoch"] > 0
    assert sorted(retry.intermediate_values) == list(range(8))


@pytest.mark.slow  # ~15 s
def test_database_restart_during_a_study(pg_url, postgres_server, write_spec, runner, tmp_path) -> None:
    spec = dict(FAST, name="restart", budget={"n_trials": 40, "epochs": 3},
                data={"dataset": "synthetic", "n_samples": 3000, "n_features": 16, "n_classes": 2})
    proc = subprocess.Popen(
        [sys.executable, "-m", "hpo", "run", str(write_spec(spec)), "--workers", "2", "--quiet"],
        env=env_for(pg_url, tmp_path / "artifacts"), cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )

    def some_done() -> bool:
        try:
            ts = optuna.load_study(study_name="restart", storage=pg_url).get_trials(deepcopy=False)
        except Exception:
            return False
        return sum(t.state.is_finished() for t in ts) >= 5

    wait_for(some_done, "5 finished trials")
    postgres_server.restart()
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    trials = optuna.load_study(study_name="restart", storage=pg_url).trials
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == 40
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]


def test_redis_journal_two_workers(write_spec, runner, tmp_path, redis_url) -> None:
    url = redis_url
    spec = dict(FAST, name="journal", budget={"n_trials": 12, "epochs": 2})
    result = invoke(runner, "run", write_spec(spec), "--storage", url, "--workers", "2")
    assert result.exit_code == 0, result.output
    from hpo.storage.backends import open_storage

    trials = optuna.load_study(study_name="journal", storage=open_storage(url)).trials
    assert len(trials) == 12 and all(t.state == TrialState.COMPLETE for t in trials)


def test_redis_workers_take_turns_at_the_budget(redis_url) -> None:
    # Two workers on a Redis journal check the budget and create their trial one at a time.
    import threading

    from hpo.storage.backends import open_storage
    from hpo.storage.budget_lock import BudgetLock

    url = redis_url
    study_id = optuna.create_study(storage=open_storage(url), study_name="turns")._study_id
    first, second = (BudgetLock(open_storage(url), study_id) for _ in range(2))
    first.acquire()
    got_it = threading.Event()
    waiter = threading.Thread(target=lambda: (second.acquire(), got_it.set()))
    waiter.start()
    assert not got_it.wait(0.5), "the second worker took the lock the first one holds"
    first.release()
    assert got_it.wait(30), "the second worker never got the lock the first one gave up"
    waiter.join()
    second.release()


def test_grpc_proxy_serves_workers(write_spec, runner, proxy_url, storage_url) -> None:
    spec = dict(FAST, name="viaproxy", budget={"n_trials": 6, "epochs": 1})
    result = invoke(runner, "run", write_spec(spec), "--storage", proxy_url, "--workers", "2")
    assert result.exit_code == 0, result.output
    trials = optuna.load_study(study_name="viaproxy", storage=storage_url).trials
    assert len(trials) == 6 and all(t.state == TrialState.COMPLETE for t in trials)


def test_ctrl_c_stops_the_proxy_while_workers_are_running_trials(write_spec, runner, storage_url, tmp_path) -> None:
    """Ctrl-C ends `hpo proxy` at once with its one line, though workers still send requests; its
    workers then stop with a clear line, and what they had finished stays in the storage."""
    from tests.conftest import grpc_proxy

    spec = dict(FAST, name="busy", budget={"n_trials": 5000, "epochs": 1})
    create(runner, write_spec, storage_url, spec, tmp_path)
    study = optuna.load_study(study_name="busy", storage=storage_url)
    proxy_log: list[str] = []
    with grpc_proxy(storage_url, tmp_path, stderr=proxy_log) as url:
        workers = [subprocess.Popen(worker_cmd("busy"), env=env_for(url, tmp_path / "artifacts"), cwd=tmp_path,
                                    stderr=subprocess.PIPE, text=True) for _ in range(2)]
        wait_for(lambda: len(study.get_trials(states=(TrialState.COMPLETE,))) >= 4, "four trials through the proxy")
    assert "Traceback" not in proxy_log[0], proxy_log[0]
    assert proxy_log[0].rstrip().endswith("Proxy stopped."), proxy_log[0]
    for w in workers:
        _, err = w.communicate(timeout=60)
        assert w.returncode != 0 and "Traceback" not in err, err
        assert err.strip().splitlines()[-1].startswith("Error: "), err
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) >= 4


def test_the_proxy_shares_a_read_among_the_workers_waiting_and_never_answers_with_an_older_one() -> None:
    """Reads of one study that arrive while one runs share the next read: each worker sees what
    was written before it asked (its own report, say), and the database reads once for them all."""
    import threading

    from hpo.search.proxy import BatchedReads

    reads, writes = BatchedReads(), [0]
    first_in, release = threading.Event(), threading.Event()
    served: list[int] = []

    def read() -> int:
        seen = writes[0]
        if not first_in.is_set():
            first_in.set()
            release.wait(30)  # the first read is slow; requests arrive meanwhile
        served.append(seen)
        return seen

    got: dict[str, int] = {}
    first = threading.Thread(target=lambda: got.__setitem__("first", reads.read("study", read)))
    first.start()
    assert first_in.wait(30)
    writes[0] = 1  # a worker writes, then asks: the read already running started before its write
    later = [threading.Thread(target=lambda i=i: got.__setitem__(f"later{i}", reads.read("study", read)))
             for i in range(8)]
    for t in later:
        t.start()
    wait_for(lambda: reads.waiting.get("study") == 8, "the eight later reads to wait", 30)
    release.set()
    for t in [first, *later]:
        t.join(30)
    assert got["first"] == 0
    assert all(got[f"later{i}"] == 1 for i in range(8)), got  # none answered with the read before its write
    assert len(served) == 2  # the eight waiting shared one read


def test_grpc_proxy_gives_the_last_trial_to_one_worker(write_spec, runner, proxy_url, storage_url) -> None:
    # Behind a proxy a worker cannot lock the database: two workers that both see one trial left
    # both ask for it, and the proxy, which creates every trial, hands it to one only.
    from hpo.search.budget import budget_status, is_budget_spent
    from hpo.storage.backends import open_storage
    from hpo.storage.retry import requeue

    spec = dict(FAST, name="lastone", budget={"n_trials": 1, "epochs": 1})
    assert invoke(runner, "run", write_spec(spec), "--storage", proxy_url).exit_code == 0
    direct = optuna.load_study(study_name="lastone", storage=storage_url)
    stored = direct.user_attrs["spec"]
    stored["budget"]["n_trials"] = 2  # the budget grows by one trial
    direct.set_user_attr("spec", stored)

    first, second = (optuna.load_study(study_name="lastone", storage=open_storage(proxy_url)) for _ in range(2))
    assert budget_status(first, 2).remaining == budget_status(second, 2).remaining == 1
    trial = first.ask()
    with pytest.raises(Exception) as refused:
        second.ask()
    assert is_budget_spent(refused.value), refused.value
    assert len(direct.get_trials()) == 2

    # A retry of an interrupted trial is queued work, not a new trial: the proxy lets it through.
    first.tell(trial, state=TrialState.FAIL)
    assert requeue(first, trial._trial_id) is not None
    assert [t.state for t in direct.get_trials()] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]


def test_mysql_two_workers(mysql_url, write_spec, runner) -> None:
    spec = dict(FAST, name="maria", budget={"n_trials": 10, "epochs": 1})
    result = invoke(runner, "run", write_spec(spec), "--storage", mysql_url, "--workers", "2")
    assert result.exit_code == 0, result.output
    trials = optuna.load_study(study_name="maria", storage=mysql_url).trials
    assert len(trials) == 10 and all(t.state == TrialState.COMPLETE for t in trials)


@pytest.mark.parametrize("backend_url", ["sqlite", "postgresql", "mysql"], indirect=True)
def test_user_attrs_written_together_upsert_on_every_backend(backend_url) -> None:
    # A trial's end-of-trial attributes go in one multi-row upsert; a key written twice keeps
    # the last value, and the trial object sees them, as with Optuna's own set_user_attr.
    from hpo.storage.backends import open_storage
    from hpo.storage.resilient import set_user_attrs

    url = backend_url
    study = optuna.create_study(storage=open_storage(url), study_name="attrs")
    trial = study.ask()
    set_user_attrs(trial, {"reason": "first", "train_loss": [0.5, 0.25], "device": "cpu"})
    set_user_attrs(trial, {"reason": "second", "n_params": 123})
    assert trial.user_attrs == {"reason": "second", "train_loss": [0.5, 0.25], "device": "cpu", "n_params": 123}
    study.tell(trial, 1.0)
    stored = optuna.load_study(study_name="attrs", storage=url).trials[0].user_attrs
    assert stored == {"reason": "second", "train_loss": [0.5, 0.25], "device": "cpu", "n_params": 123}
    with pytest.raises(RuntimeError):  # a finished trial cannot change, as in Optuna
        set_user_attrs(trial, {"a": 1, "b": 2})


@pytest.mark.parametrize("backend_url", ["sqlite", "postgresql", "mysql"], indirect=True)
def test_a_rounds_reports_land_as_trial_report_would_on_every_backend(backend_url) -> None:
    # A fused round writes its members' reports in one upsert: what lands is what Trial.report
    # would have written (infinities and NaN included), a step already reported keeps its first
    # value, the pruner sees them, and a finished trial refuses as in Optuna.
    from hpo.storage.backends import open_storage
    from hpo.storage.resilient import report_all

    url = backend_url
    study = optuna.create_study(storage=open_storage(url), study_name="reports", direction="maximize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))
    a, b, c = study.ask(), study.ask(), study.ask()
    report_all([(a, 0.5, 0), (b, 0.25, 0), (c, float("inf"), 0)])
    report_all([(a, 0.75, 1), (b, float("nan"), 1), (a, 0.0, 0)])  # (a, step 0) is already in
    study.tell(a, 0.75)
    stored = {t.number: t.intermediate_values for t in optuna.load_study(study_name="reports", storage=url).trials}
    assert stored[0] == {0: 0.5, 1: 0.75} and stored[2] == {0: float("inf")}
    assert stored[1][0] == 0.25 and math.isnan(stored[1][1])
    assert b._cached_frozen_trial.intermediate_values[0] == 0.25
    assert not c.should_prune() and b.should_prune()  # c's inf beats a's 0.5; b's NaN is pruned
    with pytest.raises(RuntimeError):
        report_all([(a, 0.9, 2), (b, 0.5, 2)])
    assert optuna.load_study(study_name="reports", storage=url).trials[1].intermediate_values.keys() == {0, 1}


def test_a_session_left_in_a_dropped_transaction_heals(pg_url, postgres_server) -> None:
    # What a PostgreSQL restart can leave behind (seen once in CI): this thread's session holds
    # a transaction on a connection the server closed, and SQLAlchemy refuses every later use
    # ("Can't reconnect until invalid transaction is rolled back"). The storage drops the session
    # and retries instead of failing the worker.
    import psycopg
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    from hpo.storage.backends import open_storage

    storage = open_storage(pg_url)
    backend = getattr(storage, "_backend", storage)
    optuna.create_study(storage=storage, study_name="heal")
    session = backend.scoped_session()
    session.execute(text("SELECT 1"))  # a transaction is open on this thread's connection
    name = pg_url.rsplit("/", 1)[1]
    with psycopg.connect(**pg_admin(postgres_server), autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
    with pytest.raises(OperationalError):  # the statement that finds the connection gone
        session.execute(text("SELECT 1"))
    assert [s.study_name for s in backend.get_all_studies()] == ["heal"]
    assert backend.get_study_id_from_name("heal") >= 0


@pytest.mark.slow  # ~20 s
def test_a_worker_that_wakes_after_its_trial_was_taken_over_drops_it_and_goes_on(pg_url, write_spec, runner,
                                                                               tmp_path) -> None:
    """SIGSTOP past the grace period (a VM pause, a partition), a rescuer retries the trial, SIGCONT:
    the woken worker says so in one line and carries on; the study completes exactly."""
    spec = dict(LONG, name="frozen")
    create(runner, write_spec, pg_url, spec, tmp_path)
    env = env_for(pg_url, tmp_path / "artifacts")
    hb = ["--heartbeat-interval", "1", "--grace-period", "3"]
    sleeper = subprocess.Popen([sys.executable, "-m", "hpo", "worker", "frozen", "--threads", "1", *hb],
                               env=env, cwd=tmp_path, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                               start_new_session=True)  # frozen whole, as a VM pause freezes every process
    study = optuna.load_study(study_name="frozen", storage=pg_url)
    wait_for(lambda: any(t.state == TrialState.RUNNING and len(t.intermediate_values) >= 2
                         for t in study.get_trials(deepcopy=False)), "the sleeper's trial to report 2 epochs")
    os.killpg(sleeper.pid, signal.SIGSTOP)
    rescuer = subprocess.Popen(worker_cmd("frozen", *hb), env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: study.get_trials(deepcopy=False)[0].state == TrialState.FAIL, "the rescuer to fail trial 0")
    os.killpg(sleeper.pid, signal.SIGCONT)
    _, err = sleeper.communicate(timeout=600)
    _, rescuer_err = rescuer.communicate(timeout=600)
    assert sleeper.returncode == 0 and rescuer.returncode == 0, err + rescuer_err
    assert "trial 0 was taken over by another worker while this one was stopped" in err
    assert "Traceback" not in err
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert TrialState.RUNNING not in states and states.count(TrialState.COMPLETE) == 3


def test_deleting_a_running_study_stops_its_worker_with_one_line(pg_url, write_spec, runner, tmp_path) -> None:
    # Long enough that the worker cannot finish its budget before `hpo delete` lands.
    spec = dict(LONG, name="doomed", budget={"n_trials": 3, "epochs": 200})
    create(runner, write_spec, pg_url, spec, tmp_path)
    env = env_for(pg_url, tmp_path / "artifacts")
    worker = subprocess.Popen(worker_cmd("doomed"), env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    study = optuna.load_study(study_name="doomed", storage=pg_url)
    wait_for(lambda: any(len(t.intermediate_values) >= 2 for t in study.get_trials(deepcopy=False)),
             "the worker's trial to report 2 epochs")
    assert invoke(runner, "delete", "doomed", "--storage", pg_url, "--yes").exit_code == 0
    _, err = worker.communicate(timeout=120)
    assert worker.returncode == 1, err
    assert err.strip().splitlines() == ["Error: study 'doomed' was deleted while this worker ran; stopped"]


@pytest.mark.parametrize("backend_url", ["postgresql", "mysql"], indirect=True)
def test_a_budget_lock_holder_that_stops_answering_loses_the_lock(backend_url, write_spec, runner, tmp_path) -> None:
    """A holder frozen (or cut off) mid-hold: the server ends its session after the hold limit, so
    the other workers go on instead of waiting for it (or for TCP keepalive, hours)."""
    from hpo.storage.backends import open_storage
    from hpo.storage.budget_lock import BudgetLock

    url = backend_url
    spec = dict(FAST, name="held", budget={"n_trials": 2, "epochs": 2})
    create(runner, write_spec, url, spec, tmp_path)
    storage = open_storage(url)
    stuck = BudgetLock(storage, storage.get_study_id_from_name("held"))
    stuck.hold_limit = 2.0
    stuck.acquire()  # and never answers again, as a frozen worker would not
    done = subprocess.run(worker_cmd("held"), env=env_for(url, tmp_path / "artifacts"), cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    states = [t.state for t in optuna.load_study(study_name="held", storage=url).trials]
    assert states == [TrialState.COMPLETE] * 2
    stuck.release()  # the session is gone: releasing says nothing


@pytest.mark.parametrize("backend_url", ["sqlite", "postgresql"], indirect=True)
def test_simultaneous_creation_on_a_fresh_storage_is_race_free(backend_url, write_spec, tmp_path) -> None:
    """Several `hpo create` of one spec at the same instant on an empty database: Optuna creates its
    schema without a lock, and they used to fail on each other's tables and rows."""
    url = backend_url
    path = write_spec(dict(FAST, name="race"))
    cmd = [sys.executable, "-m", "hpo", "create", str(path), "--storage", url, "--artifacts", str(tmp_path / "a")]
    procs = [subprocess.Popen(cmd, env=env_without_storage(), cwd=tmp_path, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    summaries = optuna.get_all_study_summaries(url)
    assert [s.study_name for s in summaries] == ["race"]
