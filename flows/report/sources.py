"""What a report reads: a training run (its run directory + MLflow) or a benchmark's
``summary.json`` (the contract between ``creditflow benchmark`` and ``creditflow report``).

Both become a :class:`ReportData`: a list of *cells* in the summary's cell format (a single run is
a benchmark of one cell), plus what only the run directories and MLflow hold: each cell run's
metadata document (``metadata.json``, :mod:`flows.metadata`), its checklist and its latest credit
heatmap PNG (:mod:`flows.heatmap`, logged by the training flow). A cell whose run is not under the
home (or not in the tracking store) keeps what the summary says and the report says what is missing.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from flows import checklist as checklist_mod

#: the curve x-axes a report plots (cumulative compute of the contract's curve entries)
COMPUTE_AXES = ("generated_tokens", "forward_tokens", "env_steps", "wall_seconds")


class UnknownReportId(LookupError):
    """Neither a run nor a benchmark of that id exists under the home."""


@dataclass
class CellRun:
    """What a cell's training run left: metadata, checklist items, heatmap PNG bytes (each optional)."""

    metadata: Optional[dict[str, Any]] = None
    checklist: Optional[list[checklist_mod.Item]] = None
    heatmap: Optional[bytes] = None
    heatmap_name: str = ""
    mlflow_run_id: Optional[str] = None
    missing: list[str] = field(default_factory=list)


@dataclass
class ReportData:
    kind: str  # "run" | "benchmark"
    id: str
    summary: dict[str, Any]  # the benchmark summary (for a run: the one-cell summary built from it)
    runs: dict[str, CellRun]  # cell run id -> what its run left

    @property
    def cells(self) -> list[dict[str, Any]]:
        return self.summary.get("cells", [])


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tracker(home: Path, run_dir: Optional[Path]) -> Any:
    """A read-only tracker on the store the run logged to (its config's tracking keys, else the home's)."""
    from flows.tracking import Tracker, default_tracking_uri

    uri, experiment = None, "creditflow"
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(run_dir / "config.yaml")
        uri = OmegaConf.select(cfg, "tracking.mlflow_uri")
        experiment = OmegaConf.select(cfg, "tracking.experiment") or experiment
    return Tracker(uri or default_tracking_uri(home), experiment, home, retry_seconds=5)


def _mlflow_run(tracker: Any, run_id: str, mlflow_run_id: Optional[str]) -> Any:
    client = tracker.client
    if mlflow_run_id:
        try:
            return client.get_run(mlflow_run_id)
        except Exception:
            pass
    found = client.search_runs([tracker.experiment_id], filter_string=f"tags.`creditflow.run_id` = '{run_id}'")
    return found[0] if found else None


def _latest_heatmap(tracker: Any, mlrun: Any) -> tuple[Optional[bytes], str]:
    client = tracker.client
    try:
        names = sorted(a.path for a in client.list_artifacts(mlrun.info.run_id, "heatmaps") if a.path.endswith(".png"))
    except Exception:
        return None, ""
    if not names:
        return None, ""
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(mlrun.info.run_id, names[-1], tmp)
        return Path(local).read_bytes(), names[-1]


def read_cell_run(home: Path, run_id: str, mlflow_run_id: Optional[str] = None,
                  tracker: Any = None) -> tuple[CellRun, Any, Any]:
    """A cell run's metadata (run dir), checklist and heatmap (MLflow); also the tracker and MLflow run."""
    run_dir = home / "runs" / run_id
    out = CellRun(mlflow_run_id=mlflow_run_id)
    if not run_dir.is_dir():
        out.missing.append(f"run {run_id} is not under {home / 'runs'}")
        return out, None, None
    out.metadata = _read_json(run_dir / "metadata.json")
    if out.metadata is None:
        out.missing.append(f"{run_dir / 'metadata.json'} is absent (run not finished?)")
    else:
        out.checklist = [checklist_mod.Item(**i) for i in out.metadata["checklist"]]
    tracker = tracker or _tracker(home, run_dir)
    mlrun = _mlflow_run(tracker, run_id, mlflow_run_id or (out.metadata or {}).get("run", {}).get("mlflow_run_id"))
    if mlrun is None:
        out.missing.append(f"run {run_id} is not in the tracking store {tracker.uri}")
        return out, tracker, None
    out.mlflow_run_id = mlrun.info.run_id
    if out.checklist is None:
        out.checklist = checklist_mod.from_tags(mlrun.data.tags)
    out.heatmap, out.heatmap_name = _latest_heatmap(tracker, mlrun)
    if out.heatmap is None:
        out.missing.append(f"run {run_id} logged no credit heatmap (tracking.heatmap_every=0?)")
    return out, tracker, mlrun


def _history(client: Any, mlrun_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(mlrun_id, key)}


def run_as_cell(run_id: str, cell: CellRun, tracker: Any, mlrun: Any) -> dict[str, Any]:
    """One training run in the summary's cell format (contract.md): curve from its MLflow metrics
    (cumulative compute per iteration), spent compute and ground truth from its metadata."""
    meta = cell.metadata or {}
    client = tracker.client
    success = _history(client, mlrun.info.run_id, "reward.success_rate")
    gen = _history(client, mlrun.info.run_id, "rollout.generated_tokens")
    steps = _history(client, mlrun.info.run_id, "overhead.rollout.env_steps")
    time_keys = [k for k in mlrun.data.metrics if k.startswith("time.") and k.endswith("_seconds")
                 and not k.endswith("_cpu_seconds")]
    walls = [_history(client, mlrun.info.run_id, k) for k in time_keys]
    evals = _history(client, mlrun.info.run_id, "eval.success_rate")
    curve, g, s, w = [], 0.0, 0.0, 0.0
    for it in sorted(success):
        g, s = g + gen.get(it, 0.0), s + steps.get(it, 0.0)
        w += sum(h.get(it, 0.0) for h in walls)
        curve.append({"iteration": it, "generated_tokens": int(g), "forward_tokens": None, "env_steps": int(s),
                      "wall_seconds": w, "success": success[it], "eval_success": evals.get(it)})
    comp = meta.get("compute", {})
    params = mlrun.data.params
    res = meta.get("results", {})
    after = (res.get("success_after") or {}).get("rate")
    return {
        "cell_id": run_id, "method": mlrun.data.tags.get("creditflow.method", params.get("credit.method", "?")),
        "task": mlrun.data.tags.get("creditflow.env", params.get("env.name", "?")),
        "seed": int(params.get("seed", 0)), "lr": float(params["update.lr"]) if "update.lr" in params else None,
        "run_id": run_id, "mlflow_run_id": mlrun.info.run_id,
        "status": (mlrun.info.status or "").lower(), "reason": mlrun.data.tags.get("creditflow.failure", ""),
        "spent": {"generated_tokens": comp.get("generated_tokens"), "forward_tokens": comp.get("forward_tokens"),
                  "ca_forward_tokens": comp.get("ca_forward_tokens"), "env_steps": comp.get("env_steps"),
                  "env_resets": comp.get("env_resets"), "judge_calls": comp.get("judge_calls"),
                  "wall_seconds": comp.get("wall_seconds"), "cpu_seconds": comp.get("cpu_seconds"),
                  "ca_seconds": comp.get("ca_seconds"), "iterations": comp.get("iterations", len(curve))},
        "curve": curve,
        "final_success": curve[-1]["success"] if curve else None,
        "final_eval_success": after if after is not None else evals.get(max(evals)) if evals else None,
        "eval_ci95": (res.get("success_after") or {}).get("ci95"),
        "gt": meta.get("ground_truth"),
        "stage_seconds": comp.get("stage_seconds"),
    }


def load(home: Path, report_id: str) -> ReportData:
    """The run or benchmark named ``report_id`` under ``home`` (:class:`UnknownReportId` if neither)."""
    summary_path = home / "benchmarks" / report_id / "summary.json"
    if summary_path.is_file():
        summary = _read_json(summary_path)
        if summary is None:
            raise UnknownReportId(f"benchmark {report_id}: {summary_path} is not valid JSON")
        runs: dict[str, CellRun] = {}
        tracker = None
        for c in summary.get("cells", []):
            if c.get("run_id") and c["run_id"] not in runs:
                runs[c["run_id"]], t, _ = read_cell_run(home, c["run_id"], c.get("mlflow_run_id"), tracker)
                tracker = tracker or t
        return ReportData("benchmark", report_id, summary, runs)
    if (home / "runs" / report_id / "config.yaml").is_file():
        cell, tracker, mlrun = read_cell_run(home, report_id)
        if mlrun is None:
            raise UnknownReportId(f"run {report_id}: {'; '.join(cell.missing)}")
        one = run_as_cell(report_id, cell, tracker, mlrun)
        meta = cell.metadata or {}
        summary = {"benchmark_id": report_id, "created": (meta.get("run") or {}).get("created"),
                   "command": "", "status": one["status"], "config": {}, "mlflow_run_id": one["mlflow_run_id"],
                   "budget": None, "cells": [one], "methods": {}}
        return ReportData("run", report_id, summary, {report_id: cell})
    known_runs = sorted(p.name for p in (home / "runs").glob("*")) if (home / "runs").is_dir() else []
    known_b = sorted(p.name for p in (home / "benchmarks").glob("*")) if (home / "benchmarks").is_dir() else []
    raise UnknownReportId(
        f"no run or benchmark {report_id!r} under {home} (runs: {', '.join(known_runs[-5:]) or 'none'}; "
        f"benchmarks: {', '.join(known_b[-5:]) or 'none'})")
