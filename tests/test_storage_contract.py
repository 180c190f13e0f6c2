"""hpo's storage keeps Optuna's storage contract: Optuna's own StorageTestCase (shipped with
Optuna, every test of it, none skipped) run against what hpo opens for its workers, on SQLite,
PostgreSQL and MariaDB, and through `hpo proxy` (Optuna's gRPC proxy with hpo's budget check)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from optuna.storages import BaseStorage
from optuna.testing.pytest_storages import StorageTestCase

from hpo.storage.backends import open_storage
from hpo.storage.resilient import ResilientRDBStorage
from tests.conftest import env_without_storage, need_module


def _opened(url: str) -> Iterator[BaseStorage]:
    storage = open_storage(url)  # as a worker opens it: hpo's class, its heartbeat, its engine options
    assert isinstance(storage, ResilientRDBStorage)
    yield storage
    storage.engine.dispose()


class TestOnSQLite(StorageTestCase):
    @pytest.fixture
    def storage(self, tmp_path: Path) -> Iterator[BaseStorage]:
        yield from _opened(f"sqlite:///{tmp_path / 'contract.db'}")


@pytest.mark.slow
class TestOnPostgreSQL(StorageTestCase):
    @pytest.fixture
    def storage(self, pg_url: str) -> Iterator[BaseStorage]:
        yield from _opened(pg_url)


@pytest.mark.slow
class TestOnMariaDB(StorageTestCase):
    @pytest.fixture
    def storage(self, mysql_url: str) -> Iterator[BaseStorage]:
        yield from _opened(mysql_url)


@pytest.fixture(scope="module")
def proxy_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """One `hpo proxy` (Optuna's gRPC server over hpo's storage, with hpo's budget check) for the
    class: started once, since it imports torch; each test empties its storage first."""
    import signal
    import socket
    import subprocess
    import sys

    need_module("grpc")
    import grpc

    folder = tmp_path_factory.mktemp("proxy")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proxy = subprocess.Popen([sys.executable, "-m", "hpo", "proxy", "--storage", f"sqlite:///{folder / 'contract.db'}",
                              "--port", str(port)], env=env_without_storage(), cwd=folder, stderr=subprocess.PIPE,
                             text=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=120)
        yield port
    finally:
        proxy.send_signal(signal.SIGINT)
        proxy.communicate(timeout=30)


@pytest.mark.slow
class TestThroughTheProxy(StorageTestCase):
    @pytest.fixture
    def storage(self, proxy_port: int) -> Iterator[BaseStorage]:
        storage = open_storage(f"grpc://127.0.0.1:{proxy_port}")
        for study in storage.get_all_studies():  # the test before left its studies
            storage.delete_study(study._study_id)
        yield storage

    @pytest.mark.parametrize("param_names", [["a", "b"], ["b", "a"]])
    def test_get_all_trials_params_order(self, storage: BaseStorage, param_names: list[str]) -> None:
        """Optuna's gRPC messages carry a trial's parameters in a protobuf map, which has no order:
        through Optuna's own proxy over a plain RDBStorage the suggested order comes back wrong in
        half the trials (10 of 20 measured), so the order is Optuna's proxy's to keep, not hpo's.
        Every parameter still comes back, with its value."""
        from optuna.distributions import FloatDistribution
        from optuna.study import StudyDirection
        from optuna.trial import TrialState, create_trial

        study_id = storage.create_new_study(directions=[StudyDirection.MINIMIZE])
        trial_id = storage.create_new_trial(study_id, create_trial(state=TrialState.RUNNING))
        for name in param_names:
            storage.set_trial_param(trial_id, name, 1.0, distribution=FloatDistribution(0.0, 2.0))
        assert storage.get_all_trials(study_id)[0].params == dict.fromkeys(param_names, 1.0)


def test_a_study_on_hpos_storage_batches_parameters_yet_refuses_a_mismatch_at_the_call(tmp_path: Path) -> None:
    """Through a real Optuna study: a trial's eight parameters cost one transaction where Optuna's
    RDBStorage takes eight, and a parameter suggested with another kind of distribution than the
    study holds raises ValueError at that suggest call, with the trial's other parameters kept."""
    import optuna
    from sqlalchemy import event

    def commits_per_trial(storage: BaseStorage) -> float:
        commits = [0]
        event.listen(storage.engine, "commit", lambda conn: commits.__setitem__(0, commits[0] + 1))  # type: ignore[attr-defined]
        study = optuna.create_study(storage=storage, sampler=optuna.samplers.RandomSampler(0))
        study.optimize(lambda t: sum(t.suggest_float(f"x{i}", -1, 1) for i in range(8)), n_trials=1)
        before = commits[0]
        study.optimize(lambda t: sum(t.suggest_float(f"x{i}", -1, 1) for i in range(8)), n_trials=4)
        return (commits[0] - before) / 4

    plain = commits_per_trial(optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'plain.db'}"))
    ours = commits_per_trial(open_storage(f"sqlite:///{tmp_path / 'hpo.db'}", heartbeat=None))
    assert ours == plain - 7, (ours, plain)

    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 'mismatch.db'}"))
    study.optimize(lambda t: t.suggest_float("lr", 1e-3, 1e-1, log=True) + t.suggest_int("depth", 1, 3), n_trials=1)
    trial = study.ask()
    trial.suggest_float("lr", 1e-3, 1e-1, log=True)
    with pytest.raises(ValueError, match="different distribution kind"):
        trial.suggest_categorical("depth", ["1", "2"])  # an int before: refused here, not at a later call
    assert set(study.trials[-1].params) == {"lr"}


def test_a_study_on_hpos_storage_copies_and_pickles(tmp_path: Path) -> None:
    """joblib- and Dask-style parallelism and copy.deepcopy pickle the storage: the copy works and
    sees what the original held back."""
    import copy
    import pickle

    import optuna

    storage = open_storage(f"sqlite:///{tmp_path / 'p.db'}")
    study = optuna.create_study(storage=storage, study_name="s")
    study.optimize(lambda t: t.suggest_float("x", 0, 1) + t.suggest_float("y", 0, 1), n_trials=2)
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    trial.suggest_float("y", 0, 1)  # held back until the storage's next call
    restored = pickle.loads(pickle.dumps(storage))
    assert set(restored.get_trial(trial_id_of(trial)).params) == {"x", "y"}
    again = optuna.load_study(study_name="s", storage=copy.deepcopy(restored))
    again.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    assert len(optuna.load_study(study_name="s", storage=storage).trials) == 4


def trial_id_of(trial: object) -> int:
    from hpo._private import trial_id

    return trial_id(trial)  # type: ignore[arg-type]


def test_parameters_held_for_a_trial_another_process_ended_do_not_take_others_with_them(tmp_path: Path) -> None:
    """Behind `hpo proxy` one storage object holds back the parameters of several workers' trials.
    One of them failed by another process meanwhile (a stale heartbeat): the others' parameters
    are written all the same, no unrelated call fails, and the ended trial's owner hears of it at
    its own next write."""
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState

    url = f"sqlite:///{tmp_path / 'held.db'}"
    ours, other = open_storage(url, heartbeat=None), optuna.storages.RDBStorage(url)
    study = ours.create_new_study([optuna.study.StudyDirection.MINIMIZE])
    first = ours.create_new_trial(study)
    ours.set_trial_param(first, "x", 0.5, FloatDistribution(0, 1))  # the study now holds x
    ended, alive = ours.create_new_trial(study), ours.create_new_trial(study)
    ours.set_trial_param(ended, "x", 0.1, FloatDistribution(0, 1))
    ours.set_trial_param(alive, "x", 0.2, FloatDistribution(0, 1))
    other.set_trial_state_values(ended, TrialState.FAIL)
    assert ours.get_trial(alive).params == {"x": 0.2}
    assert ours.get_trial(ended).state == TrialState.FAIL
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        ours.set_trial_intermediate_value(ended, 0, 1.0)
