"""The ``infra/compose`` stack for real: built offline, brought up, a training run through it.

``infra/compose/build_offline.sh`` builds what a registry would otherwise provide (the Debian
bookworm base image with debootstrap, the Postgres image on top of it, the wheelhouse; each step
skipped when its result exists), then the stack comes up with ``docker-compose`` (v1.29) or
``docker compose`` (v2) under a unique project name on free host ports: Postgres, the Prefect
server on Postgres, the MLflow server (Postgres backend store, served artifacts on a volume) and
the worker running ``creditflow serve``. The test waits until all four are healthy (the worker:
its deployments are registered), triggers ``start-training/creditflow-train`` through the Prefect
API, waits for the flow run to complete, checks the MLflow run on the tracking server (status,
``checklist.*`` tags, credit metric, artifacts downloaded through the server) and that both
backends are the stack's Postgres databases. A finalizer always removes the containers, the
network and the volumes (``down -v``).

The worker gets ``DOCKER_SOCKET=/dev/null``: the run uses no docker sandbox, and the host
engine's ``creditflow/sandbox`` image is left alone (the worker logs a warning instead).

Skipped, with the missing piece and its install command, without docker / a compose CLI, and
(only when the base image still has to be built) without root, debootstrap or the Debian mirror.
The first build takes several minutes (debootstrap, wheels, image); see infra/README.md.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path
from typing import ClassVar

import pytest

from tests.server_support import _free_port, _wait_final, mlflow_run_of, prefect_client, wait_for_deployments

pytestmark = [pytest.mark.compose, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_DIR = ROOT / "infra" / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
BUILD_SCRIPT = COMPOSE_DIR / "build_offline.sh"
BASE_IMAGE = os.environ.get("BASE_IMAGE", "creditflow/base:bookworm")
POSTGRES_IMAGE = os.environ.get("POSTGRES_IMAGE", "creditflow/postgres:15-bookworm")
MIRROR = os.environ.get("MIRROR", "http://deb.debian.org/debian")
SERVICES = ("postgres", "prefect-server", "mlflow", "worker")
OVERRIDES = ["iterations=1", "eval_episodes=8", "tracking.heatmap_every=1"]


def _run(cmd: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kw)


def _compose_cli() -> list[str] | None:
    """``docker compose`` (v2 plugin) when it answers, else ``docker-compose`` (v1.29)."""
    try:
        if _run(["docker", "compose", "version"], timeout=20).returncode == 0:
            return ["docker", "compose"]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return ["docker-compose"] if shutil.which("docker-compose") else None


def _image_exists(tag: str) -> bool:
    return _run(["docker", "image", "inspect", tag]).returncode == 0


def _prerequisites() -> list[str]:
    """The compose CLI; skips (naming the missing piece and the fix) when something is absent."""
    if not shutil.which("docker"):
        pytest.skip("docker CLI not found: apt-get install -y docker.io")
    try:
        ok = _run(["docker", "info"], timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        ok = False
    if not ok:
        pytest.skip("Docker engine not reachable: start it (systemctl start docker, or "
                    "nohup dockerd > /tmp/dockerd.log 2>&1 &)")
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no compose CLI (neither `docker compose` nor `docker-compose`): "
                    "apt-get install -y docker-compose")
    if not _image_exists(BASE_IMAGE):  # build_offline.sh has to debootstrap it
        if os.geteuid() != 0:
            pytest.skip(f"building the base image {BASE_IMAGE} needs root (debootstrap, chroot): "
                        "run `sudo infra/compose/build_offline.sh` once")
        if not shutil.which("debootstrap"):
            pytest.skip(f"debootstrap not found (needed to build {BASE_IMAGE}): apt-get install -y debootstrap")
        try:
            urllib.request.urlopen(f"{MIRROR}/dists/bookworm/Release", timeout=15).close()
        except OSError as exc:
            pytest.skip(f"Debian mirror {MIRROR} not reachable ({exc}; needed to build {BASE_IMAGE}): "
                        "set MIRROR to a reachable Debian mirror")
    return cli


class _Stack:
    """A compose project; duck-types the ``_Procs`` of tests/server_support.py (``check_alive``,
    ``log``) for its ``_wait_final`` / ``wait_for_deployments``."""

    NAMES: ClassVar[dict[str, str]] = {"serve": "worker", "prefect-server": "prefect-server", "mlflow-server": "mlflow"}

    def __init__(self, cli: list[str], project: str, env: dict[str, str]):
        self.cli, self.project, self.env = cli, project, env

    def compose(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [*self.cli, "-p", self.project, "-f", str(COMPOSE_FILE), *args]
        proc = _run(cmd, timeout=timeout, env=self.env, cwd=ROOT)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd[len(self.cli):])} failed ({proc.returncode}):\n"
                                 f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        return proc

    def container(self, service: str) -> str:
        cid = self.compose("ps", "-q", service).stdout.strip()
        assert cid, f"no container for {service}"
        return cid

    def state(self, service: str) -> tuple[str, str]:
        """(status, health) of the service's container, e.g. ('running', 'healthy')."""
        out = _run(["docker", "inspect", "-f",
                    "{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}",
                    self.container(service)]).stdout.split()
        return (out[0], out[1]) if len(out) == 2 else ("unknown", "unknown")

    def log(self, name: str, chars: int = 4000) -> str:
        proc = self.compose("logs", "--no-color", "--tail", "200", self.NAMES.get(name, name), check=False)
        return (proc.stdout + proc.stderr)[-chars:]

    def check_alive(self, *names: str) -> None:
        for name in names:
            service = self.NAMES.get(name, name)
            status, _ = self.state(service)
            if status != "running":
                raise AssertionError(f"{service} is {status}:\n{self.log(service)}")

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            states = {s: self.state(s) for s in SERVICES}
            if all(st == ("running", "healthy") for st in states.values()):
                return
            broken = [s for s, (status, _) in states.items() if status in ("exited", "dead")]
            if broken or time.monotonic() > deadline:
                raise AssertionError(f"stack not healthy: {states}\n" +
                                     "\n".join(f"--- {s}\n{self.log(s)}" for s in SERVICES))
            time.sleep(2)

    def psql(self, user: str, db: str, sql: str) -> str:
        return self.compose("exec", "-T", "postgres", "psql", "-U", user, "-d", db, "-tAc", sql).stdout.strip()


@pytest.fixture()
def stack():
    cli = _prerequisites()
    t0 = time.monotonic()
    build = subprocess.run(["sh", str(BUILD_SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=3600, check=False,
                           env=dict(os.environ, NO_ENV="1", BASE_IMAGE=BASE_IMAGE, POSTGRES_IMAGE=POSTGRES_IMAGE))
    assert build.returncode == 0, f"build_offline.sh failed:\n{build.stdout[-3000:]}\n{build.stderr[-3000:]}"
    print(f"[compose test] build_offline.sh: {time.monotonic() - t0:.0f} s", flush=True)
    for line in build.stdout.splitlines():  # its timings (with -s)
        if " took " in line or "skipped" in line:
            print(f"[compose test]   {line}", flush=True)

    pport, mport = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "COMPOSE_"))}
    env.update(
        PYTHON_IMAGE=BASE_IMAGE, POSTGRES_IMAGE=POSTGRES_IMAGE,
        POSTGRES_PASSWORD=secrets.token_urlsafe(18), MLFLOW_DB_PASSWORD=secrets.token_urlsafe(18),
        BIND_ADDRESS="127.0.0.1", PREFECT_PORT=str(pport), MLFLOW_PORT=str(mport),
        PREFECT_UI_API_URL=f"http://127.0.0.1:{pport}/api", PREFECT_UI_URL=f"http://127.0.0.1:{pport}",
        CREDITFLOW_POLL_INTERVAL="2", CREDITFLOW_MAX_RUNS="1", CREDITFLOW_SERVE_ARGS="",
        CREDITFLOW_JUDGE_API_KEY="", DOCKER_SOCKET="/dev/null",
    )
    project = f"cftest{uuid.uuid4().hex[:8]}"
    st = _Stack(cli, project, env)
    try:
        t1 = time.monotonic()
        st.compose("up", "-d", "--build", timeout=1800)
        print(f"[compose test] up --build: {time.monotonic() - t1:.0f} s", flush=True)
        st.wait_healthy(timeout=600)
        print(f"[compose test] all four services healthy: {time.monotonic() - t1:.0f} s after `up`", flush=True)
        yield {"stack": st, "api_url": f"http://127.0.0.1:{pport}/api", "mlflow_url": f"http://127.0.0.1:{mport}"}
    finally:
        down = st.compose("down", "-v", "--remove-orphans", "--timeout", "20", timeout=300, check=False)
        left = _run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={project}"]).stdout
        vols = _run(["docker", "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={project}"]).stdout
        assert down.returncode == 0 and not left.strip() and not vols.strip(), (down.stderr, left, vols)


def test_compose_stack_trains_and_tracks(stack, tmp_path):
    from mlflow.tracking import MlflowClient
    from prefect.deployments import run_deployment

    from flows.serve import TRAIN

    st: _Stack = stack["stack"]
    t0 = time.monotonic()
    with prefect_client(stack["api_url"]) as client:
        wait_for_deployments(client, st, timeout=30)  # the worker is healthy only once they are registered
        fr = run_deployment(TRAIN, parameters={"experiment": "quickstart", "overrides": OVERRIDES},
                            timeout=0, as_subflow=False)
        fr = _wait_final(client, fr.id, st, timeout=1200)
        assert fr.state.is_completed(), (fr.state, st.log("serve"))
        print(f"[compose test] training flow run completed: {time.monotonic() - t0:.0f} s", flush=True)

    ml = MlflowClient(tracking_uri=stack["mlflow_url"])
    run, _ = mlflow_run_of(stack["mlflow_url"], fr, st.log("serve"))
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert sum(k.startswith("checklist.") for k in tags) >= 14, sorted(tags)
    assert tags["checklist.compute.device_hours.status"] == "filled"
    assert tags["prefect.flow_run_id"]
    assert run.data.params["iterations"] == "1" and run.data.params["eval_episodes"] == "8"
    assert [m.step for m in ml.get_metric_history(run.info.run_id, "credit.mean")] == [0]
    assert "reward.success_rate" in run.data.metrics
    # artifacts: stored on the mlflow-artifacts volume, downloaded through the tracking server
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), run.info.artifact_uri
    assert {"checklist.json", "config", "heatmaps"} <= {a.path for a in ml.list_artifacts(run.info.run_id)}
    local = Path(ml.download_artifacts(run.info.run_id, "checklist.json", str(tmp_path)))
    assert json.loads(local.read_text())
    # both backends are the stack's Postgres: MLflow's runs table, Prefect's flow runs
    assert st.psql("mlflow", "mlflow", f"SELECT status FROM runs WHERE run_uuid = '{run.info.run_id}'") == "FINISHED"
    assert st.psql("prefect", "prefect", f"SELECT state_type FROM flow_run WHERE id = '{fr.id}'") == "COMPLETED"
