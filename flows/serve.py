"""``creditflow serve``: deployments on a Prefect server, so runs are started, scheduled, re-run
and resumed from the Prefect UI.

    creditflow serve [--poll-interval 10] [--limit 1]
                     [--train-cron CRON | --train-interval SECONDS] [--train-overrides "k=v ..."]
                     [--benchmark-cron CRON | --benchmark-interval SECONDS]
                     [--benchmark-script pipeline] [--benchmark-args "--iterations 5"]

Four deployments, each a thin flow around :mod:`flows.api` (their flow runs create run
directories under ``$CREDITFLOW_HOME`` of the serving process and log to ``MLFLOW_TRACKING_URI``
when it is set):

``start-training/creditflow-train``  parameters ``experiment`` (configs/experiment/<name>.yaml),
    ``overrides`` (list of ``key=value``), ``run_id`` (optional). Calls
    :func:`flows.api.start_run`; the training flow ``creditflow-train`` appears as its subflow.
    **Retry** of a failed flow run in the UI resumes the same creditflow run (its id is derived
    from the flow run), so finished stages load from their persisted results.
``resume-training/creditflow-resume``  parameters ``run_id``, ``overrides``. Calls
    :func:`flows.api.resume_run` (e.g. for a run started from the command line).
``run-benchmark/creditflow-benchmark``  parameters ``script`` (a script of ``benchmarks/``)
    and ``args``; its output goes to the flow run's logs and a markdown artifact (performance scripts).
``run-ca-benchmark/creditflow-ca-benchmark``  the credit-assignment benchmark (``creditflow
    benchmark``, :mod:`flows.benchmark`): parameters ``config`` (configs/benchmark/<name>.yaml),
    ``overrides``, ``resume`` (a benchmark id to continue); the ``credit-benchmark`` flow and its
    cells' training flows appear as subflows.

Parameters are typed (the UI renders a form, the API rejects wrong types) and validated before
any compute: a config error ends the flow run in state Failed with the message
``config error: ...``. ``--train-*`` / ``--benchmark-*`` options attach cron or interval schedules
with default parameters (validated when ``serve`` starts). The served process polls the server
every ``--poll-interval`` seconds for runs to execute; each run executes in its own subprocess.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal, Optional

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, get_run_logger  # noqa: E402
from prefect.states import Failed  # noqa: E402

from flows.config import ConfigError  # noqa: E402

#: deployment name -> flow name (``run_deployment`` takes ``"<flow>/<deployment>"``)
DEPLOYMENTS = {
    "creditflow-train": "start-training",
    "creditflow-resume": "resume-training",
    "creditflow-benchmark": "run-benchmark",
    "creditflow-ca-benchmark": "run-ca-benchmark",
}
TRAIN = "start-training/creditflow-train"
RESUME = "resume-training/creditflow-resume"
BENCHMARK = "run-benchmark/creditflow-benchmark"
CA_BENCHMARK = "run-ca-benchmark/creditflow-ca-benchmark"


def benchmarks_dir() -> Path:
    """``benchmarks/`` of the source tree (``CREDITFLOW_BENCHMARKS`` overrides)."""
    env = os.environ.get("CREDITFLOW_BENCHMARKS")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "benchmarks"


def benchmark_scripts() -> list[str]:
    d = benchmarks_dir()
    return sorted(p.stem for p in d.glob("*.py") if not p.name.startswith("_")) if d.is_dir() else []


_SCRIPTS = tuple(benchmark_scripts())
#: the UI shows a drop-down of the scripts found when the deployment was registered
BenchmarkScript = Literal[_SCRIPTS] if _SCRIPTS else str  # type: ignore[valid-type]


def _failed(logger: Any, message: str) -> Any:
    logger.error(message)
    return Failed(message=message)


def _train_overrides(experiment: Optional[str], overrides: list[str]) -> list[str]:
    return ([f"experiment={experiment}"] if experiment else []) + [str(o) for o in overrides or []]


def _summary(out: dict[str, Any]) -> dict[str, Any]:
    keys = ("run_id", "mlflow_run_id", "tracking_uri", "experiment", "success_before", "success_after")
    from flows.secrets import mask_text

    return {k: mask_text(out.get(k)) for k in keys}


def _report(logger: Any, out: dict[str, Any], resumed: bool) -> dict[str, Any]:
    from prefect.artifacts import create_markdown_artifact

    s = _summary(out)
    logger.info("creditflow run %s %s: success %.3f -> %.3f; MLflow run %s at %s", s["run_id"],
                "resumed and finished" if resumed else "finished", s["success_before"], s["success_after"],
                s["mlflow_run_id"], s["tracking_uri"])
    try:
        create_markdown_artifact(
            key=f"creditflow-{s['run_id'].lower()}"[:60].replace("_", "-"),
            markdown=(f"| creditflow run | MLflow run | experiment | tracking URI | success before | after |\n"
                      f"|---|---|---|---|---|---|\n| `{s['run_id']}` | `{s['mlflow_run_id']}` | {s['experiment']} "
                      f"| `{s['tracking_uri']}` | {s['success_before']:.3f} | {s['success_after']:.3f} |\n\n"
                      f"Resume or extend it with the `creditflow-resume` deployment (run_id `{s['run_id']}`) "
                      f"or `creditflow resume {s['run_id']}`."),
            description="creditflow training run",
        )
    except Exception as exc:  # a convenience; never fail a finished run for it
        logger.warning("could not create the summary artifact: %s", exc)
    return s


def _flow_run() -> Any:
    from prefect.context import get_run_context

    try:
        return get_run_context().flow_run
    except Exception:
        return None


def _derived_run_id(fr: Any) -> Optional[str]:
    """The creditflow run id of flow run ``fr``: the same for every retry of that flow run."""
    if fr is None:
        return None
    if fr.created is None:
        return f"cf-{fr.id.hex[:12]}"
    return f"cf-{fr.created.astimezone(_dt.timezone.utc):%Y%m%d-%H%M%S}-{fr.id.hex[:6]}"


# --------------------------------------------------------------------------------------- flows
@flow(name=DEPLOYMENTS["creditflow-train"], persist_result=False, log_prints=True)
def start_training(experiment: Optional[str] = None, overrides: list[str] = [],  # noqa: B006 (Prefect params)
                   run_id: Optional[str] = None, progress: bool = True) -> Any:
    """Start a creditflow training run (``creditflow train``): ``experiment`` selects
    configs/experiment/<name>.yaml, ``overrides`` are ``key=value`` items (groups or dotted keys).
    Retrying a failed flow run resumes the same training run."""
    from flows import api
    from flows.runtime import RunLockedError, creditflow_home
    from flows.secrets import install_log_filter, mask_text

    install_log_filter()
    logger = get_run_logger()
    home = creditflow_home()
    items = _train_overrides(experiment, overrides)
    fr = _flow_run()
    rid = run_id or _derived_run_id(fr)
    try:
        # the UI's Retry of a failed flow run re-runs it with the same parameters: resume that run
        retried = run_id is None or (fr is not None and (fr.run_count or 0) > 1)
        if rid and retried and (home / "runs" / rid / "config.yaml").is_file():
            logger.info("flow run retried: resuming creditflow run %s (finished stages load from results)", rid)
            return _report(logger, api.resume_run(rid, home=home, progress=progress), resumed=True)
        logger.info("starting creditflow run %s under %s (overrides: %s)", rid, home,
                    mask_text(" ".join(items)) or "none")
        # start_run validates the config (and the outside world) before it creates the run
        out = api.start_run(items, home=home, progress=progress, run_id=rid)
    except (ConfigError, RunLockedError) as exc:
        kind = "config error" if isinstance(exc, ConfigError) else "run busy"
        return _failed(logger, f"{kind}: {mask_text(str(exc))}")
    return _report(logger, out, resumed=False)


@flow(name=DEPLOYMENTS["creditflow-resume"], persist_result=False, log_prints=True)
def resume_training(run_id: str, overrides: list[str] = [], progress: bool = True) -> Any:  # noqa: B006
    """Resume (or extend, e.g. ``iterations=40``) a creditflow run: finished stages are not recomputed."""
    from flows import api
    from flows.runtime import RunLockedError, RunState, creditflow_home
    from flows.secrets import install_log_filter, mask_text

    install_log_filter()
    logger = get_run_logger()
    home = creditflow_home()
    try:
        state = RunState.open(run_id, home, list(overrides or []))  # validation before any compute
        install_log_filter(state.cfg)
        api.preflight(state.cfg)
        logger.info("resuming creditflow run %s under %s", run_id, home)
        out = api.resume_run(run_id, list(overrides or []), home=home, progress=progress)
    except (ConfigError, RunLockedError) as exc:
        kind = "config error" if isinstance(exc, ConfigError) else "run busy"
        return _failed(logger, f"{kind}: {mask_text(str(exc))}")
    return _report(logger, out, resumed=True)


@flow(name=DEPLOYMENTS["creditflow-benchmark"], persist_result=False, log_prints=False)
def run_benchmark(script: BenchmarkScript = "pipeline", args: list[str] = []) -> Any:  # noqa: B006
    """Run ``benchmarks/<script>.py`` with ``args``; its output goes to the logs and an artifact."""
    from prefect.artifacts import create_markdown_artifact

    from flows.secrets import install_log_filter, mask_text

    install_log_filter()
    logger = get_run_logger()
    available = benchmark_scripts()
    if script not in available:
        return _failed(logger, f"config error: unknown benchmark script {script!r}; available: "
                               f"{', '.join(available) or '(none)'} (under {benchmarks_dir()})")
    path = benchmarks_dir() / f"{script}.py"
    cmd = [sys.executable, str(path), *[str(a) for a in args or []]]
    logger.info("running %s", " ".join(shlex.quote(c) for c in cmd))
    lines: list[str] = []
    with subprocess.Popen(cmd, cwd=str(path.parent.parent), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = mask_text(line.rstrip("\n"))
            lines.append(line)
            logger.info("%s", line)
        rc = proc.wait()
    text = "\n".join(lines[-400:])
    try:
        create_markdown_artifact(key=f"benchmark-{script}".replace("_", "-"),
                                 markdown=f"`{' '.join(cmd[1:])}` (exit {rc})\n\n```\n{text}\n```",
                                 description=f"output of benchmarks/{script}.py")
    except Exception as exc:
        logger.warning("could not create the benchmark artifact: %s", exc)
    if rc != 0:
        tail = "\n".join(lines[-5:])
        return _failed(logger, f"benchmark {script} exited with status {rc}: {tail}")
    return {"script": script, "args": list(args or []), "exit_code": rc}


@flow(name=DEPLOYMENTS["creditflow-ca-benchmark"], persist_result=False, log_prints=True)
def run_ca_benchmark(config: str = "bifurcation_small", overrides: list[str] = [],  # noqa: B006
                     resume: Optional[str] = None) -> Any:
    """Run (or, with ``resume``, continue) a credit-assignment benchmark: methods x tasks x seeds x
    lrs at a fixed compute budget (survey §9); summary under $CREDITFLOW_HOME/benchmarks/<id>/."""
    from flows.benchmark import resume_benchmark, start_benchmark
    from flows.runtime import RunLockedError
    from flows.secrets import mask_text

    logger = get_run_logger()
    try:
        if resume:
            out = resume_benchmark(resume, overrides=list(overrides or []), say=logger.info)
        else:
            out = start_benchmark(config, list(overrides or []), say=logger.info,
                                  command=f"creditflow benchmark {shlex.join([config, *overrides])}")
    except (ConfigError, RunLockedError) as exc:
        kind = "config error" if isinstance(exc, ConfigError) else "benchmark busy"
        return _failed(logger, f"{kind}: {mask_text(str(exc))}")
    if out["status"] != "finished":
        return _failed(logger, f"benchmark {out['benchmark_id']}: some cells did not finish; "
                               f"resume it with resume={out['benchmark_id']}")
    return {"benchmark_id": out["benchmark_id"], "mlflow_run_id": out["mlflow_run_id"], "table": out["table"]}


# ---------------------------------------------------------------------------------- deployments
def _split(text: Optional[str]) -> list[str]:
    return shlex.split(text) if text else []


def build_deployments(args: argparse.Namespace) -> list[Any]:
    """The four runner deployments, with the schedules and default parameters of ``args``.
    Default train/resume parameters are validated here (ConfigError), before anything is served."""
    from prefect.deployments.runner import EntrypointType

    from flows.config import load_config

    train_params: dict[str, Any] = {}
    if args.train_overrides or args.train_experiment:
        train_params = {"overrides": _split(args.train_overrides)}
        if args.train_experiment:
            train_params["experiment"] = args.train_experiment
        load_config(_train_overrides(args.train_experiment, train_params["overrides"]))
    if (args.train_cron or args.train_interval) and not train_params:
        train_params = {"overrides": []}
        load_config([])
    bench_params: dict[str, Any] = {}
    if args.benchmark_script or args.benchmark_args:
        script = args.benchmark_script or "pipeline"
        if script not in benchmark_scripts():
            raise ConfigError(f"--benchmark-script {script!r}: available: {', '.join(benchmark_scripts())}")
        bench_params = {"script": script, "args": _split(args.benchmark_args)}
    if args.train_cron and args.train_interval:
        raise ConfigError("give --train-cron or --train-interval, not both")
    if args.benchmark_cron and args.benchmark_interval:
        raise ConfigError("give --benchmark-cron or --benchmark-interval, not both")

    def schedule(cron: Optional[str], interval: Optional[float]) -> dict[str, Any]:
        if cron:
            from prefect.schedules import Cron

            try:
                return {"schedule": Cron(cron, timezone=args.timezone)}
            except Exception as exc:
                raise ConfigError(f"cron schedule {cron!r}: {exc}") from None
        if interval:
            if interval <= 0:
                raise ConfigError(f"schedule interval must be > 0 seconds, got {interval}")
            return {"interval": _dt.timedelta(seconds=interval)}
        return {}

    common = {"tags": ["creditflow"], "entrypoint_type": EntrypointType.MODULE_PATH, "paused": args.paused or None}
    return [
        start_training.to_deployment(
            "creditflow-train", parameters=train_params or None, description=start_training.__doc__,
            **schedule(args.train_cron, args.train_interval), **common),
        resume_training.to_deployment("creditflow-resume", description=resume_training.__doc__, **common),
        run_benchmark.to_deployment(
            "creditflow-benchmark", parameters=bench_params or None, description=run_benchmark.__doc__,
            **schedule(args.benchmark_cron, args.benchmark_interval), **common),
        run_ca_benchmark.to_deployment("creditflow-ca-benchmark", description=run_ca_benchmark.__doc__, **common),
    ]


def describe(deployments: list[Any]) -> str:
    def when(s: Any) -> str:
        s = getattr(s, "schedule", s)
        if getattr(s, "cron", None):
            return f"cron '{s.cron}' ({s.timezone})"
        if getattr(s, "interval", None):
            return f"every {s.interval.total_seconds():g} s"
        return str(s)

    lines = []
    for d in deployments:
        sched = ", ".join(when(s) for s in (d.schedules or [])) or "no schedule"
        lines.append(f"  {d.flow_name}/{d.name}: entrypoint {d.entrypoint}; {sched}; parameters {d.parameters or {}}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="creditflow serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--poll-interval", type=float, default=10.0,
                   help="seconds between polls of the server for runs to execute (default 10)")
    p.add_argument("--limit", type=int, default=1, help="flow runs executed at the same time (default 1)")
    p.add_argument("--train-cron", help="cron schedule of creditflow-train, e.g. '0 3 * * *'")
    p.add_argument("--train-interval", type=float, help="interval schedule of creditflow-train (seconds)")
    p.add_argument("--train-overrides", help="default overrides of creditflow-train runs, e.g. 'credit=gae iterations=20'")
    p.add_argument("--train-experiment", help="default experiment of creditflow-train runs")
    p.add_argument("--benchmark-cron", help="cron schedule of creditflow-benchmark")
    p.add_argument("--benchmark-interval", type=float, help="interval schedule of creditflow-benchmark (seconds)")
    p.add_argument("--benchmark-script", help=f"default benchmark script ({', '.join(benchmark_scripts())})")
    p.add_argument("--benchmark-args", help="default arguments of the benchmark script, e.g. '--iterations 5'")
    p.add_argument("--timezone", default="UTC", help="timezone of cron schedules (default UTC)")
    p.add_argument("--paused", action="store_true", help="register schedules paused (resume them in the UI)")
    p.add_argument("--log-level", default="INFO", help="level of the flow runs' logs sent to the server (default INFO)")
    p.add_argument("--dry-run", action="store_true", help="validate and print the deployments; serve nothing")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``creditflow serve`` (exit 2 on a config or connection error)."""
    args = _parser().parse_args(argv)
    try:
        deployments = build_deployments(args)
    except ConfigError as exc:
        print(f"creditflow serve: config error: {exc}", file=sys.stderr)
        return 2
    if args.poll_interval <= 0 or args.limit < 1:
        print("creditflow serve: --poll-interval must be > 0 and --limit >= 1", file=sys.stderr)
        return 2
    if args.dry_run:
        print("creditflow serve (dry run): would serve\n" + describe(deployments))
        return 0

    from prefect import serve
    from prefect.settings import PREFECT_API_URL, PREFECT_LOGGING_LEVEL, PREFECT_UI_URL, temporary_settings

    api_url = PREFECT_API_URL.value()
    if not api_url:
        print("creditflow serve: needs a Prefect server; start one (`prefect server start`, or the compose stack "
              "of infra/compose) and set PREFECT_API_URL, e.g. export PREFECT_API_URL=http://127.0.0.1:4200/api",
              file=sys.stderr)
        return 2
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        err = client.api_healthcheck()
    if err is not None:
        print(f"creditflow serve: the Prefect server at {api_url} is not reachable ({err})", file=sys.stderr)
        return 2
    from flows.secrets import install_log_filter, mask_text

    install_log_filter()
    ui = PREFECT_UI_URL.value() or api_url.rsplit("/api", 1)[0]
    tracking = os.environ.get("MLFLOW_TRACKING_URI")
    print(f"creditflow serve: {len(deployments)} deployments on the Prefect server {api_url}\n" + describe(deployments))
    print(f"  open the UI:   {ui}/deployments   (start, schedule, re-run; Retry on a failed "
          f"creditflow-train run resumes it)")
    print(f"  from a shell:  prefect deployment run '{TRAIN}' --param overrides='[\"iterations=5\"]'")
    print(f"  runs under:    {os.environ.get('CREDITFLOW_HOME', './.creditflow')}   MLflow: "
          f"{mask_text(tracking) if tracking else 'SQLite under CREDITFLOW_HOME (set MLFLOW_TRACKING_URI for a server)'}")
    print(f"  polling every {args.poll_interval:g} s, at most {args.limit} run(s) at a time; Ctrl-C stops serving",
          flush=True)
    # the flow runs execute in subprocesses that inherit these settings
    with temporary_settings(updates={PREFECT_LOGGING_LEVEL: args.log_level.upper()}):
        serve(*deployments, limit=args.limit, query_seconds=args.poll_interval, print_starting_message=False)
    return 0


if __name__ == "__main__":
    # import the module under its own name: the deployments' entrypoints are flows.serve.<flow>
    from flows import serve as _serve

    sys.exit(_serve.main())
