"""Bad input, secrets and faults: every user mistake is one line, nothing leaks, no trial is lost."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from optuna.trial import TrialState

from hpo.errors import SpecError
from hpo.spec.loading import parse_yaml, spec_from_mapping
from tests.conftest import SMALL, env_without_storage, invoke, small_spec

ROOT = Path(__file__).resolve().parents[1]


def one_line_error(result) -> str:
    """The CLI's whole output must be a single `Error: ...` line, with no traceback."""
    text = result.output.strip()
    assert result.exit_code != 0, text
    assert "Traceback" not in text
    assert len(text.splitlines()) == 1, text
    assert text.startswith("Error: "), text
    return text


def bomb(levels: int = 9) -> str:
    """Billion laughs: 9 levels of 9 aliases, 387 million strings if anything expanded it."""
    parts = ['&a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        parts.append(f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "name: bomb\ndata: {dataset: digits}\nspace: {lr: [" + ", ".join(parts) + "]}\n"


def _data_files(tmp: Path) -> dict[str, Path]:
    (tmp / "t.csv").write_text("a,b,species\n1,2,x\n3,4,y\n5,6,x\n7,8,y\n9,1,x\n")
    np.savez(tmp / "bad.npz", X=np.zeros((10, 4)), y=np.zeros(9))
    return {"csv": tmp / "t.csv", "npz": tmp / "bad.npz"}


# (id, spec document or raw text, text the one error line must contain)
SPEC_CASES = [
    ("wrong-type", small_spec(budget={"n_trials": "ten"}), "budget.n_trials: must be an integer"),
    ("wrong-type-space", small_spec(space={"lr": {"low": "small", "high": 0.1}}), "space.lr.low: must be a number"),
    ("missing-key", {k: v for k, v in SMALL.items() if k != "data"}, "data: is required"),
    ("missing-dataset", small_spec(data={"split": {"train": 0.8, "val": 0.1, "test": 0.1}}), "data.dataset: is required"),
    ("unknown-key", small_spec(prunner={"name": "median"}), "prunner: unknown key; did you mean 'pruner'?"),
    ("unknown-param-key", small_spec(space={"lr": {"low": 0.1, "hihg": 0.2}}), "space.lr.hihg: unknown key"),
    ("bad-sampler-option", small_spec(sampler={"name": "tpe", "n_startup_trials": "many"}), "sampler"),
    ("yaml-bomb", bomb(), "space.lr"),
    ("deeply-nested", "name: x\ndata: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    ("python-object-tag", "name: !!python/object/apply:os.system ['echo pwned']\n", "could not determine a constructor"),
    ("tabs-and-garbage", "name: x\n\tdata: [\n", "line"),
]


# Plain validation mistakes are in tests/test_spec.py (MALFORMED); these are the hostile documents.
@pytest.mark.parametrize("doc,expected", [c[1:] for c in SPEC_CASES], ids=[c[0] for c in SPEC_CASES])
def test_bad_spec_files(write_spec, runner, tmp_path, doc, expected) -> None:
    db = tmp_path / "untouched.db"
    result = invoke(runner, "run", write_spec(doc), "--storage", f"sqlite:///{db}")
    assert expected in one_line_error(result)
    assert not db.exists()  # refused before any storage is touched


def test_bad_data_files(write_spec, runner, tmp_path) -> None:
    files = _data_files(tmp_path)
    cases = [
        (small_spec(data={"dataset": "csv", "path": str(files["csv"]), "label": "label"}), "has no column 'label'"),
        (small_spec(data={"dataset": "npz", "path": str(files["npz"])}), "X has 10 rows but y has 9"),
        (small_spec(data={"dataset": "csv", "path": str(tmp_path / "missing.csv"), "label": "y"}), "does not exist"),
        (small_spec(data={"dataset": "npz", "path": str(tmp_path)}), "is a directory"),
    ]
    db = tmp_path / "untouched.db"
    for doc, expected in cases:
        result = invoke(runner, "run", write_spec(doc), "--storage", f"sqlite:///{db}")
        assert expected in one_line_error(result)
    assert not db.exists()


def test_non_utf8_and_binary_spec_files(runner, tmp_path) -> None:
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (tmp_path / "model.pt").write_bytes(bytes(range(256)))
    assert "not UTF-8" in one_line_error(invoke(runner, "run", tmp_path / "latin1.yaml"))
    assert "binary file" in one_line_error(invoke(runner, "run", tmp_path / "model.pt"))
    assert not (tmp_path / "hpo.db").exists()


def test_same_study_name_with_a_different_spec_writes_nothing(write_spec, runner, storage_url) -> None:
    assert invoke(runner, "run", write_spec(small_spec(budget={"n_trials": 2, "epochs": 1})),
                  "--storage", storage_url).exit_code == 0
    before = optuna.load_study(study_name="small", storage=storage_url)
    other = small_spec(budget={"n_trials": 2, "epochs": 1}, metric="val_loss")
    assert "already exists with a different spec" in one_line_error(
        invoke(runner, "run", write_spec(other, "other.yaml"), "--storage", storage_url))
    after = optuna.load_study(study_name="small", storage=storage_url)
    assert len(after.trials) == len(before.trials)
    assert after.user_attrs == before.user_attrs


CLI_CASES = [
    (["run", "{spec}", "--n-trials", "-1"], "Invalid value for '--n-trials'"),
    (["run", "{spec}", "--gpus", "0,x"], "--gpus: '0,x' is not a comma-separated list"),
    (["run", "{spec}", "--gpus", "1,1"], "names a GPU twice"),
    (["run", "{spec}", "--workers", "0"], "Invalid value for '--workers'"),
    (["run", "{spec}", "--timeout", "-5"], "Invalid value for '--timeout'"),
    (["run", "{spec}", "--fuse", "1"], "Invalid value for '--fuse'"),
    (["run", "{spec}", "--device", "quantum"], "unknown device 'quantum'"),
    (["run", "{spec}", "--bogus-flag"], "No such option '--bogus-flag'"),
    (["worker", "nosuch", "--storage", "{db}"], "no study named 'nosuch'"),
    (["best", "nosuch", "--storage", "{db}"], "no study named 'nosuch'"),
    (["frobnicate"], "No such command 'frobnicate'"),
]


@pytest.mark.parametrize("argv,expected", [c for c in CLI_CASES], ids=[" ".join(c[0][:3]) for c in CLI_CASES])
def test_bad_cli_arguments(write_spec, runner, tmp_path, storage_url, argv, expected) -> None:
    from hpo.storage.backends import open_storage

    open_storage(storage_url)  # an existing, empty storage
    db = storage_url.removeprefix("sqlite:///")
    args = [a.format(spec=write_spec(small_spec()), db=storage_url) for a in argv]
    assert expected in one_line_error(invoke(runner, *args))
    assert optuna.get_all_study_names(storage_url) == []  # nothing written
    assert Path(db).exists()


STORAGE_CASES = [
    ("unknown-dialect", "oracle+nosuch://u:hunter2@127.0.0.1/db", "unknown database kind"),
    ("not-a-url", "just some words", "not a valid storage URL"),
    ("unreachable-host", "postgresql://u:hunter2@127.0.0.1:9/db", "cannot open storage postgresql://u:***@127.0.0.1:9/db"),
    ("wrong-password", "mysql+pymysql://root:hunter2@127.0.0.1:3306/test", "Access denied"),
    ("directory", "sqlite:///{tmp}", "is a directory, not a database file"),
    ("missing-folder", "sqlite:///{tmp}/no/such/dir/x.db", "does not exist"),
    ("redis-refused", "redis://:hunter2@127.0.0.1:9/0", "cannot open storage"),
    ("grpc-nothing-there", "grpc://127.0.0.1:9", "no storage proxy answers there"),
]


@pytest.mark.parametrize("url,expected", [c[1:] for c in STORAGE_CASES], ids=[c[0] for c in STORAGE_CASES])
def test_bad_storage_urls(write_spec, runner, tmp_path, request, url, expected) -> None:
    if "3306" in url:  # a wrong password needs a MariaDB server that answers
        server = request.getfixturevalue("mariadb_server")
        url = url.replace("127.0.0.1:3306", f"{server.host}:{server.port}")
    result = invoke(runner, "run", write_spec(small_spec()), "--storage", url.format(tmp=tmp_path))
    line = one_line_error(result)
    assert expected in line
    assert "hunter2" not in line  # passwords are masked in every message


def test_read_only_sqlite_file(write_spec, runner, tmp_path) -> None:
    """A database file nobody may write: refused up front with the reason, the file unchanged."""
    from hpo.storage.backends import open_storage

    db = tmp_path / "ro.db"
    open_storage(f"sqlite:///{db}")
    before = db.read_bytes()
    # Root ignores permission bits, so as root the file is made immutable instead.
    as_root = os.geteuid() == 0
    subprocess.run(["chattr", "+i", str(db)], check=True) if as_root else os.chmod(db, 0o444)
    try:
        line = one_line_error(invoke(runner, "run", write_spec(small_spec()), "--storage", f"sqlite:///{db}"))
    finally:
        subprocess.run(["chattr", "-i", str(db)], check=True) if as_root else os.chmod(db, 0o644)
    assert line == f"Error: cannot write to storage sqlite:///{db}: {db} is read-only"
    assert db.read_bytes() == before


def test_artifact_folder_that_cannot_be_created(write_spec, runner, storage_url) -> None:
    line = one_line_error(invoke(runner, "run", write_spec(small_spec()), "--storage", storage_url,
                                 "--artifacts", "/proc/hpo-artifacts"))
    assert "cannot create artifact folder /proc/hpo-artifacts" in line


# ---- the spec loader under fuzzing ------------------------------------------------------------

KEYS = ["name", "metric", "direction", "seed", "model", "data", "space", "sampler", "pruner", "budget",
        "execution", "dataset", "split", "train", "val", "test", "lr", "width", "depth", "type", "low",
        "high", "log", "step", "choices", "n_trials", "epochs", "optimizer", "mode", "group_size", "path"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["digits", "adam", "tpe", "median", "float", "int",
                                                           "categorical", "fused", "synthetic"]))
documents = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8), st.integers()), children, max_size=6),
    ),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=documents)
def test_fuzzed_documents_raise_only_spec_errors(doc) -> None:
    if isinstance(doc, dict):
        doc = {**{"name": "fuzz", "data": {"dataset": "digits"}, "space": {"lr": {"low": 0.001, "high": 0.1}}}, **doc}
    try:
        spec_from_mapping(doc, "fuzz.yaml")
    except SpecError as e:
        assert str(e).startswith("fuzz.yaml: ") and "\n" not in str(e)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_fuzzed_yaml_text_raises_only_spec_errors(text) -> None:
    try:
        spec_from_mapping(parse_yaml(text, "fuzz.yaml"), "fuzz.yaml")
    except SpecError:
        pass


# ---- secrets ------------------------------------------------------------------------------------


def test_password_never_reaches_the_study_logs_or_progress(pg_url, write_spec, tmp_path) -> None:
    secret = "s3cr3t-pw"
    url = pg_url.replace("postgres@", f"postgres:{secret}@")  # trust auth: accepted, and must be hidden
    spec = write_spec(small_spec(budget={"n_trials": 3, "epochs": 2}))
    env = env_without_storage()
    env["HPO_STORAGE"] = url
    run = subprocess.run([sys.executable, "-m", "hpo", "run", str(spec), "--workers", "2"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert secret not in run.stdout + run.stderr and "postgres:***@" in run.stderr
    study = optuna.load_study(study_name="small", storage=pg_url)
    from hpo.search.study import system_attrs

    stored = repr(study.user_attrs) + repr(system_attrs(study))
    stored += "".join(repr(t.user_attrs) + repr(t.system_attrs) for t in study.trials)
    assert secret not in stored
    for name in ("studies", "trials small", "best small"):
        out = subprocess.run([sys.executable, "-m", "hpo", *name.split()], capture_output=True, text=True,
                             env=env, cwd=tmp_path)
        assert out.returncode == 0 and secret not in out.stdout + out.stderr


def test_a_model_file_or_an_npz_with_code_in_it_runs_nothing(write_spec, runner, tmp_path) -> None:
    """Saved models load with weights_only=True and .npz files without pickle: a crafted file is
    refused and its code never runs (checkpoints: test_a_tampered_checkpoint_cannot_run_code;
    YAML tags: the python-object-tag case above)."""
    import pickle

    from hpo.storage.artifacts import Artifacts, open_store

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    arts = Artifacts(open_store(tmp_path / "a"), "0123456789ab", tmp_path / "a")
    (tmp_path / "a" / "model").write_bytes(pickle.dumps({"models": [Evil()]}))
    from hpo.errors import UnreadableFileError

    with pytest.raises(UnreadableFileError, match="model: not a PyTorch file"):  # refused, said in one line
        arts.read("model")
    np.savez(tmp_path / "evil.npz", X=np.array([Evil()], dtype=object), y=np.zeros(1))
    result = invoke(runner, "run", write_spec(small_spec(data={"dataset": "npz", "path": str(tmp_path / "evil.npz")})))
    assert result.exit_code == 1 and "Error: " in result.output
    assert not (tmp_path / "pwned").exists()


def test_a_tampered_checkpoint_cannot_run_code(tmp_path) -> None:
    import pickle

    from hpo.storage.artifacts import Artifacts, open_store

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    store = open_store(tmp_path / "a")
    arts = Artifacts(store, "uid", tmp_path / "a")
    (tmp_path / "a" / "uid-trial0-a.ckpt").write_bytes(pickle.dumps({"epoch": 3, "x": Evil()}))
    state, problems = arts.load_checkpoint(0)
    assert state is None  # refused by weights_only, so the trial starts fresh
    assert len(problems) == 1 and problems[0].endswith("uid-trial0-a.ckpt: not a PyTorch file"), problems
    assert not (tmp_path / "pwned").exists()


# ---- faults ------------------------------------------------------------------------------------


def test_an_unexpected_exception_fails_the_trial_and_the_study_goes_on(write_spec, storage_url, tmp_path) -> None:
    """A progress hook (a user plug-in point) raising mid-trial."""
    import torch

    from hpo.execution.worker import run_worker
    from hpo.runtime.listener import Listener
    from hpo.search.study import open_for_spec
    from hpo.spec.loading import load_spec
    from hpo.storage.backends import open_storage

    class Flaky(Listener):
        def epoch_done(self, number, epoch, value):
            if number == 1 and epoch == 1:
                raise ValueError("the hook broke at epoch 1")

    spec = load_spec(write_spec(small_spec(budget={"n_trials": 3, "epochs": 3}, pruner={"name": "none"})))
    handle = open_for_spec(spec, open_storage(storage_url), storage_url, str(tmp_path / "art"))
    result = run_worker(handle, device=torch.device("cpu"), listener=Flaky())
    assert result.ran == 4  # the failure costs no budget: 3 results
    trials = handle.study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[1].user_attrs["reason"] == "ValueError: the hook broke at epoch 1"
    assert len(trials[1].intermediate_values) == 2  # what it reported before failing is kept


def test_a_study_whose_every_trial_fails_stops_early_and_says_so(write_spec, runner, storage_url, tmp_path) -> None:
    """Failed trials cost no budget, so a spec whose every trial fails must still end (it does not
    loop forever): its first three failures, all alike, stop it with a non-zero exit."""
    from hpo.search.study import UID_ATTR, open_for_spec, system_attrs
    from hpo.spec.loading import load_spec
    from hpo.storage.backends import open_storage

    spec_path = write_spec(small_spec(budget={"n_trials": 3, "epochs": 2}))
    handle = open_for_spec(load_spec(spec_path), open_storage(storage_url), storage_url, str(tmp_path / "art"))
    uid = system_attrs(handle.study)[UID_ATTR]
    for n in range(3):  # every trial's checkpoint slots are folders: each write fails alike
        for slot in "ab":
            (tmp_path / "art" / f"{uid}-trial{n}-{slot}.ckpt").mkdir()
    result = invoke(runner, "run", spec_path, "--storage", storage_url, "--artifacts", tmp_path / "art",
                    "--checkpoint-interval", "0")
    assert result.exit_code == 1
    states = [t.state for t in optuna.load_study(study_name="small", storage=storage_url).trials]
    assert states == [TrialState.FAIL] * 3
    assert "No trial has completed yet." in result.stdout
    assert "Stopped: the first 3 trials of this run failed with the same error: IsADirectoryError: [Errno 21] Is a " \
           "directory" in result.stderr
    shutil.rmtree(tmp_path / "art")


# ---- a crafted study database (issue 21): data read from a study is never trusted ---------------


@pytest.mark.parametrize("where", ["absolute", "dotdot", "folder", "uid glob"])
def test_delete_removes_only_files_hpo_made_inside_the_artifact_store(write_spec, runner, storage_url, tmp_path,
                                                                     where) -> None:
    """Rows written through Optuna's own storage API name a file outside the store (or another
    study's checkpoints): `hpo delete` leaves it alone and deletes the study's own files."""
    import json

    from hpo.search.study import ARTIFACTS_ATTR, UID_ATTR
    from hpo.storage.backends import open_storage

    art = tmp_path / "art"
    assert invoke(runner, "run", write_spec(small_spec(budget={"n_trials": 2, "epochs": 2})), "--storage",
                  storage_url, "--artifacts", art).exit_code == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    other = art / "0123456789ab-trial0-a.ckpt"  # another study's checkpoint in the same store
    other.write_bytes(b"checkpoint")
    storage = open_storage(storage_url)
    study_id = storage.get_study_id_from_name("small")
    from hpo.storage.files import TEMP_FOLDER

    ours = sorted(p.name for p in art.iterdir() if p != other and p.name != TEMP_FOLDER)
    assert ours  # the study's own model files
    crafted = {"absolute": str(victim), "dotdot": f"../{victim.name}"}
    if where in crafted:
        meta = {"artifact_id": crafted[where], "filename": "x", "mimetype": "text/plain", "encoding": None}
        storage.set_study_system_attr(study_id, "artifacts:x", json.dumps(meta))
    elif where == "folder":  # the store itself pointed at the victim's folder, with its name as an id
        storage.set_study_system_attr(study_id, ARTIFACTS_ATTR, str(tmp_path))
        meta = {"artifact_id": victim.name, "filename": "x", "mimetype": "text/plain", "encoding": None}
        storage.set_study_system_attr(study_id, "artifacts:x", json.dumps(meta))
    else:
        storage.set_study_system_attr(study_id, UID_ATTR, "*")
    result = invoke(runner, "delete", "small", "--storage", storage_url, "--yes")
    assert result.exit_code == 0, result.output
    assert victim.read_text() == "precious" and other.exists()
    if where != "folder":
        assert sorted(p.name for p in art.iterdir()) == [other.name]  # its own files are gone


def test_a_crafted_checkpoint_id_is_refused_before_any_write(write_spec, runner, storage_url, tmp_path) -> None:
    from hpo.search.study import UID_ATTR
    from hpo.storage.backends import open_storage

    path = write_spec(small_spec(budget={"n_trials": 1, "epochs": 1}))
    assert invoke(runner, "create", path, "--storage", storage_url).exit_code == 0
    storage = open_storage(storage_url)
    storage.set_study_system_attr(storage.get_study_id_from_name("small"), UID_ATTR, "../../escape")
    result = invoke(runner, "run", path, "--storage", storage_url, "--n-trials", "2")
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        "Error: study 'small' has an invalid hpo:uid ('../../escape'); its database was edited by something "
        "other than hpo")
    assert not list(tmp_path.parent.glob("escape*"))


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://hpo:p@ss@db-host/hpo", "postgresql://hpo:***@db-host/hpo"),
    ("grpc://user:pw@127.0.0.1:1", "grpc://user:***@127.0.0.1:1"),
    ("postgresql://hpo@db-host/hpo?password=hunter2", "postgresql://hpo@db-host/hpo?password=***"),
])
def test_passwords_never_show_even_with_an_at_sign_or_in_the_query(runner, url, shown) -> None:
    from hpo.storage.urls import mask

    assert mask(url) == shown
    result = invoke(runner, "studies", "--storage", url)
    assert result.exit_code == 1 and shown in result.output
    for secret in ("p@ss", "ss@", ":pw@", "hunter2"):
        assert secret not in result.output


@pytest.mark.parametrize(("env", "args", "message"), [
    ({"HPO_STORAGE": ""}, [], "HPO_STORAGE is set but empty"),
    ({}, ["--storage", ""], "--storage: is empty"),
    ({}, ["--storage", "postgresql://"], "postgresql:// names no server or database"),
])
def test_a_blank_or_hostless_storage_is_a_mistake_not_the_default(runner, monkeypatch, env, args, message) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = invoke(runner, "studies", *args)
    assert result.exit_code == 1 and message in result.output
    assert not Path("hpo.db").exists()


def test_read_only_commands_create_no_schema(runner, tmp_path, pg_url) -> None:
    empty = tmp_path / "empty.db"
    empty.touch()
    for url in (f"sqlite:///{empty}", pg_url):
        for args in (["studies"], ["best", "x"], ["trials", "x"]):
            result = invoke(runner, *args, "--storage", url)
            assert result.exit_code == 1 and "it holds no Optuna tables" in result.output
    assert empty.stat().st_size == 0
    from sqlalchemy import create_engine, inspect

    engine = create_engine(pg_url)
    assert inspect(engine).get_table_names() == []
    engine.dispose()


def test_an_artifact_folder_that_is_a_file_is_refused_before_the_study_exists(write_spec, runner, storage_url,
                                                                             tmp_path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    result = invoke(runner, "run", write_spec(small_spec()), "--storage", storage_url, "--artifacts", blocker)
    assert result.exit_code == 1 and "cannot create artifact folder" in result.output
    import optuna

    assert optuna.get_all_study_summaries(storage_url) == []


def test_a_data_path_that_is_not_a_data_file_is_refused_without_reading_it(write_spec, runner) -> None:
    spec = small_spec(data={"dataset": "csv", "path": "/etc/passwd", "label": "label"})
    result = invoke(runner, "run", write_spec(spec))
    assert result.exit_code == 1
    assert result.output.strip() == "Error: data.path: /etc/passwd is not a .csv file"


def test_a_sqlite_file_on_a_network_filesystem_is_told_apart_from_a_local_one(tmp_path) -> None:
    """SQLite's locks and WAL mode do not hold across machines: hpo refuses to write a SQLite
    file on a network filesystem (read from the mount table, deepest mount point first)."""
    from hpo.storage.locks import network_filesystem

    info = ("22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n"
            "40 22 0:40 / /shared rw,relatime shared:5 - nfs4 srv:/export rw,vers=4.2\n"
            "41 40 0:41 / /shared/local rw,relatime - ext4 /dev/sdb1 rw\n"
            "42 22 0:42 / /mnt/my\\040share rw - cifs //srv/share rw\n")
    assert network_filesystem(Path("/shared/studies/hpo.db"), info) == "nfs4"
    assert network_filesystem(Path("/shared/local/hpo.db"), info) is None  # a local disk mounted below it
    assert network_filesystem(Path("/sharedother/hpo.db"), info) is None
    assert network_filesystem(Path("/mnt/my share/hpo.db"), info) == "cifs"
    assert network_filesystem(tmp_path / "hpo.db") is None  # this machine's temporary folder
