"""Faults of disk and data (issue 43): files hpo writes are whole or absent, a checkpoint or a saved
model that cannot be read costs a warning or one line (never the study), a full disk is one line
and the trial resumes, on real SQLite and PostgreSQL, with a user package made outside the repo."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from tests.conftest import (
    env_without_storage,
    invoke,
    small_spec,
    user_package,
    wait_for,
)

# A training function whose state is one tensor: its first element counts the epochs trained, so a
# resumed trial shows where it resumed from. STOP_AT=E: Ctrl-C after epoch E's checkpoint, once.
PACKAGE = '''
import os, signal
import torch
import hpo


def train(trial):
    w = torch.zeros(int(os.environ.get("STATE_FLOATS", "64")))
    state = trial.load_checkpoint()
    if state is not None:
        w = state["w"].clone()
    for epoch in range(trial.start_epoch, trial.epochs):
        w += 1.0
        if epoch == 0 and os.environ.get("PRINT_KB"):
            print("x" * 1023 * int(os.environ["PRINT_KB"]))
        trial.report(epoch, score=float(w[0]) * trial.params["x"])
        trial.save_checkpoint({"w": w})
        marker = os.environ.get("MARKER", "")
        if os.environ.get("STOP_AT") == str(epoch) and marker and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C between two epochs


def test(trial):
    return {"test_score": float(trial.load_checkpoint()["w"][0])}
'''


def faults_spec(**overrides) -> dict:
    spec = {"name": "faults", "train": "faultpkg.train:train", "test": "faultpkg.train:test", "metric": "score",
            "direction": "maximize", "seed": 1, "space": {"x": {"type": "float", "low": 0.5, "high": 1.0}},
            "pruner": {"name": "none"}, "budget": {"n_trials": 2, "epochs": 6}}
    spec.update(overrides)
    return spec


@pytest.fixture
def faultpkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return user_package(tmp_path, monkeypatch, "faultpkg", {"train": PACKAGE})


def study_of(url: str, name: str = "faults") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=url)


def interrupted_at_epoch_3(runner, write_spec, url: str, tmp_path: Path, monkeypatch) -> tuple[Path, list[Path]]:
    """Run until Ctrl-C after epoch 3 (checkpoints of epochs 3 and 4 in the two slots); returns the
    spec and trial 0's checkpoint files, newest first."""
    spec = write_spec(faults_spec())
    monkeypatch.setenv("STOP_AT", "3")
    monkeypatch.setenv("MARKER", str(tmp_path / "marker"))
    result = invoke(runner, "run", spec, "--storage", url, "--artifacts", tmp_path / "art",
                    "--checkpoint-interval", "0")
    assert result.exit_code == 130, result.output
    monkeypatch.delenv("STOP_AT")
    from hpo.search.study import UID_ATTR, system_attrs

    uid = system_attrs(study_of(url))[UID_ATTR]
    files = [tmp_path / "art" / f"{uid}-trial0-{slot}.ckpt" for slot in "ab"]  # epoch 4 is in slot a
    assert all(f.is_file() for f in files)
    assert torch.load(files[0], weights_only=True)["epoch"] == 4
    return spec, files


@pytest.mark.parametrize("backend_url", ["sqlite", "postgresql"], indirect=True)
def test_a_torn_checkpoint_costs_one_warning_and_the_trial_resumes_from_the_one_before(
        faultpkg, write_spec, runner, backend_url, tmp_path, monkeypatch) -> None:
    spec, (newest, older) = interrupted_at_epoch_3(runner, write_spec, backend_url, tmp_path, monkeypatch)
    newest.write_bytes(newest.read_bytes()[:100])  # what a kill mid-write or a bad copy leaves
    result = invoke(runner, "run", spec, "--storage", backend_url, "--artifacts", tmp_path / "art")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "checkpoint" in line and line.startswith("hpo:")]
    assert warnings == [f"hpo: trial 1: checkpoint {newest}: truncated or torn (not a whole PyTorch file); the trial "
                        "resumes from epoch 3, the checkpoint before it"]
    trials = study_of(backend_url).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[1].user_attrs["resumed_from_epoch"] == 3
    assert sorted(trials[1].intermediate_values) == list(range(6))
    assert trials[1].value == pytest.approx(6 * trials[1].params["x"])  # the state of epoch 3, trained on


DAMAGE = {
    "truncated": lambda f: f.write_bytes(f.read_bytes()[:100]),
    "empty": lambda f: f.write_bytes(b""),
    "another format": lambda f: torch.save({"weights": torch.ones(3)}, f),
    "not a zip": lambda f: f.write_bytes(os.urandom(4096)),
    "missing": lambda f: f.unlink(),
}
SAID = {
    "truncated": "truncated or torn (not a whole PyTorch file)",
    "empty": "empty (0 bytes)",
    "another format": "not a checkpoint hpo wrote",
    "not a zip": "not a PyTorch file",
}


@pytest.mark.parametrize("backend_url", ["sqlite", "postgresql"], indirect=True)
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_trial_whose_checkpoints_cannot_be_read_starts_over_and_the_study_completes(
        faultpkg, write_spec, runner, backend_url, tmp_path, monkeypatch, damage) -> None:
    spec, files = interrupted_at_epoch_3(runner, write_spec, backend_url, tmp_path, monkeypatch)
    for f in files:
        DAMAGE[damage](f)
    result = invoke(runner, "run", spec, "--storage", backend_url, "--artifacts", tmp_path / "art")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("hpo: trial")]
    if damage == "missing":
        assert warnings == [f"hpo: trial 1: its checkpoint of epoch 4 is missing (no file {files[0]} or {files[1]}); "
                            "the trial starts over from epoch 0"]
    else:
        assert warnings == [f"hpo: trial 1: checkpoint {f}: {SAID[damage]}; the trial starts over from epoch 0"
                            for f in files]
    trials = study_of(backend_url).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert "resumed_from_epoch" not in trials[1].user_attrs
    assert trials[1].value == pytest.approx(6 * trials[1].params["x"])


# ---- saved models that cannot be read back ------------------------------------------------------


def _model_files(url: str, name: str, art: Path) -> tuple[int, Path, Path]:
    """The best trial's number, its own saved state and the study's scored model."""
    from optuna.artifacts import get_all_artifact_meta

    study = study_of(url, name)
    best = study.best_trial
    own = [m.artifact_id for m in get_all_artifact_meta(best, storage=study._storage) if m.filename == "model.pt"][-1]
    return best.number, art / own, art / study.user_attrs["test"]["model_artifact"]


@pytest.mark.parametrize("backend_url", ["sqlite", "postgresql"], indirect=True)
def test_a_best_model_that_cannot_be_read_is_one_line_and_the_next_run_saves_it_again(
        write_spec, runner, backend_url, tmp_path) -> None:
    """hpo's own loop: the scored model (best_model.pt) cut, then the trial's own state too."""
    import hpo

    art = tmp_path / "art"
    spec = write_spec(small_spec(budget={"n_trials": 3, "epochs": 2}, pruner={"name": "none"}))
    run = ["run", spec, "--storage", backend_url, "--artifacts", art]
    assert invoke(runner, *run).exit_code == 0
    number, own, scored = _model_files(backend_url, "small", art)
    scored.write_bytes(scored.read_bytes()[:100])

    shown = invoke(runner, "best", "small", "--storage", backend_url)
    assert shown.exit_code == 1
    assert f"Best trial #{number}" in shown.stdout  # what is known is shown
    assert shown.stderr.splitlines() == [
        f"Error: the best model of study small (trial {number}) cannot be read ({scored}: truncated or torn "
        f"({scored.stat().st_size} bytes, not a whole PyTorch file)); run the study again to score and save it anew: "
        "hpo run SPEC (or hpo worker small)"]
    exported = invoke(runner, "export", "small", "--storage", backend_url, "--artifacts", art, "--out",
                      tmp_path / "best.pt")
    assert exported.exit_code == 1 and not (tmp_path / "best.pt").exists()
    assert exported.stderr.startswith(f"Error: the best model of study small (trial {number}) cannot be read ({scored}: "
                                      "truncated or torn")
    assert len(exported.stderr.splitlines()) == 1 and "hpo run SPEC" in exported.stderr
    with pytest.raises(hpo.HpoError, match="cannot be read"):
        hpo.load_best("small", storage=backend_url, artifacts=str(art))

    again = invoke(runner, *run)  # the trial's own state is whole: scored again
    assert again.exit_code == 0, again.output
    assert invoke(runner, "best", "small", "--storage", backend_url).exit_code == 0
    assert hpo.load_best("small", storage=backend_url, artifacts=str(art)) is not None

    number, own, scored = _model_files(backend_url, "small", art)
    for f in (own, scored):
        f.write_bytes(f.read_bytes()[:100])
    failed = invoke(runner, *run)  # the test step cannot score it
    assert failed.exit_code == 1
    assert failed.stderr.splitlines()[-1] == (
        f"Error: the saved model of trial {number} of study small cannot be read ({own}: truncated or torn (not a "
        f"whole PyTorch file)); run trial {number} again to save it anew: hpo retry small {number}, then "
        "hpo run (or hpo worker small)")
    assert f"hpo retry small {number}" in invoke(runner, "best", "small", "--storage", backend_url).stderr

    queued = invoke(runner, "retry", "small", number, "--storage", backend_url)
    assert queued.exit_code == 0 and f"Queued trial {number} again" in queued.stdout
    fixed = invoke(runner, *run)
    assert fixed.exit_code == 0, fixed.output
    shown = invoke(runner, "best", "small", "--storage", backend_url)
    assert shown.exit_code == 0 and "Test accuracy of the best model" in shown.stdout
    model = hpo.load_best("small", storage=backend_url, artifacts=str(art))
    assert isinstance(model, torch.nn.Module)


def test_a_user_study_whose_best_state_cannot_be_read_names_the_trial_to_run_again(
        faultpkg, write_spec, runner, storage_url, tmp_path) -> None:
    import hpo

    art = tmp_path / "art"
    spec = write_spec(faults_spec())
    run = ["run", spec, "--storage", storage_url, "--artifacts", art]
    assert invoke(runner, *run).exit_code == 0
    number, own, _ = _model_files(storage_url, "faults", art)
    own.write_bytes(b"")
    for args in (["best", "faults"], ["export", "faults", "--out", tmp_path / "x.pt", "--artifacts", art]):
        result = invoke(runner, *args, "--storage", storage_url)
        assert result.exit_code == 1
        assert f"hpo retry faults {number}" in result.stderr.splitlines()[-1], result.stderr
    with pytest.raises(hpo.HpoError, match=f"run trial {number} again"):
        hpo.load_best("faults", storage=storage_url, artifacts=str(art))
    assert invoke(runner, "retry", "faults", number, "--storage", storage_url).exit_code == 0
    assert invoke(runner, *run).exit_code == 0
    state = hpo.load_best("faults", storage=storage_url, artifacts=str(art))
    assert float(state.state["w"][0]) == 6.0  # the trial's final state, saved again
    assert invoke(runner, "best", "faults", "--storage", storage_url).exit_code == 0


def test_retry_of_a_trial_that_is_not_complete_or_does_not_exist_is_one_line(write_spec, runner, storage_url) -> None:
    spec = write_spec(small_spec(budget={"n_trials": 2, "epochs": 2}))
    assert invoke(runner, "run", spec, "--storage", storage_url).exit_code == 0
    missing = invoke(runner, "retry", "small", "9", "--storage", storage_url)
    assert missing.exit_code == 1 and missing.stderr == "Error: study small has no trial 9 (it has 2)\n"


# ---- a full disk ---------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 512 KB tmpfs, made and removed by the test; skipped (failed under HPO_REQUIRE_ALL, as in
    CI) where this process may not mount one."""
    from tests.conftest import missing

    folder = tmp_path / "disk"
    folder.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(folder)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        missing(f"mounting a small tmpfs needs root (mount said: {made.stderr.strip()[:100]})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


# What fills the disk, and how: STATE_FLOATS makes the checkpoint and the model large, PRINT_KB
# the trial's log.
FILLS = {
    "checkpoint": ({"STATE_FLOATS": "50000"}, ["--checkpoint-interval", "0"], "trial 0's checkpoint"),
    "model": ({"STATE_FLOATS": "200000"}, ["--checkpoint-interval", "1000"], "trial 0's model.pt"),
    "log": ({"PRINT_KB": "600"}, ["--checkpoint-interval", "1000"], "trial 0's log"),
}


@pytest.mark.parametrize("fills", list(FILLS))
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_full_disk_is_one_line_the_trial_is_queued_and_resumes_once_there_is_space(
        faultpkg, write_spec, runner, storage_url, small_disk, monkeypatch, fills, workers) -> None:
    env, flags, what = FILLS[fills]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    spec = write_spec(faults_spec(budget={"n_trials": 1 if workers == "1" else 2, "epochs": 4}))
    run = ["run", spec, "--storage", storage_url, "--artifacts", small_disk, "--workers", workers, *flags]
    full = invoke(runner, *run)
    assert full.exit_code == 1, full.output
    last = full.stderr.splitlines()[-1]
    # With two workers both may meet the full disk, each in whatever it writes next (the other
    # trial's model, or the queued resume of the first, say): the run says the first, and how many more.
    written = re.escape(what) if workers == "1" else r"trial [0-9]+'s (log|checkpoint|model\.pt)"
    assert re.fullmatch(rf"Error: no space left on {re.escape(str(small_disk))} \([0-9.]+ [KM]?B free\) writing "
                        rf"{written}; free space and run again: the trial resumes from its last "
                        r"checkpoint( \(and 1 more\))?", last), full.stderr
    assert "Traceback" not in full.output
    trials = study_of(storage_url).trials
    stopped = [t for t in trials if t.state == TrialState.FAIL]
    assert stopped and all("no space left on" in t.user_attrs["reason"] for t in stopped)
    # Each configuration stopped is queued to resume (with two workers the second may take the
    # queued trial and meet the full disk again: the same configuration, queued once more).
    queued = {tuple(t.params.items()) for t in trials if t.state == TrialState.WAITING}
    assert {tuple(t.params.items()) for t in stopped} <= queued, full.output
    assert not list((small_disk / ".hpo-tmp").glob("*.tmp"))  # no half-written file left

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)  # space freed
    monkeypatch.delenv("PRINT_KB", raising=False)
    again = invoke(runner, *run)
    assert again.exit_code == 0, again.output
    done = study_of(storage_url).trials
    assert sum(t.state == TrialState.COMPLETE for t in done) == (1 if workers == "1" else 2)
    if fills == "checkpoint" and workers == "1":  # it resumed where its last checkpoint was (with two
        # workers the other trial's checkpoint may fill the disk before this one wrote its first)
        resumed = [t for t in done if t.system_attrs.get("retry_history") == [0]]
        assert resumed and resumed[0].user_attrs["resumed_from_epoch"] == 2
    shown = invoke(runner, "best", "faults", "--storage", storage_url)
    assert f"{len(stopped)} resumed" in shown.stdout and " fail" not in shown.stdout, shown.stdout


# ---- a kill at any moment of a write ------------------------------------------------------------


@pytest.mark.slow  # 20 runs of `hpo run`, each killed during a checkpoint write
def test_sigkill_during_checkpoint_writes_never_leaves_a_torn_file_and_the_study_completes(
        faultpkg, write_spec, tmp_path) -> None:
    """A 20 MB state checkpointed every epoch; each run is killed (SIGKILL, its whole process
    group) at a random moment while a checkpoint file is being written, 20 times; every file in
    the artifact folder is whole after each kill, and the next run completes the budget."""
    import random

    rng = random.Random(43)
    art, url = tmp_path / "art", f"sqlite:///{tmp_path / 'hpo.db'}"
    spec = write_spec(faults_spec(budget={"n_trials": 4, "epochs": 30}))  # more epochs than 20 runs get through
    cmd = [sys.executable, "-m", "hpo", "run", str(spec), "--storage", url, "--artifacts", str(art),
           "--checkpoint-interval", "0", "--workers", "1"]
    env = env_without_storage() | {"STATE_FLOATS": "5000000"}
    writing, resumed = art / ".hpo-tmp", 0
    errs: list[str] = []
    for kill in range(20):
        proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        skip = rng.randrange(3)  # writes to let through before the one killed in the middle of
        # what the writer killed before left behind is not a write of this run (it is swept)
        seen: set[str] = set(os.listdir(writing)) if writing.is_dir() else set()

        def in_a_write() -> bool:
            names = {n for n in (os.listdir(writing) if writing.is_dir() else []) if n.endswith(".tmp")}
            fresh = names - seen
            seen.update(names)
            return (bool(fresh) and len(seen) > skip) or proc.poll() is not None

        wait_for(in_a_write, f"a checkpoint being written (kill {kill})")
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(rng.uniform(0, 0.03))  # the moment of the kill, somewhere in the write (no result depends on it)
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        assert "cannot be read" not in err, err  # no run met a torn checkpoint
        resumed += "resuming from the checkpoint" in err
        errs.append(err)
        # a trial past the retry cap is said to be dropped, and only that
        assert not re.search(r"trial (\d+) lost its worker[^\n]*\n(.*\n)*.*trials? [0-9, ]*\b\1\b[0-9, ]* (was|were) left "
                             r"running", err), err
        for ckpt in art.glob("*.ckpt"):  # every checkpoint left is whole
            torch.load(ckpt, weights_only=True)
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "cannot be read" not in done.stderr
    trials = study_of(url).trials
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 4
    assert all(sorted(t.intermediate_values) == list(range(30)) for t in complete)
    # Most runs took back the trial the kill before left and resumed it from its checkpoint (a trial
    # killed more often than the retry cap is dropped, and a fresh one runs instead).
    assert resumed >= 10, (resumed, errs)
    assert not list(writing.glob("*.tmp"))  # what the killed writers left was swept


# ---- a study that cannot be read ------------------------------------------------------------------


@pytest.mark.parametrize("backend_url", ["sqlite", "postgresql"], indirect=True)
def test_listings_survive_a_study_whose_stored_spec_is_not_json_and_its_commands_say_so(
        write_spec, runner, backend_url, tmp_path) -> None:
    """What another tool or a bad migration leaves: a stored spec that is not valid JSON."""
    from sqlalchemy import create_engine, text

    for name in ("good", "broken"):
        spec = write_spec(small_spec(name=name, budget={"n_trials": 1, "epochs": 1}), f"{name}.yaml")
        assert invoke(runner, "run", spec, "--storage", backend_url).exit_code == 0
    engine = create_engine(backend_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE study_user_attributes SET value_json = '{\"name\": \"broken\", cut' WHERE key = 'spec' "
                          "AND study_id = (SELECT study_id FROM studies WHERE study_name = 'broken')"))
    engine.dispose()

    listed = invoke(runner, "studies", "--storage", backend_url)
    assert listed.exit_code == 0, listed.output
    rows = listed.stdout.splitlines()
    assert rows[1].split()[:3] == ["good", "1", "maximize"]
    assert rows[2].split()[0] == "broken" and rows[2].endswith("cannot be read: its user attribute 'spec' is not "
                                                                "valid JSON")
    said = ("Error: study 'broken' cannot be read: its user attribute 'spec' is not valid JSON (Expecting property "
            "name enclosed in double quotes: line 1 column 20 (char 19)); it was written by something other than hpo "
            "(hpo delete broken --yes)")
    for args in (["best", "broken"], ["show", "broken", "0"], ["trials", "broken"], ["worker", "broken"],
                 ["export", "broken", "--out", tmp_path / "x.pt"], ["run", tmp_path / "broken.yaml"]):
        result = invoke(runner, *args, "--storage", backend_url)
        assert result.exit_code == 1, (args, result.output)
        assert result.stderr.splitlines()[-1] == said, (args, result.stderr)
    assert invoke(runner, "best", "good", "--storage", backend_url).exit_code == 0
    assert invoke(runner, "delete", "broken", "--yes", "--storage", backend_url).exit_code == 0
    assert len(invoke(runner, "studies", "--storage", backend_url).stdout.splitlines()) == 2
