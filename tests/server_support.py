"""Real local servers for the ``server`` tests: ``prefect server start`` (with its UI), ``mlflow
server`` and ``creditflow serve``, started once per test session (``tests/conftest.py``:
fixtures ``servers`` and ``served_training``) and shared by ``tests/test_serve.py`` and
``tests/test_browser.py``.

Each process runs in its own session and is stopped group by group in a finalizer (also on
failure); logs go to the session's ``servers/logs`` directory and are quoted in assertion
messages.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parent.parent

#: a tiny training: one iteration of 2 x 2 short episodes, a heatmap every iteration
TINY = [
    "iterations=1",
    "rollout.tasks_per_iteration=2",
    "rollout.group_size=2",
    "eval_episodes=2",
    "env.horizon=3",
    "env.num_decisive=1",
    "tracking.heatmap_every=1",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Procs:
    """Processes started by a test, each in its own session; stopped group by group."""

    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.logdir / f"{name}.log", "w")
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str, chars: int = 4000) -> str:
        path = self.logdir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.is_file() else ""

    def check_alive(self, *names: str) -> None:
        for name in names:
            rc = self.procs[name].poll()
            if rc is not None:
                raise AssertionError(f"{name} exited with {rc}:\n{self.log(name)}")

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 5
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
            try:  # the group: flow-run subprocesses of the runner, server workers
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()


def _wait_http(url: str, procs: _Procs, name: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        procs.check_alive(name)
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} not healthy at {url} after {timeout} s:\n{procs.log(name)}")
        time.sleep(0.3)


def _wait_final(client, flow_run_id, procs: _Procs, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while True:
        procs.check_alive("serve", "prefect-server", "mlflow-server")
        fr = client.read_flow_run(flow_run_id)
        if fr.state is not None and fr.state.is_final():
            return fr
        if time.monotonic() > deadline:
            raise AssertionError(f"flow run still {fr.state and fr.state.name} after {timeout} s:\n"
                                 f"{procs.log('serve')}")
        time.sleep(0.5)


@contextmanager
def running_servers(workdir: Path, home: Path) -> Iterator[dict[str, Any]]:
    """Prefect server (UI on) + MLflow server + ``creditflow serve`` polling every second, on free
    ports, state under ``workdir``, runs under ``home``; yields URLs and the process set."""
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    procs = _Procs(logs)
    pport, mport = _free_port(), _free_port()
    api_url, mlflow_url = f"http://127.0.0.1:{pport}/api", f"http://127.0.0.1:{mport}"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    base.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONUNBUFFERED="1")
    bindir = Path(sys.executable).parent
    try:
        procs.start("prefect-server", [str(bindir / "prefect"), "server", "start", "--host", "127.0.0.1",
                                       "--port", str(pport), "--analytics-off"],
                    # the UI otherwise calls http://127.0.0.1:4200/api whatever --port says
                    dict(base, PREFECT_HOME=str(workdir / "prefect-server-home"), PREFECT_LOGGING_LEVEL="WARNING",
                         PREFECT_UI_API_URL=api_url))
        procs.start("mlflow-server", [str(bindir / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mport),
                                      "--workers", "1",
                                      "--backend-store-uri", f"sqlite:///{workdir / 'mlflow-server.db'}",
                                      "--artifacts-destination", str(workdir / "mlflow-artifacts")], base)
        _wait_http(f"{api_url}/health", procs, "prefect-server")
        _wait_http(f"{mlflow_url}/health", procs, "mlflow-server")
        env = dict(base, PREFECT_API_URL=api_url, PREFECT_HOME=str(workdir / "prefect-client-home"),
                   MLFLOW_TRACKING_URI=mlflow_url, CREDITFLOW_HOME=str(home),
                   MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
        procs.start("serve", [sys.executable, "-m", "flows.serve", "--poll-interval", "1"], env)
        yield {"api_url": api_url, "mlflow_url": mlflow_url, "home": home, "procs": procs}
    finally:
        procs.stop_all()


@contextmanager
def prefect_client(api_url: str) -> Iterator[Any]:
    """A sync Prefect client of the server at ``api_url``."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        yield client


def wait_for_deployments(client, procs: _Procs, timeout: float = 180) -> None:
    """Until ``creditflow serve`` has registered its deployments (after importing everything)."""
    from flows.serve import TRAIN

    deadline = time.monotonic() + timeout
    while True:
        procs.check_alive("serve")
        try:
            client.read_deployment_by_name(TRAIN)
            return
        except Exception:  # noqa: BLE001  (not registered yet: any error of the lookup)
            if time.monotonic() > deadline:
                raise AssertionError(f"deployments not registered:\n{procs.log('serve')}") from None
            time.sleep(0.5)


def train_through_deployment(servers: dict[str, Any]) -> dict[str, Any]:
    """One clean TINY training started through ``creditflow-train`` like the UI does, run to
    completion: the flow run, the creditflow run id, and its MLflow run and experiment id."""
    from prefect.deployments import run_deployment

    from flows.serve import TRAIN, _derived_run_id

    procs = servers["procs"]
    t0 = time.monotonic()
    with prefect_client(servers["api_url"]) as client:
        wait_for_deployments(client, procs)
        started = run_deployment(TRAIN, parameters={"overrides": TINY}, timeout=0, as_subflow=False)
        fr = _wait_final(client, started.id, procs, timeout=900)
        assert fr.state.is_completed(), (fr.state, procs.log("serve"))
    print(f"[servers] training through the deployment completed in {time.monotonic() - t0:.1f} s", flush=True)
    run, exp_id = mlflow_run_of(servers["mlflow_url"], fr)
    return {"flow_run": fr, "run_id": _derived_run_id(fr), "mlflow_run": run, "experiment_id": exp_id}


def mlflow_run_of(mlflow_url: str, flow_run, log: str = "") -> tuple[Any, str]:
    """The one MLflow run (and its experiment id) of the creditflow run a served flow run trained
    (its run id is derived from the flow run), on the tracking server at ``mlflow_url``."""
    from mlflow.tracking import MlflowClient

    from flows.serve import _derived_run_id

    ml = MlflowClient(tracking_uri=mlflow_url)
    exp = ml.get_experiment_by_name("creditflow")
    assert exp is not None, log
    rid = _derived_run_id(flow_run)
    runs = ml.search_runs([exp.experiment_id], filter_string=f"tags.`creditflow.run_id` = '{rid}'")
    assert len(runs) == 1, [r.data.tags.get("creditflow.run_id") for r in ml.search_runs([exp.experiment_id])]
    return runs[0], exp.experiment_id
