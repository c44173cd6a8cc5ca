"""The benchmark metadata document of a finished training run (survey §9.5; the schema and its
validator: :mod:`stages.benchmark.metadata`).

:func:`build` assembles it from the run's live state, its checklist accumulator (measured times,
overhead, and each iteration's metrics) and the filled checklist; :func:`write` validates it and
writes ``<run dir>/metadata.json`` atomically. :func:`flows.reporting.report_finish` calls both and
logs the same document to MLflow as the artifact ``metadata.json``. A benchmark cell is a training
run: when its ``run.json`` carries ``benchmark_id`` and ``cell_id`` (the benchmark flow records
them), the document is of kind ``benchmark_cell`` and names both.
"""

from __future__ import annotations

import json
import platform
import statistics
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from typing import TYPE_CHECKING, Any, Optional

from flows import checklist as checklist_mod
from flows.config import flatten
from stages.benchmark.metadata import SCHEMA_VERSION, finite_or_none, validate

if TYPE_CHECKING:
    from flows.runtime import RunState

#: distributions whose versions the document records (missing ones are left out)
SOFTWARE = ("creditflow", "torch", "transformers", "prefect", "mlflow", "numpy", "omegaconf", "vllm")

#: per-iteration credit metrics (stages/credit/stats.py) -> the schema's ground_truth fields
GT_METRICS = {
    "rmse": "credit.gt_rmse",
    "spearman": "credit.gt_rank_corr",
    "sign_accuracy": "credit.gt_sign_agreement",
    "zero_advantage_mass": "credit.gt_zero_advantage_mass",
    "decisive_share": "credit.decisive_share",
    "shift_invariant_error": "credit.gt_shift_invariant_rmse",
    "pg_cosine": "credit.gt_pg_cosine",
    "batch_variance": "credit.gt_gradient_variance",
}


def software_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in SOFTWARE:
        try:
            out[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            if dist == "creditflow":
                out[dist] = "source checkout (not installed)"
    return out


def _total(rows: list[dict[str, float]], key: str) -> int:
    return int(round(sum(r.get(key, 0.0) for r in rows)))


def _mean(rows: list[dict[str, float]], key: str) -> Optional[float]:
    vals = [r[key] for r in rows if key in r]
    return statistics.fmean(vals) if vals else None


def _taxonomy(method_name: str, loss: str = "") -> Optional[dict[str, Any]]:
    """The run's Appendix B row. A row realized by a loss over another method's credit (SORL:
    ``credit=grpo update.loss=sorl``) shares that method's registry name; it is the run's row only
    when the run uses that loss (the row's method name, lowercased, is ``update.loss``)."""
    from stages.credit import inventory
    from stages.update import losses as _losses, turn_losses as _turn_losses  # noqa: F401  (register the losses)
    from stages.update.loss_registry import loss_names

    rows = [r for r in inventory.load_inventory() if r.registry_name == method_name]
    via_loss = set(loss_names()) - {method_name}  # rows named after a loss other than the method's own
    by_loss = [r for r in rows if r.method.lower() == loss and loss in via_loss]
    plain = [r for r in rows if r.method.lower() not in via_loss]
    for row in (by_loss or plain or rows)[:1]:
        return {"number": row.number, "method": row.method, "type": row.type, "setting": list(row.setting),
                "granularity": row.granularity, "methodology": row.methodology,
                "baseline_family": row.baseline_family, "evidence": row.evidence, "reference": row.reference,
                "status": row.status}
    return None


def _estimate(ev: dict[str, Any]) -> dict[str, Any]:
    return {"rate": ev["success_rate"], "ci95": list(ev["ci95"]), "episodes": int(ev["episodes"])}


def build(state: "RunState", acc: checklist_mod.Accumulator, items: list, before: dict[str, Any],
          after: dict[str, Any], mlflow_run_id: Optional[str], tags: dict[str, str], commit: str) -> dict[str, Any]:
    """The metadata document of a finished run (not yet validated; non-finite numbers become null).
    ``tags``: the decision-tree tags :func:`flows.reporting.recommendation_tags` recorded; ``commit``:
    the git commit of the code that ran."""
    cfg, method, family, info = state.obj, state.method, state.family, state.model_info or {}
    rows = acc.iterations
    o = acc.ca_overhead
    stage_seconds: dict[str, float] = {}
    for r in rows:
        for k, v in r.items():
            if k.startswith("time.") and k.endswith("_seconds") and not k.endswith("_cpu_seconds"):
                stage_seconds[k[5:-8]] = stage_seconds.get(k[5:-8], 0.0) + v
    all_stage = sum(stage_seconds.values())
    ca_seconds = stage_seconds.get("credit", 0.0)
    raw = state.checklist_raw
    # the CA method's own forward tokens, counted per sequence (Overhead.forward_tokens); a method that
    # counts only generated tokens falls back to those (a lower bound, as in stages.benchmark.budget)
    ca_tokens = int(o.forward_tokens) or int(o.extra_tokens)
    has_gt = any(GT_METRICS["rmse"] in r for r in rows)
    ground_truth = None
    if has_gt:
        ground_truth = {"iterations": sum(1 for r in rows if GT_METRICS["rmse"] in r)}
        ground_truth.update({name: _mean(rows, key) for name, key in GT_METRICS.items()})
    recs = [m for m in tags.get("creditflow.recommended_methods", "").split(",") if m]
    in_rec = tags.get("creditflow.method_in_recommended")
    profile = family.profile()
    run_info = state.info
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "kind": "benchmark_cell" if run_info.get("benchmark_id") else "training_run",
        "run": {"run_id": state.run_id, "mlflow_run_id": mlflow_run_id, "created": run_info.get("created"),
                "finished": datetime.now(timezone.utc).isoformat(), "status": "finished",
                "prefect_flow_runs": [x for x in run_info.get("prefect_flow_runs", []) if x],
                "notes": cfg.report.notes},
        "task": {"env": cfg.env.name,
                 "variant": None if getattr(cfg.env, "variant", None) is None else str(cfg.env.variant),
                 "description": {k: str(v) for k, v in family.describe().items()},
                 "profile": profile, "has_ground_truth": has_gt,
                 "recommendation": {"methods": recs, "method_in_recommended":
                                    {"true": True, "false": False}.get(in_rec)},
                 "config": flatten(state.cfg.env)},
        "method": {"name": method.name, "granularity": method.granularity, "methodology": method.methodology,
                   "episode_level_baseline": bool(method.episode_level_baseline), "reference": method.reference,
                   "needs": sorted(method.needs), "taxonomy": _taxonomy(method.name, cfg.update.loss)},
        "baselines": {"is_episode_level_baseline": bool(method.episode_level_baseline),
                      "baseline_run": cfg.report.baseline_run, "ablation_of": cfg.report.ablation_of},
        "model": {"name": str(info.get("name", cfg.model.name)), "parameters": int(info.get("num_parameters") or 0),
                  "version": str(info.get("version") or info.get("config_hash") or "unknown"),
                  "path": cfg.model.path or None, "device": raw.get("checklist.compute.device", "CPU")},
        "seeds": [int(cfg.seed)],
        "compute": {
            "iterations": len(rows),
            "generated_tokens": _total(rows, "rollout.generated_tokens"),
            "forward_tokens": acc.update_tokens * int(cfg.update.epochs) + ca_tokens,
            "ca_forward_tokens": ca_tokens,
            "env_steps": _total(rows, "overhead.rollout.env_steps") + int(o.env_steps),
            "env_resets": _total(rows, "overhead.rollout.env_resets") + int(o.env_resets),
            "judge_calls": int(o.judge_calls),
            "wall_seconds": acc.wall_seconds, "cpu_seconds": acc.cpu_seconds, "ca_seconds": ca_seconds,
            "ca_share": ca_seconds / all_stage if all_stage > 0 else None,
            "device_hours": float(raw.get("checklist.compute.device_hours_value", 0.0)),
            "device": raw.get("checklist.compute.device", "CPU"),
            "stage_seconds": stage_seconds,
            "ca_overhead": {k: (int(v) if k != "wall_seconds" else float(v)) for k, v in o.as_dict().items()},
        },
        "ground_truth": ground_truth,
        "results": {"metric": family.describe().get("metric", "success rate"),
                    "success_before": _estimate(before), "success_after": _estimate(after),
                    "final_train_success": rows[-1].get("reward.success_rate") if rows else None},
        "checklist": checklist_mod.as_json(items),
        "software": software_versions(),
        "git_commit": commit or "unknown",
        "config_hash": state.chash,
    }
    if doc["kind"] == "benchmark_cell":
        doc["benchmark"] = {"benchmark_id": str(run_info["benchmark_id"]), "cell_id": str(run_info.get("cell_id", ""))}
    return finite_or_none(doc)


def write(state: "RunState", doc: dict[str, Any]) -> str:
    """Validate ``doc`` (:class:`stages.benchmark.metadata.MetadataError` if it does not) and write it
    to ``<run dir>/metadata.json`` atomically; returns the path."""
    from flows.runtime import _atomic_write

    validate(doc)
    path = state.paths.root / "metadata.json"
    _atomic_write(path, json.dumps(doc, indent=1, allow_nan=False) + "\n")
    return str(path)
