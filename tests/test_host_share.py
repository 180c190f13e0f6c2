"""Workers that share a machine share it: each `hpo worker` takes its share of the CPUs it may use
(affinity, a cgroup quota), divided among the hpo workers of the host, read again before every
trial; `--threads` and OMP_NUM_THREADS win; GPUs are picked distinct first. Real processes, real
flock'ed slot files, a real cgroup, user code in a package outside the repository."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from hpo.execution.share import HostSlot, cgroup_quota, pick_gpu, usable_cpus
from tests.conftest import env_without_storage, invoke, missing, wait_for
from tests.test_every_trial_counts import spec, trials, user_pkg  # noqa: F401  (the user's package fixture)

GATE = '''
import os, time
from fastpkg.digits import train as _train


def train(trial):
    if trial.number == int(os.environ["GATE_AT"]):  # hold here until the test has changed the host
        open(os.environ["MARKER"], "a").close()
        while not os.path.exists(os.environ["MARKER"] + ".go"):
            time.sleep(0.01)
    return _train(trial)
'''


@pytest.fixture
def slots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's own host-wide slot folder, so other hpo processes on the machine do not count."""
    folder = tmp_path / "slots"
    monkeypatch.setenv("HPO_SLOTS_DIR", str(folder))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    return folder


def _created(runner, write_spec, url: str, n_trials: int, train: str = "fastpkg.digits:train") -> None:
    assert invoke(runner, "create", write_spec(spec(n_trials=n_trials, train=train)), "--storage", url).exit_code == 0


def _worker(url: str, *args: str, prefix: tuple[str, ...] = (), env: dict | None = None, cwd: Path
            ) -> subprocess.CompletedProcess:
    env = (env or env_without_storage()) | {"HPO_SLOTS_DIR": os.environ["HPO_SLOTS_DIR"]}
    return subprocess.run([*prefix, sys.executable, "-m", "hpo", "worker", "fast", "--storage", url, *args],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def _busy_worker_and_one_more(env: dict, url: str, study: str, cwd: Path) -> tuple[subprocess.Popen, subprocess.Popen]:
    """A process that holds slot 0 and keeps a CPU busy (a worker training), then `hpo worker`
    bound to one CPU: the second worker of the host, past its usable CPUs."""
    other = subprocess.Popen([sys.executable, "-c", "from hpo.execution.share import HostSlot; s = HostSlot(); "
                              "print(s.index, flush=True)\nwhile True: pass"], env=env, stdout=subprocess.PIPE,
                             text=True)
    assert other.stdout is not None and other.stdout.readline().strip() == "0"
    proc = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-m", "hpo", "worker", study, "--storage", url],
                            env=env, cwd=cwd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    return other, proc


def test_a_worker_bound_to_one_cpu_trains_on_one_thread_and_says_so(user_pkg, write_spec, runner, slots,  # noqa: F811
                                                                     storage_url, tmp_path) -> None:
    _created(runner, write_spec, storage_url, 2)
    done = _worker(storage_url, prefix=("taskset", "-c", "0"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "worker 1 of 1 on this host: 1 thread of 1 usable CPU, storage" in done.stderr
    assert [t.user_attrs["threads"] for t in trials(storage_url)] == [1, 1]


@pytest.mark.slow
def test_threads_and_omp_num_threads_win_over_the_share(user_pkg, write_spec, runner, slots, storage_url,  # noqa: F811
                                                        tmp_path) -> None:
    _created(runner, write_spec, storage_url, 2)
    done = _worker(storage_url, "--threads", "2", "--n-trials", "1", prefix=("taskset", "-c", "0"), cwd=tmp_path)
    assert done.returncode == 0 and "2 threads (as asked) of 1 usable CPU" in done.stderr, done.stderr
    env = env_without_storage() | {"OMP_NUM_THREADS": "3"}
    done = _worker(storage_url, env=env, cwd=tmp_path)
    assert done.returncode == 0 and "3 threads (as asked)" in done.stderr, done.stderr
    assert [t.user_attrs["threads"] for t in trials(storage_url)] == [2, 3]


@pytest.mark.slow
def test_workers_on_one_host_split_its_cpus_and_the_share_follows_them(user_pkg, write_spec, runner, slots,  # noqa: F811
                                                                        storage_url, tmp_path) -> None:
    """Another worker holds a slot (as every worker does); this one takes half the CPUs. The other
    is killed with kill -9 while trial 2 runs: from the next trial on, this one takes them all."""
    cpus = usable_cpus().count
    if cpus < 2:
        missing("this test needs 2 usable CPUs")
    (user_pkg / "fastpkg" / "gate.py").write_text(GATE)
    _created(runner, write_spec, storage_url, 5, train="fastpkg.gate:train")
    other = subprocess.Popen([sys.executable, "-c", "import sys, time; from hpo.execution.share import HostSlot; "
                              "s = HostSlot(); print(s.index, flush=True); time.sleep(600)"],
                             env=env_without_storage() | {"HPO_SLOTS_DIR": str(slots)}, stdout=subprocess.PIPE,
                             text=True)
    assert other.stdout is not None and other.stdout.readline().strip() == "0"
    marker = tmp_path / "marker"
    env = env_without_storage() | {"HPO_SLOTS_DIR": str(slots), "GATE_AT": "2", "MARKER": str(marker)}
    proc = subprocess.Popen([sys.executable, "-m", "hpo", "worker", "fast", "--storage", storage_url], env=env,
                            cwd=tmp_path, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    wait_for(lambda: marker.exists() or proc.poll() is not None, "trial 2")
    os.kill(other.pid, signal.SIGKILL)
    other.wait()
    Path(str(marker) + ".go").touch()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"worker 2 of 2 on this host: {cpus // 2} thread" in err
    assert [t.user_attrs["threads"] for t in trials(storage_url)] == [cpus // 2] * 3 + [cpus] * 2


@pytest.mark.slow
def test_a_cgroup_cpu_quota_bounds_the_threads(user_pkg, write_spec, runner, slots, storage_url,  # noqa: F811
                                               tmp_path) -> None:
    """A container's or pod's CPU limit below the machine's cores: torch counts the cores, hpo the quota."""
    base = Path("/sys/fs/cgroup/cpu")
    if not os.access(base, os.W_OK) and not os.access(Path("/sys/fs/cgroup"), os.W_OK):
        missing("no writable cgroup CPU controller to make a quota in")
    group = base / f"hpo-test-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text("100000")  # one CPU's worth
    except OSError as e:
        missing(f"cannot make a cgroup with a CPU quota here ({e})")
    try:
        _created(runner, write_spec, storage_url, 1)
        env = env_without_storage() | {"HPO_SLOTS_DIR": str(slots)}
        done = subprocess.run(["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$0" -m hpo worker fast '
                               f"--storage {storage_url}", sys.executable], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert "1 thread of 1 usable CPU (cgroup quota)" in done.stderr
        assert [t.user_attrs["threads"] for t in trials(storage_url)] == [1]
    finally:
        group.rmdir()


def test_cgroup_v2_cpu_max_is_read_up_the_tree(tmp_path) -> None:
    root = tmp_path / "cgroup"
    (root / "kubepods" / "pod1").mkdir(parents=True)
    (root / "kubepods" / "cpu.max").write_text("max 100000\n")
    (root / "kubepods" / "pod1" / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs
    proc = tmp_path / "self-cgroup"
    proc.write_text("0::/kubepods/pod1\n")
    assert cgroup_quota(root, proc) == 1.5
    (root / "kubepods" / "cpu.max").write_text("50000 100000\n")  # a parent's tighter limit wins
    assert cgroup_quota(root, proc) == 0.5
    proc.write_text("0::/\n")
    assert cgroup_quota(root, proc) is None


def test_gpus_are_taken_distinct_first_then_round_robin(slots) -> None:
    held = [HostSlot() for _ in range(5)]
    try:
        assert [s.index for s in held] == [0, 1, 2, 3, 4]
        assert [pick_gpu(s.index, [4, 7, 9]) for s in held] == [4, 7, 9, 4, 7]
        held[1].close()  # a worker ends: the next one takes its slot, and its GPU
        again = HostSlot()
        assert again.index == 1 and pick_gpu(again.index, [4, 7, 9]) == 7
        assert held[0].held() == [0, 1, 2, 3, 4]
        again.close()
    finally:
        for s in held:
            s.close()


def test_three_workers_count_each_other(slots) -> None:
    """Slots held by live processes count; a process killed with kill -9 frees its slot."""
    code = "import time; from hpo.execution.share import HostSlot; s = HostSlot(); print(s.index, flush=True); time.sleep(600)"
    env = env_without_storage() | {"HPO_SLOTS_DIR": str(slots)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        assert sorted(int(p.stdout.readline()) for p in procs if p.stdout) == [0, 1]
        mine = HostSlot()
        assert mine.index == 2 and mine.held() == [0, 1, 2]
        procs[0].kill()
        procs[0].wait()
        assert len(mine.held()) == 2
        mine.close()
    finally:
        for p in procs:
            p.kill()
            p.wait()



def test_a_worker_past_the_hosts_cpus_waits_while_the_others_train_not_for_a_frozen_one(  # noqa: F811
        user_pkg, write_spec, runner, slots, storage_url, tmp_path) -> None:
    """One usable CPU, and another worker already busy on the host: this one says it waits and
    starts no trial (three workers on two cores then go as fast as two). The other is frozen
    (SIGSTOP): it uses no CPU, so this one goes on and trains, rather than wait for ever."""
    _created(runner, write_spec, storage_url, 2)
    other, proc = _busy_worker_and_one_more(env_without_storage() | {"HPO_SLOTS_DIR": str(slots)}, storage_url,
                                            "fast", tmp_path)
    try:
        assert proc.stderr is not None
        said = proc.stderr.readline()  # before its header: it waits before loading torch and the data
        assert said.strip() == ("worker 2 of 2 on this host: the 1 usable CPU is busy with other workers; it starts a "
                                "trial when one is free"), said
        assert trials(storage_url) == []  # it said so after looking: nothing started
        frozen = time.time()
        os.kill(other.pid, signal.SIGSTOP)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert "worker 2 of 2 on this host: 1 thread of 1 usable CPU" in err.splitlines()[0], err
        done = trials(storage_url)
        assert len(done) == 2 and all(t.datetime_start.timestamp() >= frozen - 1 for t in done)
        assert [t.user_attrs["threads"] for t in done] == [1, 1]
    finally:
        other.kill()
        other.wait()


def test_workers_on_other_cpus_or_in_another_slurm_task_keep_their_own_share(slots) -> None:
    """Only workers that may run on the same CPUs, in the same Slurm allocation, share them: two
    array tasks on one node each own their CPUs (seen on a real Slurm: the second task waited for
    the first), and so do workers bound to different cores."""
    if usable_cpus().count < 2:
        missing("this test needs 2 usable CPUs")
    env = env_without_storage() | {"HPO_SLOTS_DIR": str(slots)}
    holder = subprocess.Popen(["taskset", "-c", "1", sys.executable, "-c", "import time; from hpo.execution.share "
                               "import HostSlot; s = HostSlot(); print(s.index, flush=True); time.sleep(600)"],
                              env=env, stdout=subprocess.PIPE, text=True)
    probe = "from hpo.execution.share import HostSlot, share; print(share(HostSlot()).workers)"
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "0"

        def workers(*prefix: str, extra: dict | None = None) -> str:
            done = subprocess.run([*prefix, sys.executable, "-c", probe], env=env | (extra or {}),
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            return done.stdout.strip()

        assert workers() == "2"  # CPUs 0-1 overlap the holder's CPU 1
        assert workers("taskset", "-c", "0") == "1"  # CPU 0 alone: its own
        assert workers(extra={"SLURM_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "1"}) == "1"  # a Slurm task's own CPUs
    finally:
        holder.kill()
        holder.wait()


def test_a_worker_that_waits_for_a_cpu_ends_when_the_study_is_done_meanwhile(runner, write_spec, slots,
                                                                             storage_url, tmp_path) -> None:
    """The workers ahead used up the budget while it waited: it ends at once, with one line."""
    import optuna

    from tests.conftest import small_spec

    assert invoke(runner, "create", write_spec(small_spec(name="done", budget={"n_trials": 2, "epochs": 1})),
                  "--storage", storage_url).exit_code == 0
    other, proc = _busy_worker_and_one_more(env_without_storage() | {"HPO_SLOTS_DIR": str(slots)}, storage_url,
                                            "done", tmp_path)
    try:
        assert proc.stderr is not None and "busy with other workers" in proc.stderr.readline()
        study = optuna.load_study(study_name="done", storage=storage_url)
        for value in (0.5, 0.6):  # what the workers ahead finished meanwhile
            study.add_trial(optuna.trial.create_trial(value=value))
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert err.strip().splitlines()[-1] == "Stopped: study done used up its budget while this worker waited for a CPU."
        assert len(study.trials) == 2
    finally:
        other.kill()
        other.wait()
