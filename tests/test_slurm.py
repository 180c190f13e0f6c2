"""The shipped Slurm job, run by a real Slurm: one node (this machine, its cores and memory),
Debian's slurm-wlm and munge, started by this module and stopped after it. The study is on
PostgreSQL; the user's training code is a package outside the repository."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import env_without_storage, invoke, missing, user_package

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "deploy" / "slurm" / "hpo-worker.sbatch"

PACKAGE = '''
import os, time
import torch
from torch import nn
from sklearn.datasets import load_digits

_x, _y = load_digits(return_X_y=True)
X = torch.tensor(_x, dtype=torch.float32) / 16.0
Y = torch.tensor(_y)


def train(trial):
    torch.manual_seed(trial.seed % 2**31)
    model = nn.Sequential(nn.Linear(64, trial.params["hidden"]), nn.ReLU(), nn.Linear(trial.params["hidden"], 10))
    opt = torch.optim.SGD(model.parameters(), lr=trial.params["lr"])
    state = trial.load_checkpoint()
    if state:
        model.load_state_dict(state["model"])
    for epoch in range(trial.start_epoch, trial.epochs):
        time.sleep(float(os.environ.get("EPOCH_SECONDS", "0")))  # a long epoch, for the time limit
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[:1200]), Y[:1200]).backward()
            opt.step()
        with torch.no_grad():
            acc = (model(X[1200:]).argmax(1) == Y[1200:]).float().mean().item()
        trial.report(epoch, val_acc=acc)
        trial.save_checkpoint({"model": model.state_dict()})
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _munge() -> None:
    """munged, as the munge user, unless one answers already."""
    if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
        return
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
    for _ in range(50):
        if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    raise AssertionError("munged did not start")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A one-node Slurm cluster for this module: slurmctld and slurmd on this machine, its
    configuration in a temporary folder (SLURM_CONF), CPU-only."""
    tools = ["/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/sbin/munged"]
    if not all(Path(t).exists() for t in tools) or shutil.which("sbatch") is None:
        missing("Slurm is not installed (apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        missing("starting a Slurm cluster here needs root")
    _munge()
    folder = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname().split(".")[0]
    memory = int(int(Path("/proc/meminfo").read_text().split()[1]) / 1024 * 0.8)
    conf = folder / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=hpotest", f"SlurmctldHost={host}(127.0.0.1)", "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", "CredType=cred/munge",
        f"StateSaveLocation={folder}/state", f"SlurmdSpoolDir={folder}/spool",
        f"SlurmctldPidFile={folder}/slurmctld.pid", f"SlurmdPidFile={folder}/slurmd.pid",
        f"SlurmctldLogFile={folder}/slurmctld.log", f"SlurmdLogFile={folder}/slurmd.log",
        f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core", "SchedulerType=sched/backfill", "MpiDefault=none", "ReturnToService=2",
        "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={memory} State=UNKNOWN",
        "PartitionName=cpu Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]))
    (folder / "state").mkdir()
    (folder / "spool").mkdir()
    env = {"SLURM_CONF": str(conf)}
    subprocess.run(["/usr/sbin/slurmctld", "-f", str(conf), "-i"], check=True)
    subprocess.run(["/usr/sbin/slurmd", "-f", str(conf)], check=True)
    try:
        for _ in range(300):
            up = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=os.environ | env)
            if up.stdout.strip() == "idle":
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"the Slurm node did not come up: {up.stdout} {up.stderr}")
        yield env
    finally:
        for daemon in ("slurmd", "slurmctld"):
            pid = folder / f"{daemon}.pid"
            if pid.exists():
                try:
                    os.kill(int(pid.read_text()), 15)
                except (ProcessLookupError, ValueError):
                    pass


@pytest.fixture
def study_env(slurm, pg_url, tmp_path, monkeypatch, write_spec, runner) -> dict[str, str]:
    """A study created on PostgreSQL, and the environment sbatch passes to its tasks."""
    user_package(tmp_path, monkeypatch, "slurmpkg", {"digits": PACKAGE})
    spec = {
        "name": "onslurm", "train": "slurmpkg.digits:train", "metric": "val_acc", "direction": "maximize",
        "seed": 0, "space": {"lr": {"type": "float", "low": 1e-2, "high": 0.5, "log": True},
                             "hidden": {"type": "int", "low": 8, "high": 64, "log": True}},
        "sampler": {"name": "tpe", "n_startup_trials": 10}, "pruner": {"name": "none"},
        "budget": {"n_trials": 6, "epochs": 4},
    }
    created = invoke(runner, "create", write_spec(spec), "--storage", pg_url)
    assert created.exit_code == 0, created.output
    bin_dir = str(Path(sys.executable).parent)  # where `hpo` is installed, as on the user's PATH
    return env_without_storage() | slurm | {"HPO_STORAGE": pg_url, "HPO_CHECKPOINT_INTERVAL": "0",
                                            "PATH": bin_dir + os.pathsep + os.environ["PATH"]}


def sbatch(env: dict[str, str], cwd: Path, *options: str) -> tuple[int, list[str]]:
    """Submit the shipped job file, unchanged, as the README says; wait for every task; return
    sbatch's exit status and the tasks' logs."""
    done = subprocess.run(["sbatch", "--wait", "--array=0-1", "--cpus-per-task=1", "--mem=2G",
                           f"--output={cwd}/task-%A_%a.out", *options, str(SBATCH), "onslurm"],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.stdout.startswith("Submitted batch job"), done.stderr
    return done.returncode, [p.read_text() for p in sorted(cwd.glob("task-*.out"))]


def test_the_shipped_job_file_runs_an_array_of_workers_to_the_studys_budget(study_env, pg_url, tmp_path) -> None:
    code, logs = sbatch(study_env, tmp_path)
    assert code == 0 and len(logs) == 2, logs
    assert not any("Traceback" in log or "Error" in log for log in logs), logs
    # Each task owns the CPU Slurm gave it: one thread each, and neither waits for the other.
    assert all("worker 1 of 1 on this host: 1 thread of 1 usable CPU (SLURM_CPUS_PER_TASK)" in log for log in logs), logs
    assert all("trial " in log and "busy with other workers" not in log for log in logs), logs
    trials = optuna.load_study(study_name="onslurm", storage=pg_url).trials
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 6 and len(trials) == 6
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 6  # no configuration twice


def test_a_job_past_its_time_limit_queues_its_trials_and_a_resubmission_finishes_them(study_env, pg_url,
                                                                                       tmp_path) -> None:
    """A one-minute limit with Slurm's warning signal 50 s before it: each task's trial in flight
    (epochs of 4 s) is queued with its checkpoint, and the next submission resumes it."""
    code, logs = sbatch(study_env | {"EPOCH_SECONDS": "4"}, tmp_path, "--time=1", "--signal=B:TERM@50")
    assert code != 0, logs  # the tasks were stopped, and say so
    assert sum("is queued and resumes from epoch" in log for log in logs) >= 1, logs
    assert not any("Traceback" in log for log in logs), logs
    trials = optuna.load_study(study_name="onslurm", storage=pg_url).trials
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    queued = [t for t in trials if t.state == TrialState.WAITING]
    assert queued, [(t.number, t.state) for t in trials]
    for log in tmp_path.glob("task-*.out"):
        log.unlink()
    code, logs = sbatch(study_env, tmp_path)
    assert code == 0, logs
    trials = optuna.load_study(study_name="onslurm", storage=pg_url).trials
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 6
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    resumed = [t for t in trials if "failed_trial" in t.system_attrs and t.user_attrs.get("resumed_from_epoch")]
    assert resumed, "no trial resumed from its checkpoint"


def test_the_shipped_job_file_runs_trials_of_two_processes_when_told_to(study_env, pg_url, tmp_path) -> None:
    """The several-processes-per-trial variant the job file's header gives
    (--export=ALL,HPO_PROCS_PER_TRIAL=2), on CPUs: each task's two CPUs are split between a
    trial's two processes (gloo)."""
    code, logs = sbatch(study_env | {"HPO_PROCS_PER_TRIAL": "2"}, tmp_path, "--cpus-per-task=2")
    assert code == 0 and len(logs) == 2, logs
    assert not any("Traceback" in log or "Error" in log for log in logs), logs
    assert all("2 processes per trial" in log for log in logs), logs
    trials = optuna.load_study(study_name="onslurm", storage=pg_url).trials
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 6
    assert all(t.user_attrs["processes"] == 2 and t.user_attrs["threads"] == 1 for t in trials)
