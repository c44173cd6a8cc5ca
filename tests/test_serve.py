"""``creditflow serve``: deployments validated offline, and end to end against real servers.

The ``server`` test uses real local processes, started once per session (tests/server_support.py)
— ``prefect server start`` (own PREFECT_HOME, SQLite) and ``mlflow server`` (SQLite backend
store, served artifacts under tmp) on free ports — serves the deployments from a subprocess
polling every second, triggers ``creditflow-train`` through the Prefect API like the UI does
(the session's ``served_training``), checks the MLflow run on the tracking server, then
fails a run on purpose and retries that flow run the way the UI's Retry button does (state
``AwaitingRetry``): it resumes the same creditflow run without recomputing finished stages.
Every process is stopped in a finalizer (its whole process group), also on failure.
"""

from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

import pytest

from tests.server_support import TINY, _Procs, _wait_final, mlflow_run_of, prefect_client  # noqa: F401  (re-exported helpers)

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------ offline checks
def _args(*argv: str) -> argparse.Namespace:
    from flows.serve import _parser

    return _parser().parse_args(list(argv))


def test_deployments_parameters_and_schedules():
    from flows.serve import BENCHMARK, CA_BENCHMARK, RESUME, TRAIN, build_deployments

    deps = {f"{d.flow_name}/{d.name}": d for d in build_deployments(
        _args("--train-cron", "0 3 * * *", "--train-overrides", "credit=gae iterations=20",
              "--benchmark-interval", "3600", "--benchmark-script", "credit_kernels",
              "--benchmark-args", "--threads 1"))}
    assert set(deps) == {TRAIN, RESUME, BENCHMARK, CA_BENCHMARK}
    ca = deps[CA_BENCHMARK]
    assert ca.entrypoint == "flows.serve.run_ca_benchmark" and not ca.schedules
    assert {"config", "overrides", "resume"} <= set(ca._parameter_openapi_schema.properties)
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
    (["--train-overrides", "iterations=zero"], "iterations=zero: wrong type"),
    (["--train-overrides", "bogus=1"], "bogus=1: unknown key"),
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


def test_creditflow_cli_forwards_options_to_its_tools(monkeypatch, capsys):
    """``creditflow serve --opt``, ``creditflow sandbox build-image --opt``, ``creditflow prm train
    --opt``: options starting with ``--`` reach the tool (argparse's REMAINDER used to reject them)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cli import main

    assert main(["serve", "--dry-run", "--train-interval", "3600"]) == 0
    assert "creditflow-train" in capsys.readouterr().out
    with temporary_settings(restore_defaults={PREFECT_API_URL}):  # options parsed, then: no server
        assert main(["serve", "--poll-interval", "1"]) == 2
    assert "PREFECT_API_URL" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["sandbox", "build-image", "--help"])
    assert exc.value.code == 0 and "--tag" in capsys.readouterr().out
    assert main(["sandbox"]) == 2 and "the only command is 'build-image'" in capsys.readouterr().err
    assert main(["sandbox", "--tag", "x"]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["prm", "train", "--help"])
    assert exc.value.code == 0 and "--episodes" in capsys.readouterr().out


def test_train_flow_with_bad_config_fails_with_the_message(prefect_harness, cf_home):
    """Validation before compute: a config error is a Failed flow run saying what is wrong."""
    from flows.serve import resume_training, start_training

    state = start_training(overrides=["rollout.group_size=0"], return_state=True)
    assert state.is_failed()
    assert "config error: rollout.group_size=0: must be an integer >= 1" in state.message
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
# (the session fixtures ``servers`` and ``served_training`` of tests/conftest.py; tests/server_support.py)
@pytest.mark.server  # 3 flow-run subprocesses + 2 servers: about two minutes on 2 cores (in the default suite)
def test_serve_end_to_end_train_mlflow_and_ui_retry(servers, served_training):
    from mlflow.tracking import MlflowClient
    from prefect.deployments import run_deployment
    from prefect.states import Scheduled

    from flows.runtime import RunState
    from flows.serve import TRAIN, _derived_run_id

    procs: _Procs = servers["procs"]
    t0 = time.monotonic()

    def phase(text: str) -> None:  # progress with -s; no assertion on times
        print(f"[serve test] {text}: {time.monotonic() - t0:.1f} s after the clean training", flush=True)

    # 1. a clean run started the way the UI does (the session's served_training) ...
    fr = served_training["flow_run"]
    with prefect_client(servers["api_url"]) as client:
        # typed parameters are enforced by the server, before anything runs
        with pytest.raises(Exception, match="overrides"):
            run_deployment(TRAIN, parameters={"overrides": "iterations=1"}, timeout=0, as_subflow=False)
        # 2. ... and one with a crash injected into the credit stage
        crashed = run_deployment(TRAIN, parameters={"overrides": [*TINY, "debug.crash_at=0:credit"]},
                                 timeout=0, as_subflow=False)
        crashed_fr = _wait_final(client, crashed.id, procs)
        assert crashed_fr.state.is_failed(), crashed_fr.state
        phase("crashed run failed")

        # the clean run on the MLflow tracking server
        ml = MlflowClient(tracking_uri=servers["mlflow_url"])
        run, exp_id = mlflow_run_of(servers["mlflow_url"], fr)
        rid = served_training["run_id"]
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
        retried = ml.search_runs([exp_id], filter_string=f"tags.`creditflow.run_id` = '{crashed_rid}'")
        assert len(retried) == 1 and retried[0].info.status == "FINISHED"
        assert len(retried[0].data.tags["prefect.flow_run_ids"].split(",")) == 2
