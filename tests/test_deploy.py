"""docker-compose, the Dockerfile, Slurm and Kubernetes files: parsed, since no engine runs here."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hpo.cli.run import cli
from tests.conftest import missing

ROOT = Path(__file__).resolve().parents[1]
VAR = re.compile(r"\$\{(\w+)(?::[-?]([^}]*))?\}")


def substitute(text: str) -> str:
    """Replace ${VAR:-default} by its default (or a placeholder), as compose would with no .env."""
    return VAR.sub(lambda m: (m.group(2) or f"<{m.group(1)}>").split(" ")[0], text)


def parses_as_hpo_command(argv: list[str]) -> None:
    """The command exists in the CLI and click accepts its options."""
    assert argv[0] == "hpo", argv
    name, rest = argv[1], argv[2:]
    assert name in cli.commands, f"hpo {name} is not a command"
    command = cli.commands[name]
    args = [substitute(a) for a in rest]
    with command.make_context(name, list(args)) as ctx:
        # Every option given reached the command with a value (not its default of None/False).
        for opt in (a for a in args if a.startswith("--")):
            key = opt.lstrip("-").split("=")[0].replace("-", "_")
            assert ctx.params.get(key) not in (None, False), f"{opt} did not reach hpo {name}"


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_services_healthchecks_and_dependencies() -> None:
    c = compose()
    services = c["services"]
    assert {"postgres", "dashboard", "worker"} <= set(services)
    pg = services["postgres"]
    assert pg["image"].startswith("postgres:")
    assert pg["healthcheck"]["test"] and "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert any(v.startswith("pgdata:") for v in pg["volumes"]) and "pgdata" in c["volumes"]
    for name in ("dashboard", "worker"):
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["worker"]["depends_on"]["create"]["condition"] == "service_completed_successfully"
    assert services["dashboard"]["ports"] == ["127.0.0.1:8080:8080"]


def test_compose_worker_scales_with_a_gpu_each() -> None:
    worker = compose()["services"]["worker"]
    assert "container_name" not in worker and "ports" not in worker  # --scale worker=N works
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "build" in worker


def test_compose_commands_exist_in_the_cli() -> None:
    services = compose()["services"]
    for name in ("create", "dashboard", "worker"):
        parses_as_hpo_command(services[name]["command"])
    assert services["worker"]["command"][1] == "worker"


def test_no_secret_is_inline() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    for url in re.findall(r"\w+://[^\s\"']+", text):
        creds = re.match(r"\w+://([^@/]*)@", url)
        if creds and ":" in creds.group(1):
            password = creds.group(1).split(":", 1)[1]
            assert password.startswith("${"), f"inline password in {url}"
    for service in compose()["services"].values():
        for key, value in (service.get("environment") or {}).items():
            if "PASSWORD" in key or "SECRET" in key:
                assert str(value).startswith("${"), f"{key} is inline"
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    example = (ROOT / ".env.example").read_text()
    assert "POSTGRES_PASSWORD=" in example


def test_dockerfile_installs_hpo_without_another_torch() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM pytorch/pytorch:", text, re.M)
    assert "pip install" in text and "[postgres]" in text
    assert "STOPSIGNAL SIGTERM" in text


def _shell_files() -> list[Path]:
    return sorted(p for p in (ROOT / "deploy").rglob("*") if p.is_file() and (
        p.suffix in (".sh", ".sbatch") or p.read_text(errors="replace").startswith("#!/bin/bash")))


@pytest.mark.parametrize("path", _shell_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shell_file_parses_in_bash_and_passes_shellcheck(path: Path) -> None:
    """Read by bash, checked by bash: `bash -n` (a quote that opens inside ${...} kills every
    array task at line 1 of its run), then shellcheck."""
    parsed = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert parsed.returncode == 0, parsed.stderr
    if shutil.which("shellcheck") is None:
        missing("shellcheck is not installed (apt-get install shellcheck)")
    checked = subprocess.run(["shellcheck", str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout


def test_the_slurm_job_runs_hpo_worker_on_the_device_slurm_gives_it() -> None:
    text = (ROOT / "deploy" / "slurm" / "hpo-worker.sbatch").read_text()
    assert re.search(r"^#SBATCH --array=", text, re.M) and "#SBATCH --gres" not in text  # a GPU: --gres=gpu:1
    assert re.search(r"^#SBATCH --signal=B?:?TERM", text, re.M)
    line = next(ln for ln in text.splitlines() if ln.startswith("exec hpo "))
    argv = ["digits_mlp" if a == "$STUDY" else a for a in shlex.split(line.removeprefix("exec "))]
    assert argv[argv.index("--device") + 1] == "auto"
    parses_as_hpo_command(argv)


def test_kubernetes_job_takes_the_storage_from_a_secret() -> None:
    job = yaml.safe_load((ROOT / "deploy" / "k8s" / "hpo-worker-job.yaml").read_text())
    assert job["kind"] == "Job" and job["spec"]["parallelism"] >= 2
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    parses_as_hpo_command(container["command"])
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env["HPO_STORAGE"]["valueFrom"]
    assert "value" not in env["HPO_STORAGE"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["terminationGracePeriodSeconds"] >= 60


def _tool(name: str) -> str:
    """A validator installed with the test dependencies, beside this Python."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        missing(f"{name} is not installed (pip install -e '.[dev]')")
    return str(path)


@pytest.mark.parametrize("manifest", ["hpo-worker-job.yaml", "hpo-ddp-worker-job.yaml"])
def test_the_kubernetes_job_validates_against_kubernetes_own_schemas(manifest: str) -> None:
    """Strict (no property Kubernetes does not know), offline, for a current Kubernetes."""
    done = subprocess.run([_tool("kubernetes-validate"), "--strict", "-k", "1.31.0",
                           str(ROOT / "deploy" / "k8s" / manifest)], capture_output=True, text=True)
    assert done.returncode == 0 and "passed" in done.stdout, done.stdout + done.stderr


def test_the_several_gpus_per_trial_job_gives_each_pod_as_many_gpus_as_processes_per_trial() -> None:
    job = yaml.safe_load((ROOT / "deploy" / "k8s" / "hpo-ddp-worker-job.yaml").read_text())
    container = job["spec"]["template"]["spec"]["containers"][0]
    parses_as_hpo_command(container["command"])
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert int(env["HPO_PROCS_PER_TRIAL"]) == container["resources"]["limits"]["nvidia.com/gpu"] == 2


def test_docker_compose_validates_against_the_compose_specification() -> None:
    done = subprocess.run([_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                           str(ROOT / "docker-compose.yml")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_hpo_variable_the_cluster_files_set_is_one_hpo_reads() -> None:
    """An environment variable spelled wrong in a manifest is silently ignored by hpo."""
    names = set()
    for service in compose()["services"].values():
        names |= set(service.get("environment") or {})
    for manifest in (ROOT / "deploy" / "k8s").glob("*.yaml"):
        job = yaml.safe_load(manifest.read_text())
        names |= {e["name"] for c in job["spec"]["template"]["spec"]["containers"] for e in c.get("env", [])}
    names |= set(re.findall(r"\b(HPO_\w+)=", (ROOT / "deploy" / "slurm" / "hpo-worker.sbatch").read_text()))
    source = "\n".join(p.read_text() for p in (ROOT / "hpo").rglob("*.py"))
    read = {n for n in names if n.startswith("HPO_") and f'"{n}"' in source}
    assert {n for n in names if n.startswith("HPO_")} == read and read, names


def test_workers_use_the_artifact_folder_the_study_was_created_with_and_say_when_told_otherwise(
        write_spec, runner, pg_url, tmp_path, monkeypatch) -> None:
    """`hpo create` on a laptop records the study's folder; a worker elsewhere uses it, unless
    --artifacts or HPO_ARTIFACTS point it at another one, which it says in one line."""
    from tests.conftest import invoke, small_spec

    shared = tmp_path / "shared-artifacts"
    spec = write_spec(small_spec(name="places", budget={"n_trials": 1, "epochs": 1}))
    assert invoke(runner, "create", spec, "--storage", pg_url, "--artifacts", str(shared)).exit_code == 0
    monkeypatch.delenv("HPO_ARTIFACTS", raising=False)
    plain = invoke(runner, "worker", "places", "--storage", pg_url, "--quiet")
    assert plain.exit_code == 0, plain.output
    assert "Note: artifacts go to" not in plain.output and any(shared.rglob("*"))
    elsewhere = tmp_path / "elsewhere"
    monkeypatch.setenv("HPO_ARTIFACTS", str(elsewhere))
    told = invoke(runner, "worker", "places", "--storage", pg_url, "--quiet")
    assert told.exit_code == 0, told.output
    notes = [ln for ln in told.output.splitlines() if ln.startswith("Note: artifacts go to")]
    assert notes == [f"Note: artifacts go to {elsewhere} (the artifact folder this worker was given, or "
                     f"HPO_ARTIFACTS), not to the study's folder {shared}; trials this worker resumes find no "
                     "checkpoint from workers that use the study's folder"], told.output
