"""docker-compose, the Dockerfile, Slurm and Kubernetes files: parsed, since no engine runs here."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from hpo.cli.run import cli

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


def test_slurm_array_job_runs_hpo_worker() -> None:
    text = (ROOT / "deploy" / "slurm" / "hpo-worker.sbatch").read_text()
    assert re.search(r"^#SBATCH --array=", text, re.M) and "#SBATCH --gres=gpu:1" in text
    assert re.search(r"^#SBATCH --signal=B?:?TERM", text, re.M)
    line = next(ln for ln in text.splitlines() if ln.startswith("exec hpo "))
    argv = ["digits_mlp" if a == "$STUDY" else a for a in shlex.split(line.removeprefix("exec "))]
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
