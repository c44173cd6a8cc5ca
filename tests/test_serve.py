"""``creditflow serve``: deployments validated offline, and end to end against real servers.

The ``server`` test starts real local processes — ``prefect server start`` (own PREFECT_HOME,
SQLite) and ``mlflow server`` (SQLite backend store, served artifacts under tmp) on free ports —
serves the deployments from a subprocess polling every second, triggers ``creditflow-train``
through the Prefect API like the UI does, checks the MLflow run on the tracking server, then
fails a run on purpose and retries that flow run the way the UI's Retry button does (state
``AwaitingRetry``): it resumes the same creditflow run without recomputing finished stages.
Every process is stopped in a finalizer (its whole process group), also on failure.
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

TINY = [
    "iterations=1",
    "rollout.tasks_per_iteration=2",
    "rollout.group_size=2",
    "eval_episodes=2",
    "env.horizon=3",
    "env.num_decisive=1",
    "tracking.heatmap_every=1",
]


# ------------------------------------------------------------------------------ offline checks
def _args(*argv: str) -> argparse.Namespace:
    from flows.serve import _parser

    return _parser().parse_args(list(argv))


def test_deployments_parameters_and_schedules():
    from flows.serve import BENCHMARK, RESUME, TRAIN, build_deployments

    deps = {f"{d.flow_name}/{d.name}": d for d in build_deployments(
        _args("--train-cron", "0 3 * * *", "--train-overrides", "credit=gae iterations=20",
              "--benchmark-interval", "3600", "--benchmark-script", "credit_kernels",
              "--benchmark-args", "--threads 1"))}
    assert set(deps) == {TRAIN, RESUME, BENCHMARK}
    train, resume, bench = deps[TRAIN], deps[RESUME], deps[BENCHMARK]
    # the flows are loaded by module path in the runner's subprocesses
    assert train.entrypoint == "flows.serve.start_training"
    # typed parameters: the UI renders a form and the API rejects wrong types
    props = train._parameter_openapi_schema.properties
    assert props["overrides"]["type"] == "array" and props["overrides"]["items"]["type"] == "string"
    assert {"experiment", "run_id"} <= set(props)
    assert resume._parameter_openapi_schema.required == ["run_id"]
    script = bench._parameter_openapi_schema.properties["script"]
    assert {"pipeline", "credit_kernels"} <= set(script.get("enum", []))
    assert train.parameters == {"overrides": ["credit=gae", "iterations=20"]}
    assert train.schedules[0].schedule.cron == "0 3 * * *"
    assert bench.schedules[0].schedule.interval.total_seconds() == 3600
    assert bench.parameters == {"script": "credit_kernels", "args": ["--threads", "1"]}
    assert not resume.schedules


@pytest.mark.parametrize("argv, message", [
    (["--train-overrides", "iterations=zero"], "wrong type for config key 'iterations'"),
    (["--train-overrides", "bogus=1"], "unknown config key 'bogus'"),
    (["--train-cron", "every day"], "cron schedule"),
    (["--train-cron", "0 3 * * *", "--train-interval", "60"], "not both"),
    (["--benchmark-script", "nope"], "available"),
])
def test_serve_rejects_bad_options_before_serving(argv, message, capsys):
    from flows.serve import main

    assert main([*argv, "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def test_serve_needs_a_server(monkeypatch, capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.serve import main

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["--poll-interval", "1"]) == 2
    assert "PREFECT_API_URL" in capsys.readouterr().err


def test_train_flow_with_bad_config_fails_with_the_message(prefect_harness, cf_home):
    """Validation before compute: a config error is a Failed flow run saying what is wrong."""
    from flows.serve import resume_training, start_training

    state = start_training(overrides=["rollout.group_size=0"], return_state=True)
    assert state.is_failed()
    assert "config error: config key 'rollout.group_size' must be > 0" in state.message
    assert not (cf_home / "runs").exists() or not any((cf_home / "runs").iterdir())
    state = resume_training(run_id="cf-nope", return_state=True)
    assert state.is_failed() and "config error: no run 'cf-nope'" in state.message


def test_compose_stack_is_well_formed():
    """No compose CLI here: parse the file and check what the stack promises (services, wiring)."""
    import re

    import yaml

    compose = ROOT / "infra" / "compose"
    doc = yaml.safe_load((compose / "docker-compose.yml").read_text())
    svc = doc["services"]
    assert set(svc) == {"postgres", "prefect-server", "mlflow", "worker"}
    assert "postgresql+asyncpg://" in svc["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert "postgresql://mlflow:" in " ".join(svc["mlflow"]["command"])
    assert "--artifacts-destination /mlartifacts" in " ".join(svc["mlflow"]["command"])
    worker = svc["worker"]
    assert "creditflow serve" in " ".join(worker["command"])
    assert any(v.endswith(":/var/run/docker.sock") for v in worker["volumes"])
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    for name in ("prefect-server", "mlflow", "worker"):  # one image built from the Dockerfile
        assert svc[name]["build"]["dockerfile"] == "infra/compose/Dockerfile"
    assert (ROOT / svc["worker"]["build"]["context"].replace("../..", ".")).resolve() == ROOT
    # every required variable (${X:?...}) is in the env example; no secret value is in the compose file
    required = set(re.findall(r"\$\{(\w+):\?", (compose / "docker-compose.yml").read_text()))
    example = (compose / "env.example").read_text()
    assert required and all(re.search(rf"^{name}=", example, re.M) for name in required)
    assert (compose / "Dockerfile").is_file() and (compose / "postgres-init" / "10-mlflow-db.sh").is_file()


# ------------------------------------------------------------------------------ real servers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Procs:
    """Processes started by this test, each in its own session; stopped group by group."""

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


@pytest.fixture()
def prefect_ui():
    """Whether the Prefect server serves its UI; tests that open it in a browser override this to True."""
    return False


@pytest.fixture()
def servers(tmp_path, shared_home, prefect_ui):
    """Prefect server + MLflow server + ``creditflow serve``; yields their URLs and the process set."""
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = _Procs(logs)
    pport, mport = _free_port(), _free_port()
    api_url, mlflow_url = f"http://127.0.0.1:{pport}/api", f"http://127.0.0.1:{mport}"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    base.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONUNBUFFERED="1")
    bindir = Path(sys.executable).parent
    try:
        procs.start("prefect-server", [str(bindir / "prefect"), "server", "start", "--host", "127.0.0.1",
                                       "--port", str(pport), *([] if prefect_ui else ["--no-ui"]), "--analytics-off"],
                    # the UI otherwise calls http://127.0.0.1:4200/api whatever --port says
                    dict(base, PREFECT_HOME=str(tmp_path / "prefect-server-home"), PREFECT_LOGGING_LEVEL="WARNING",
                         PREFECT_UI_API_URL=api_url))
        procs.start("mlflow-server", [str(bindir / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mport),
                                      "--workers", "1",
                                      "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow-server.db'}",
                                      "--artifacts-destination", str(tmp_path / "mlflow-artifacts")], base)
        _wait_http(f"{api_url}/health", procs, "prefect-server")
        _wait_http(f"{mlflow_url}/health", procs, "mlflow-server")
        env = dict(base, PREFECT_API_URL=api_url, PREFECT_HOME=str(tmp_path / "prefect-client-home"),
                   MLFLOW_TRACKING_URI=mlflow_url, CREDITFLOW_HOME=str(shared_home),
                   MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
        procs.start("serve", [sys.executable, "-m", "flows.serve", "--poll-interval", "1"], env)
        yield {"api_url": api_url, "mlflow_url": mlflow_url, "home": shared_home, "procs": procs}
    finally:
        procs.stop_all()


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


@pytest.mark.server
@pytest.mark.slow  # 3 flow-run subprocesses + 2 servers: well over a minute on 2 cores; `-m server` runs it
def test_serve_end_to_end_train_mlflow_and_ui_retry(servers):
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Scheduled

    from flows.runtime import RunState
    from flows.serve import TRAIN, _derived_run_id

    procs: _Procs = servers["procs"]
    t0 = time.monotonic()

    def phase(text: str) -> None:  # progress with -s; no assertion on times
        print(f"[serve test] {text}: {time.monotonic() - t0:.1f} s after the servers were up", flush=True)

    with temporary_settings(updates={PREFECT_API_URL: servers["api_url"]}), get_client(sync_client=True) as client:
        deadline = time.monotonic() + 120
        while True:  # serve registers its deployments once it has imported everything
            procs.check_alive("serve")
            try:
                client.read_deployment_by_name(TRAIN)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise AssertionError(f"deployments not registered:\n{procs.log('serve')}") from None
                time.sleep(0.5)
        phase("deployments registered")
        # typed parameters are enforced by the server, before anything runs
        with pytest.raises(Exception, match="overrides"):
            run_deployment(TRAIN, parameters={"overrides": "iterations=1"}, timeout=0, as_subflow=False)

        # 1. start a run the way the UI does, with a crash injected into the credit stage
        crashed = run_deployment(TRAIN, parameters={"overrides": [*TINY, "debug.crash_at=0:credit"]},
                                 timeout=0, as_subflow=False)
        # 2. and a clean one (queued behind it: the runner executes one run at a time)
        clean = run_deployment(TRAIN, parameters={"overrides": TINY}, timeout=0, as_subflow=False)
        fr = _wait_final(client, crashed.id, procs)
        assert fr.state.is_failed(), fr.state
        phase("crashed run failed")
        fr = _wait_final(client, clean.id, procs)
        assert fr.state.is_completed(), (fr.state, procs.log("serve"))
        phase("clean run completed")

        # the clean run on the MLflow tracking server
        ml = MlflowClient(tracking_uri=servers["mlflow_url"])
        exp = ml.get_experiment_by_name("creditflow")
        rid = _derived_run_id(fr)
        runs = ml.search_runs([exp.experiment_id], filter_string=f"tags.`creditflow.run_id` = '{rid}'")
        assert len(runs) == 1, [r.data.tags.get("creditflow.run_id") for r in ml.search_runs([exp.experiment_id])]
        run = runs[0]
        assert run.info.status == "FINISHED"
        tags = run.data.tags
        assert tags["checklist.ca.granularity"].startswith("episode")
        assert tags["checklist.compute.device_hours.status"] == "filled"
        assert sum(k.startswith("checklist.") for k in tags) >= 14
        assert tags["prefect.flow_run_id"]  # the training subflow of the served flow run
        assert run.data.params["rollout.group_size"] == "2"
        steps = [m.step for m in ml.get_metric_history(run.info.run_id, "progress.iteration")]
        assert steps == [0, 1]
        for key in ("reward.success_rate", "credit.mean", "update.loss", "time.rollout_seconds"):
            assert [m.step for m in ml.get_metric_history(run.info.run_id, key)] == [0], key
        assert {"checklist.json", "config", "heatmaps"} <= {a.path for a in ml.list_artifacts(run.info.run_id)}
        assert RunState.open(rid, servers["home"]).info["status"] == "finished"

        # 3. the UI's "Retry" on the failed flow run: same flow run, same creditflow run, resumed
        crashed_rid = _derived_run_id(client.read_flow_run(crashed.id))
        state = RunState.open(crashed_rid, servers["home"])
        first = collections.Counter((e["iteration"], e["stage"]) for e in state.executions())
        assert first[(0, "credit")] == 1 and (0, "update") not in first
        client.set_flow_run_state(crashed.id, Scheduled(name="AwaitingRetry", message="Retry from the UI"),
                                  force=True)
        fr = _wait_final(client, crashed.id, procs)
        assert fr.state.is_completed(), (fr.state, procs.log("serve"))
        phase("retried run completed")
        after = collections.Counter((e["iteration"], e["stage"]) for e in state.executions())
        assert set(after - first) == {(0, "credit"), (0, "update"), (1, "eval")}
        retried = ml.search_runs([exp.experiment_id], filter_string=f"tags.`creditflow.run_id` = '{crashed_rid}'")
        assert len(retried) == 1 and retried[0].info.status == "FINISHED"
        assert len(retried[0].data.tags["prefect.flow_run_ids"].split(",")) == 2
