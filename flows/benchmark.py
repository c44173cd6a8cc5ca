"""``creditflow benchmark``: the credit-assignment benchmark flow (survey §9; issue 15).

Reads like the protocol::

    config (methods x tasks x seeds x lrs, budget) ─▶ parent MLflow run
        ─▶ one cell per (method, task, seed, lr), in parallel on the task runner:
             a creditflow training run (the ``creditflow-train`` flow as a subflow), its own MLflow
             run nested under the parent, stopped when its budget is spent (``budget.*``)
        ─▶ summary.json after every finished cell ─▶ lr sweep, learning table ─▶ parent MLflow run

A benchmark lives in ``<home>/benchmarks/<benchmark_id>/``: ``config.yaml`` (the resolved benchmark
config), ``summary.json`` (the contract with ``creditflow report``: cells, curves with cumulative
compute, final success, ground-truth metrics, the sweep, the table; written atomically),
``creditflow.log`` (library logs of CLI runs) and the parent run's tracking journal. A cell's run id
is ``<benchmark_id>-<cell_id>``; its files are the training run's, under ``<home>/runs/``.

Resume (``creditflow benchmark --resume ID``) re-enters the same cells: finished cells (their
``run.json`` says so) are read, not re-run; an interrupted or failed cell resumes its training run
(per-stage resume: finished stages load from their persisted results). Like ``creditflow resume``,
an injected fault (``debug.*`` overrides) belongs to the invocation that asked for it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import secrets as _secrets
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from omegaconf import DictConfig, OmegaConf  # noqa: E402
from prefect import flow, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.futures import as_completed  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402

from flows.benchmark_config import Cell, cells, load_benchmark_config, to_object  # noqa: E402
from flows.config import ConfigError, flatten, load_config  # noqa: E402
from flows.runtime import RunPaths, RunState, _atomic_write, creditflow_home  # noqa: E402
from flows.scaleout import make_task_runner  # noqa: E402
from stages.benchmark.budget import CHARGED  # noqa: E402
from stages.benchmark.learning import frontier_table, learning_table, lr_sweep  # noqa: E402
from stages.benchmark.metadata import finite_or_none  # noqa: E402

#: cell record -> summary ``gt`` block: the credit stage's per-iteration ground-truth metrics
#: (``credit.<key>``, :func:`stages.credit.stats.credit_statistics`)
#: averaged over the cell's iterations
GT_KEYS = {"rmse": "gt_rmse", "spearman": "gt_rank_corr", "sign_accuracy": "gt_sign_agreement",
           "zero_advantage_mass": "gt_zero_advantage_mass", "decisive_share": "decisive_share",
           "shift_invariant_error": "gt_shift_invariant_rmse", "pg_cosine": "gt_pg_cosine",
           "batch_variance": "gt_gradient_variance"}
SPENT_KEYS = ("generated_tokens", "forward_tokens", "ca_forward_tokens", "env_steps", "env_resets", "judge_calls",
              "wall_seconds", "cpu_seconds", "ca_seconds", "iterations")
DONE = ("finished", "budget_spent")

#: hooks for in-process tests: ``hook(benchmark, cell_record)`` after each cell's record is written
CELL_HOOKS: list[Callable[["Benchmark", dict[str, Any]], None]] = []


def new_benchmark_id() -> str:
    return datetime.now(timezone.utc).strftime("bench-%Y%m%d-%H%M%S-") + _secrets.token_hex(3)


def benchmarks_root(home: Path) -> Path:
    return home / "benchmarks"


class Benchmark:
    """One benchmark's directory and summary (the flow process's live view of it)."""

    def __init__(self, bench_id: str, home: Path, cfg: DictConfig, summary: dict[str, Any]):
        self.bench_id, self.home, self.cfg, self.summary = bench_id, home, cfg, summary
        self.obj = to_object(cfg)
        self.root = benchmarks_root(home) / bench_id
        self._lock = threading.Lock()
        self.resumed = False
        #: where the flow reports each finished cell (the CLI prints it; a flow parameter cannot be a callable)
        self.say: Callable[[str], None] = lambda text: None

    @property
    def summary_path(self) -> Path:
        return self.root / "summary.json"

    @property
    def log_path(self) -> Path:
        return self.root / "creditflow.log"

    @classmethod
    def create(cls, cfg: DictConfig, home: Path, bench_id: Optional[str] = None, command: str = "") -> "Benchmark":
        bench_id = bench_id or new_benchmark_id()
        root = benchmarks_root(home) / bench_id
        if root.exists():
            raise ConfigError(f"benchmark {bench_id} already exists at {root}; use `creditflow benchmark --resume {bench_id}`")
        root.mkdir(parents=True)
        _atomic_write(root / "config.yaml", OmegaConf.to_yaml(cfg))
        limits = to_object(cfg).budget
        summary = {
            "benchmark_id": bench_id, "created": datetime.now(timezone.utc).isoformat(), "command": command,
            "status": "running", "config": OmegaConf.to_container(cfg, resolve=True), "mlflow_run_id": None,
            "budget": {**{k: getattr(limits, k) for k in ("generated_tokens", "forward_tokens", "env_steps")},
                       "wall_seconds": limits.wall_seconds, "max_iterations": to_object(cfg).max_iterations,
                       "charged": CHARGED},
            "cells": [], "methods": {}, "table": [], "frontier": [],
        }
        bench = cls(bench_id, home, cfg, summary)
        bench.summary["cells"] = [bench.cell_record(c) for c in cells(bench.obj)]
        bench.write_summary()
        return bench

    @classmethod
    def open(cls, bench_id: str, home: Path) -> "Benchmark":
        root = benchmarks_root(home) / bench_id
        if not (root / "config.yaml").is_file():
            known = sorted(p.name for p in benchmarks_root(home).glob("*")) if benchmarks_root(home).is_dir() else []
            raise ConfigError(f"no benchmark {bench_id!r} under {benchmarks_root(home)}"
                              + (f"; known: {', '.join(known[-10:])}" if known else ""))
        cfg = load_benchmark_config(base=OmegaConf.load(root / "config.yaml"))
        summary = json.loads((root / "summary.json").read_text()) if (root / "summary.json").is_file() else {}
        bench = cls(bench_id, home, cfg, summary)
        bench.resumed = True
        return bench

    @contextlib.contextmanager
    def locked(self):
        """Two processes never drive the same benchmark."""
        fh = open(self.root / ".lock", "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            from flows.runtime import RunLockedError

            raise RunLockedError(f"benchmark {self.bench_id} is being driven by another process") from None
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            fh.close()

    def write_summary(self) -> None:
        with self._lock:
            _atomic_write(self.summary_path, json.dumps(finite_or_none(self.summary), indent=1))

    # ------------------------------------------------------------------ cells
    def run_id(self, cell: Cell) -> str:
        return f"{self.bench_id}-{cell.cell_id}"

    def cell_record(self, cell: Cell, failure: Optional[str] = None) -> dict[str, Any]:
        """A cell as the summary holds it, from its training run's ``run.json`` (spend, stop reason,
        curve, eval success: written by the training flow) and ``failure`` (this attempt's error)."""
        run_id = self.run_id(cell)
        paths = RunPaths(self.home / "runs" / run_id)
        info = json.loads(paths.info.read_text()) if paths.info.is_file() else {}
        b = info.get("budget") or {}
        curve = list(b.get("curve") or [])
        if info.get("status") == "finished":
            status, reason = ("budget_spent", b["stop_reason"]) if b.get("stop_reason") else (
                "finished", f"max_iterations={self.obj.max_iterations} done")
        elif failure is not None or info.get("status") == "failed":
            status, reason = "failed", failure or "the training run failed (see its creditflow.log / MLflow run)"
        else:
            status, reason = "running", "not started" if not info else "interrupted or in progress"
        spent = {k: (b.get("spent") or {}).get(k, 0) for k in SPENT_KEYS}
        gt = None
        if any(GT_KEYS["rmse"] in r for r in curve):
            gt = {out: _mean(r.get(key) for r in curve) for out, key in GT_KEYS.items()}
        return {
            "cell_id": cell.cell_id, "method": cell.method, "task": cell.task, "seed": cell.seed, "lr": cell.lr,
            "horizon": cell.horizon, "family": cell.family or cell.task,
            "run_id": run_id, "mlflow_run_id": info.get("mlflow_run_id"), "status": status, "reason": reason,
            "spent": spent,
            # prepare (warm-up) and evaluation episodes: measured, reported apart, not charged (budget.charged)
            "uncharged": {k: {f: v.get(f, 0) for f in SPENT_KEYS if f != "iterations"}
                          for k, v in (b.get("uncharged") or {}).items()},
            "curve": [{"iteration": r["iteration"], "generated_tokens": r["generated_tokens"],
                       "forward_tokens": r["forward_tokens"], "env_steps": r["env_steps"],
                       "wall_seconds": r["wall_seconds"], "success": r["success"], "eval_success": r.get("eval_success"),
                       "ca_forward_tokens": r.get("ca_forward_tokens", 0)} for r in curve],
            "final_success": curve[-1]["success"] if curve else None,
            "final_eval_success": info.get("success_after") if status in DONE else None,
            "gt": gt,
        }

    def set_cell(self, record: dict[str, Any]) -> None:
        with self._lock:
            cur = self.summary.setdefault("cells", [])
            for i, c in enumerate(cur):
                if c["cell_id"] == record["cell_id"]:
                    cur[i] = record
                    break
            else:
                cur.append(record)

    def finalize(self) -> None:
        """The lr sweep, the learning table and (with a horizon sweep) the frontier from the cells' records."""
        o = self.obj
        self.summary["methods"] = lr_sweep(self.summary["cells"], by=o.select_by)
        self.summary["table"] = learning_table(self.summary["cells"], self.summary["methods"], o.target_success,
                                               o.compute_measure, by=o.select_by)
        self.summary["frontier"] = frontier_table(self.summary["table"], self.summary["cells"])


def _mean(xs: Any) -> Optional[float]:
    v = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    return sum(v) / len(v) if v else None


# ---------------------------------------------------------------------------- one cell
#: HTTP answers of the Prefect API that mean "try again" (an ephemeral server under load answers 503)
TRANSIENT_STATUS = frozenset({429, 502, 503, 504})
#: how often a cell whose training run failed on a transient API error is resumed before it is
#: recorded failed, and the pause before each retry (seconds, doubled each time)
CELL_RETRIES = 3
RETRY_PAUSE_S = 2.0


def is_transient(exc: BaseException) -> bool:
    """Whether an exception (or one in its cause/context chain) is a transient error of the
    orchestration API: an HTTP 429/502/503/504 answer, or a connection/timeout error of the client."""
    import httpx

    seen: set[int] = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, httpx.HTTPStatusError) and e.response is not None and e.response.status_code in TRANSIENT_STATUS:
            return True
        if isinstance(e, (httpx.TransportError, httpx.TimeoutException)):
            return True
        e = e.__cause__ or e.__context__
    return False


def run_cell(home: str, run_id: str, overrides: list[str], parent_run_id: Optional[str], resumed: bool,
             bench_id: str = "", cell_id: str = "") -> Optional[str]:
    """Train one cell (create its run, or resume it if its directory exists); returns the error
    text of a failure (the benchmark goes on with the other cells), None on success. The run's
    ``run.json`` names ``benchmark_id`` and ``cell_id`` (its metadata is then of kind
    ``benchmark_cell``)."""
    import time

    for attempt in range(CELL_RETRIES + 1):
        failure, exc = _run_cell_once(home, run_id, overrides, parent_run_id, resumed or attempt > 0, bench_id, cell_id)
        if exc is None or not is_transient(exc) or attempt == CELL_RETRIES:
            return failure
        # the run resumes at the stage that failed (per-stage resume): nothing finished is redone
        print(f"benchmark cell {cell_id or run_id}: transient API error ({failure}); "
              f"retry {attempt + 1}/{CELL_RETRIES}", file=sys.stderr)
        time.sleep(RETRY_PAUSE_S * 2 ** attempt)
    return failure


def _run_cell_once(home: str, run_id: str, overrides: list[str], parent_run_id: Optional[str], resumed: bool,
                   bench_id: str, cell_id: str) -> tuple[Optional[str], Optional[BaseException]]:
    """One attempt at a cell: (error text, exception) of a failure, (None, None) on success."""
    from flows import train

    home_p = Path(home)
    paths = RunPaths(home_p / "runs" / run_id)
    try:
        if paths.config.is_file():  # an earlier attempt created it: per-stage resume
            state = RunState.open(run_id, home_p)
            if state.info.get("status") == "finished":
                return None, None
        else:
            if resumed:  # an injected fault belongs to the invocation that asked for it
                overrides = [o for o in overrides if not o.split("=", 1)[0].startswith("debug.")]
            extra = [f"tracking.parent_run_id={parent_run_id}"] if parent_run_id else []
            state = RunState.create(load_config(list(overrides) + extra), home_p, run_id=run_id)
            if bench_id:
                state.info.update(benchmark_id=bench_id, cell_id=cell_id)
                state.save_info()
        train._RUNS[run_id] = state
        train.train_flow(run_id, str(home_p), False)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"[:500], exc
    return None, None


@task(name="benchmark-cell", task_run_name="{cell_id}", cache_policy=NO_CACHE, persist_result=False, retries=0)
def cell_task(cell_id: str, home: str, run_id: str, overrides: list[str], parent_run_id: Optional[str],
              resumed: bool, bench_id: str = "") -> Optional[str]:
    """One benchmark cell: a creditflow training run (its flow appears as this task's subflow).

    The training flow's stage tasks would join this task's (lazy) transaction and have their
    results written only when it commits, i.e. after the whole run: an eager transaction makes
    each stage's result durable when the stage ends, as in a training run of its own (per-stage resume)."""
    from prefect.transactions import CommitMode, transaction

    with transaction(commit_mode=CommitMode.EAGER):
        return run_cell(home, run_id, overrides, parent_run_id, resumed, bench_id, cell_id)


# ---------------------------------------------------------------------------- the flow
#: live benchmarks of this process, by id (as flows.train._RUNS for runs)
_BENCHES: dict[str, Benchmark] = {}


@flow(name="credit-benchmark", flow_run_name="{bench_id}", persist_result=False, log_prints=False)
def benchmark_flow(bench_id: str, home: Optional[str] = None) -> dict[str, Any]:
    """A credit-assignment benchmark (create it with :func:`start_benchmark`, or resume one)."""
    bench = _BENCHES.get(bench_id) or Benchmark.open(bench_id, Path(home) if home else creditflow_home())
    _BENCHES[bench_id] = bench
    try:
        with bench.locked():
            return _drive(bench, bench.say)
    finally:
        _BENCHES.pop(bench_id, None)


def _open_parent(bench: Benchmark) -> Any:
    from flows.reporting import git_commit
    from flows.tracking import Tracker, default_tracking_uri

    tracker = Tracker(default_tracking_uri(bench.home), "creditflow", bench.home,
                      buffer=bench.root / "tracking_buffer.jsonl")
    if bench.summary.get("mlflow_run_id"):
        tracker.attach(bench.summary["mlflow_run_id"])
    else:
        tracker.start(f"benchmark {bench.obj.name} ({bench.bench_id})", tags={
            "creditflow.benchmark_id": bench.bench_id, "creditflow.kind": "benchmark",
            "mlflow.source.git.commit": git_commit()})
        bench.summary["mlflow_run_id"] = tracker.run_id
        bench.write_summary()
        # MLflow param names: alphanumerics and _ - . space : / only (cell_overrides keys are globs)
        tracker.log_params({re.sub(r"[^\w\-. :/]", "_", k): v for k, v in flatten(bench.cfg).items()})
        tracker.log_text(OmegaConf.to_yaml(bench.cfg), "benchmark/config.yaml")
    return tracker


def _drive(bench: Benchmark, say: Callable[[str], None]) -> dict[str, Any]:
    tracker = _open_parent(bench)
    grid = cells(bench.obj)
    for c in grid:
        bench.set_cell(bench.cell_record(c))
    bench.summary["status"] = "running"
    bench.summary.setdefault("budget", {})["charged"] = CHARGED
    bench.write_summary()
    todo = [c for c in grid if next(r for r in bench.summary["cells"] if r["cell_id"] == c.cell_id)["status"] not in DONE]
    say(f"benchmark {bench.bench_id}: {len(grid)} cells, {len(grid) - len(todo)} already finished, {len(todo)} to run")
    futures = {cell_task.submit(c.cell_id, str(bench.home), bench.run_id(c), list(c.overrides), tracker.run_id,
                                bench.resumed, bench.bench_id): c for c in todo}
    for fut in as_completed(list(futures)):
        cell = futures[fut]
        try:
            failure = fut.result()
        except BaseException as exc:  # the task itself failed (a worker died)
            failure = f"{type(exc).__name__}: {exc}"[:500]
        record = bench.cell_record(cell, failure)
        bench.set_cell(record)
        bench.finalize()
        bench.write_summary()
        _tag_cell(tracker, bench, record)
        say(_cell_line(record))
        for hook in CELL_HOOKS:
            hook(bench, record)
    bench.finalize()
    failed = [r for r in bench.summary["cells"] if r["status"] not in DONE]
    bench.summary["status"] = "failed" if failed else "finished"
    bench.write_summary()
    _log_parent(tracker, bench)
    tracker.finish("FAILED" if failed else "FINISHED")
    return bench.summary


def _tag_cell(tracker: Any, bench: Benchmark, record: dict[str, Any]) -> None:
    if not record.get("mlflow_run_id"):
        return
    for k, v in {"creditflow.benchmark_id": bench.bench_id, "creditflow.cell_id": record["cell_id"],
                 "creditflow.cell_status": record["status"]}.items():
        tracker._retry("tag a benchmark cell", tracker.client.set_tag, record["mlflow_run_id"], k, v)


def _log_parent(tracker: Any, bench: Benchmark) -> None:
    """The sweep and the table as metrics (at step = finished cells) and the summary as an artifact."""
    done = sum(r["status"] in DONE for r in bench.summary["cells"])
    metrics: dict[str, float] = {"cells_finished": float(done), "cells": float(len(bench.summary["cells"]))}
    for row in bench.summary["table"]:
        pre = f"{row['task']}/{row['method']}"
        for key in ("final_success_mean", "compute_to_target_mean", "ca_overhead_share_forward_tokens",
                    "ca_overhead_share_seconds", "gap_closed"):
            if row.get(key) is not None:
                metrics[f"{pre}/{key}"] = float(row[key])
        lo, hi = row["final_success_ci95"]
        if lo is not None:
            metrics[f"{pre}/final_success_ci95_low"], metrics[f"{pre}/final_success_ci95_high"] = lo, hi
    for method, s in bench.summary["methods"].items():
        if s["best_lr"] is not None:
            metrics[f"sweep/{method}/best_lr"] = float(s["best_lr"])
    if not tracker.has_step(done):
        tracker.log_step(done, metrics)
    tracker.log_json(finite_or_none(bench.summary["table"]), "benchmark/table.json")
    if bench.summary.get("frontier"):
        tracker.log_json(finite_or_none(bench.summary["frontier"]), "benchmark/frontier.json")
    tracker.log_json(finite_or_none(bench.summary), "benchmark/summary.json")
    tracker.set_tags({"creditflow.benchmark_status": bench.summary["status"]})


def _cell_line(r: dict[str, Any]) -> str:
    ev = r["final_eval_success"]
    s = r["spent"]
    return (f"  {r['cell_id']}: {r['status']} after {s['iterations']} iterations ({r['reason']}); "
            f"eval success {'-' if ev is None else f'{ev:.3f}'}; {s['forward_tokens']} forward tokens, "
            f"{s['env_steps']} env steps, {s['wall_seconds']:.1f} s")


def flow_for(bench: Benchmark) -> Any:
    """:func:`benchmark_flow` on the task runner the config names: threads of this process
    (``parallel`` at once) for ``local``, else Dask/Ray (:func:`flows.scaleout.make_task_runner`)."""
    runner = make_task_runner(bench.obj.runner) or ThreadPoolTaskRunner(max_workers=bench.obj.parallel)
    return benchmark_flow.with_options(task_runner=runner)


# ---------------------------------------------------------------------------- entry points
def _drive_flow(bench: Benchmark, say: Any, log: Any) -> dict[str, Any]:
    """Run the benchmark flow on ``bench`` (its log file started, its progress lines to ``say``)."""
    if log is not None:
        log.start(bench.log_path)
    if say is not None:
        bench.say = say
    _BENCHES[bench.bench_id] = bench
    return flow_for(bench)(bench.bench_id, str(bench.home))


def start_benchmark(name_or_path: str, overrides: Optional[list[str]] = None, home: Optional[Path] = None,
                    bench_id: Optional[str] = None, command: str = "", say: Any = None, log: Any = None) -> dict[str, Any]:
    """Validate the benchmark config (every cell), create its directory and drive the flow."""
    cfg = load_benchmark_config(name_or_path, overrides)  # before anything exists
    bench = Benchmark.create(cfg, home or creditflow_home(), bench_id=bench_id, command=command)
    return _drive_flow(bench, say, log)


def resume_benchmark(bench_id: str, home: Optional[Path] = None, say: Any = None, log: Any = None,
                     overrides: Optional[list[str]] = None) -> dict[str, Any]:
    """Re-enter a benchmark: finished cells are skipped, interrupted ones resume their training run.
    ``overrides`` may change only where cells run (``parallel``, ``runner.*``)."""
    bench = Benchmark.open(bench_id, home or creditflow_home())
    for o in overrides or []:
        key = o.split("=", 1)[0]
        if key != "parallel" and not key.startswith("runner."):
            raise ConfigError(f"{o}: only parallel and runner.* may change when a benchmark is resumed "
                              "(the other keys define its cells)")
    if overrides:
        bench.cfg = load_benchmark_config(base=bench.cfg, overrides=overrides)
        bench.obj = to_object(bench.cfg)
    return _drive_flow(bench, say, log)
