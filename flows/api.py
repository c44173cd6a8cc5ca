"""Python entry points behind the CLI: start, resume and inspect runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from flows.config import ConfigError, load_config, problem_error
from flows.runlog import RunLog
from flows.runtime import RunState, creditflow_home


def preflight(cfg: Any) -> None:
    """Checks that need the outside world, done before any compute (ConfigError on failure)."""
    if cfg.sandbox.backend == "docker":
        try:
            import docker

            docker.from_env(timeout=5).ping()
        except Exception as exc:
            raise problem_error(
                "sandbox.backend", "docker",
                f"no Docker engine is reachable ({type(exc).__name__}: {exc}); start dockerd or use sandbox.backend=process"
            ) from None


def start_run(overrides: Optional[list[str]] = None, home: Optional[Path] = None, progress: bool = True,
              run_id: Optional[str] = None, log: Optional[RunLog] = None) -> dict[str, Any]:
    """Validate the config, create the run directory and drive the Prefect flow.

    ``progress``: the console display (:mod:`flows.progress`); ``log``: a :class:`flows.runlog.RunLog`
    that takes library logging and warnings off the console into ``<run dir>/creditflow.log`` from
    the moment the run directory exists (the CLI passes one; the caller stops it)."""
    cfg = load_config(overrides)  # before Prefect is imported: a bad config fails fast and creates nothing
    preflight(cfg)
    from flows import train  # (imports Prefect, which configures logging: the log file goes on after)

    state = RunState.create(cfg, home or creditflow_home(), run_id=run_id)
    if log is not None:
        log.start(state.paths.log)
    train._RUNS[state.run_id] = state
    return _drive(train, state, progress)


def resume_run(run_id: str, overrides: Optional[list[str]] = None, home: Optional[Path] = None,
               progress: bool = True, log: Optional[RunLog] = None) -> dict[str, Any]:
    """Continue a run from where it stopped; finished stages load from persisted results
    (``progress``, ``log``: as for :func:`start_run`; the log file is appended to)."""
    from flows import train

    state = RunState.open(run_id, home or creditflow_home(), overrides)
    preflight(state.cfg)
    state.save_config()
    if log is not None:
        log.start(state.paths.log)
    train._RUNS[state.run_id] = state
    return _drive(train, state, progress)


def _drive(train: Any, state: RunState, progress: bool) -> dict[str, Any]:
    """Run the flow. Without a Prefect server (ephemeral mode: no ``PREFECT_API_URL``) the flow
    sends no run heartbeats: they are for a server's zombie detection, and the ephemeral server
    ends with this process; Prefect's heartbeat thread also sleeps in 1 s steps, so joining it
    cost up to 1 s at the end of every run. With a server (``creditflow serve``, a worker) they stay."""
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    run = train.flow_for(state.obj)
    if PREFECT_API_URL.value():
        return run(state.run_id, str(state.home), progress)
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        return run(state.run_id, str(state.home), progress)


def tracker_for(home: Optional[Path] = None, uri: Optional[str] = None, experiment: str = "creditflow"):
    from flows.tracking import Tracker, default_tracking_uri

    home = home or creditflow_home()
    return Tracker(uri or default_tracking_uri(home), experiment, home)


def find_mlflow_run(tracker: Any, run_id: str) -> Any:
    runs = tracker.client.search_runs([tracker.experiment_id], filter_string=f"tags.`creditflow.run_id` = '{run_id}'")
    if runs:
        return runs[0]
    try:
        return tracker.client.get_run(run_id)
    except Exception:
        raise ConfigError(f"no run {run_id!r} in the tracking store {tracker.uri}") from None


def run_plain(overrides: Optional[list[str]] = None, home: Optional[Path] = None,
              on_iteration: Any = None) -> dict[str, Any]:
    """The same stage bodies as the flow, called as plain functions: no Prefect, no MLflow, no
    persisted results. For benchmarks of orchestration overhead and for quick experiments.

    Returns the eval success rates before/after and per-stage wall seconds."""
    import time
    from collections import defaultdict

    from flows import train

    cfg = load_config(overrides)
    if cfg.rollout.max_staleness:  # the asynchronous rollout lane needs the flow's task runner
        raise ConfigError(f"rollout.max_staleness={cfg.rollout.max_staleness}: run_plain calls the stages one after "
                          "the other (synchronous); asynchronous rollouts run in the flow (api.start_run)")
    state = RunState.create(cfg, home or creditflow_home())
    train._RUNS[state.run_id] = state
    per_stage: dict[str, list[float]] = defaultdict(list)

    def call(task: Any, key: str, it: int, *args: Any) -> Any:
        t0 = time.perf_counter()
        out = task.fn(state.run_id, key, state.chash, it, *args)
        per_stage[task.name].append(time.perf_counter() - t0)
        return out

    try:
        ck = call(train.prepare_stage, "prepare", -1).value["checkpoint"]
        before = call(train.eval_stage, "eval-before", -1, ck).value
        res = None
        for it in range(state.obj.iterations):
            res = train.run_iteration(call, it, ck, res)
            ck = res["update"].value["checkpoint"]
            if on_iteration is not None:
                on_iteration(it, res["reward"], res["credit"], res["update"])
        after = call(train.eval_stage, "eval-after", state.obj.iterations, ck).value
    finally:
        state.close()
        train._RUNS.pop(state.run_id, None)
    return {"run_id": state.run_id, "success_before": before["success_rate"],
            "success_after": after["success_rate"], "per_stage": dict(per_stage)}
