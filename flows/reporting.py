"""MLflow reporting of a training run: what the flow records, and when (see :mod:`flows.tracking`).

* :func:`open_tracker` — at the start of every flow run (fresh or resumed): the MLflow run is
  started or re-attached, params = the resolved config (flattened), tags = run/config/commit ids,
  the Prefect flow runs that drove it, the decision tree's recommendation (survey §7.5), the
  sandbox backend and image; the resolved config as an artifact, and a Prefect artifact linking
  the MLflow run.
* :func:`log_iteration` — after an iteration's update: its metrics in one batch, exactly once per
  step, with the credit records, heatmaps and the reporting checklist (Appendix C) so far.
* :func:`report_finish` / :func:`report_failure` — the end of the run: eval metrics, checklist
  tags and JSON, status; or the failure tag and ``FAILED`` (never replacing the original error).
"""

from __future__ import annotations

import functools
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from flows import checklist as checklist_mod
from flows import secrets
from flows.config import flatten, to_yaml
from flows.tracking import Tracker, TrackingUnavailableError, default_tracking_uri
from stages.benchmark.budget import CHARGED, Spend
from stages.schema import Batch, CreditResult

if TYPE_CHECKING:
    from flows.runtime import RunState


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """The commit of the code that runs (``unknown`` outside a git checkout); looked up once per
    process (the code a process runs does not change under it)."""
    try:
        root = Path(__file__).resolve().parent.parent
        return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def prefect_flow_run_id() -> str:
    """The id of the Prefect flow run this code runs in ('' outside one)."""
    from prefect.context import get_run_context

    try:
        return str(get_run_context().flow_run.id)
    except Exception:
        return ""


def make_tracker(state: "RunState") -> Tracker:
    uri = state.cfg.tracking.mlflow_uri or default_tracking_uri(state.home)
    return Tracker(uri, state.cfg.tracking.experiment, state.home, buffer=state.paths.tracking_buffer,
                   retry_seconds=state.cfg.tracking.retry_seconds, background=state.cfg.tracking.background_sender)


def open_tracker(state: "RunState", logger: Any) -> Tracker:
    """Start (or re-attach to) the run's MLflow run and record what is known before any stage runs."""
    from prefect.artifacts import create_markdown_artifact

    cfg = state.obj
    tracker = make_tracker(state)
    flow_run_id = prefect_flow_run_id()
    if state.info.get("mlflow_run_id"):
        tracker.attach(state.info["mlflow_run_id"])
    else:
        tags = {"creditflow.run_id": state.run_id, "creditflow.config_hash": state.chash,
                "mlflow.source.git.commit": git_commit()}
        if cfg.tracking.parent_run_id:  # a benchmark cell: nested under the benchmark's MLflow run
            tags["mlflow.parentRunId"] = cfg.tracking.parent_run_id
        tracker.start(cfg.run_name or state.run_id, tags=tags)
        state.info["mlflow_run_id"] = tracker.run_id
    state.info.setdefault("prefect_flow_runs", []).append(flow_run_id)
    state.save_info()
    tracker.log_params(flatten(state.cfg))
    tracker.set_tags({"prefect.flow_run_id": flow_run_id,  # one journal entry, one MLflow call
                      "prefect.flow_run_ids": ",".join(x for x in state.info["prefect_flow_runs"] if x),
                      "creditflow.method": cfg.credit.method, "creditflow.env": cfg.env.name,
                      **recommendation_tags(state), **sandbox_tags(state)})
    tracker.log_text(to_yaml(state.cfg), "config/resolved.yaml")
    try:
        create_markdown_artifact(
            key=f"mlflow-{state.run_id.lower()}"[:60].replace("_", "-"),
            markdown=secrets.mask_text(f"MLflow run `{tracker.run_id}` (experiment `{cfg.tracking.experiment}`, tracking URI "
                     f"`{tracker.uri}`) for creditflow run `{state.run_id}`."),
            description="MLflow run of this training run",
        )
    except Exception as exc:  # the artifact is a convenience link; never fail a run for it
        logger.warning("could not create the Prefect artifact linking the MLflow run: %s", exc)
    return tracker


def report_failure(state: "RunState", tracker: Tracker, exc: BaseException) -> None:
    """A crash is visible in MLflow (a kill -9 leaves RUNNING; `creditflow resume` continues either
    way); reporting it must not replace the original error (tracking store down, disk full)."""
    try:
        tracker.set_tags({"creditflow.failure": f"{type(exc).__name__}: {exc}"[:500]})
        tracker.finish("FAILED")
    except Exception as report_exc:
        print(f"warning: could not record the failure in MLflow: {type(report_exc).__name__}: {report_exc}",
              file=sys.stderr)
    try:
        state.info["status"] = "failed"
        state.save_info()
    except OSError as report_exc:
        print(f"warning: could not write {state.paths.info}: {report_exc}", file=sys.stderr)


def log_iteration(state: "RunState", tracker: Tracker, it: int, metrics: dict[str, float], batch: Batch,
                  credit: CreditResult, acc: checklist_mod.Accumulator, before: dict[str, Any],
                  final: Optional[bool] = None) -> None:
    """Iteration ``it``'s metrics (once per step; a resumed step already logged is skipped), then its
    credit records (e.g. InT's interventions), heatmap (every ``tracking.heatmap_every`` and at the
    ``final`` iteration: the last one, or the one a budget stopped at) and checklist."""
    cfg = state.obj
    acc.iterations.append(dict(metrics))  # also on resume (a step logged before): the run's metadata sums them
    if not tracker.log_step(it, metrics):
        return
    for key, record in (getattr(credit, "records", None) or {}).items():
        tracker.log_json(record, f"credit/{key}/iter_{it:04d}.json")
    heat_every = cfg.tracking.heatmap_every
    final = it + 1 == cfg.iterations if final is None else final
    if heat_every and ((it + 1) % heat_every == 0 or final):
        log_heatmap(tracker, batch, credit, it)
    tracker.set_tags(checklist_tags(state, checklist_mod.fill(state, acc, tracker, before, None)))


def report_finish(state: "RunState", tracker: Tracker, acc: checklist_mod.Accumulator, before: dict[str, Any],
                  after: dict[str, Any], step: Optional[int] = None) -> list:
    """The final step's eval metrics (at ``step``: the iterations run, ``iterations`` by default),
    the filled checklist (tags + JSON), ``FINISHED``; returns its items."""
    cfg = state.obj
    tracker.log_step(cfg.iterations if step is None else step, {"eval.success_rate_before": before["success_rate"],
                                      "eval.success_rate": after["success_rate"],
                                      "eval.ci95_low": after["ci95"][0], "eval.ci95_high": after["ci95"][1]})
    items = checklist_mod.fill(state, acc, tracker, before, after)
    tracker.set_tags(checklist_tags(state, items))
    tracker.set_tags({"creditflow.success_before": f"{before['success_rate']:.4f}",
                      "creditflow.success_after": f"{after['success_rate']:.4f}"})
    tracker.log_json(checklist_mod.as_json(items), "checklist.json")
    write_metadata(state, tracker, acc, items, before, after)
    tracker.finish("FINISHED")
    state.info["status"] = "finished"
    state.save_info()
    return items


def write_metadata(state: "RunState", tracker: Tracker, acc: checklist_mod.Accumulator, items: list,
                   before: dict[str, Any], after: dict[str, Any]) -> str:
    """The run's benchmark metadata (survey §9.5; :mod:`flows.metadata`), validated against the
    shipped schema, written to ``<run dir>/metadata.json`` and logged to MLflow as ``metadata.json``.
    A document that does not validate is a bug of its builder: it is not written, the MLflow run gets
    the reason as the tag ``creditflow.metadata_error`` and a warning is printed; the run's results
    stay (returns ``""``)."""
    from flows import metadata
    from stages.benchmark.metadata import MetadataError

    # secrets masked like every other file of the run (the document carries config text, e.g. report.notes)
    doc = secrets.mask_config(metadata.build(state, acc, items, before, after, tracker.run_id,
                                             recommendation_tags(state), git_commit()), state.cfg)
    try:
        path = metadata.write(state, doc)
    except MetadataError as exc:
        tracker.set_tags({"creditflow.metadata_error": str(exc)[:5000]})
        print(f"warning: run {state.run_id}: no metadata.json written: {exc}", file=sys.stderr)
        return ""
    tracker.log_json(doc, "metadata.json")
    return path


def recommendation_tags(state: "RunState") -> dict[str, str]:
    """Was the chosen method among the decision tree's candidates for this task (survey §7.5)?"""
    from stages.credit import decision_tree

    profile = state.family.profile()
    if profile is None:
        return {"creditflow.method_in_recommended": "unknown (task family declares no profile)"}
    recs = decision_tree.recommend(decision_tree.TaskProfile.from_dict(profile), top_k=5)
    names = [r.method for r in recs]
    return {
        "creditflow.task_profile": json.dumps(profile, sort_keys=True),
        "creditflow.recommended_methods": ",".join(names),
        "creditflow.method_in_recommended": str(state.obj.credit.method in names).lower(),
    }


def sandbox_tags(state: "RunState") -> dict[str, str]:
    """Which sandbox backend the run's environments execute in, and the image (its digest)."""
    if not state.family.needs_sandbox:
        return {"creditflow.sandbox": "none (the task family executes no code)"}
    backend = state.sandbox_backend
    tags = {"creditflow.sandbox": str(getattr(backend, "chosen", backend.name)),
            "creditflow.sandbox.requested": str(getattr(backend, "requested", state.obj.sandbox.backend))}
    digest = getattr(backend, "image_digest", None)
    if digest:
        tags["creditflow.sandbox.image"] = str(getattr(backend, "image", state.obj.sandbox.image))
        tags["creditflow.sandbox.image_digest"] = str(digest)
    return tags


def checklist_tags(state: "RunState", items: list) -> dict[str, str]:
    return {**checklist_mod.as_tags(items), **{k: str(v) for k, v in state.checklist_raw.items()}}


def iteration_metrics(results: dict[str, Any]) -> dict[str, float]:
    """One iteration's MLflow metrics from its stage results: per-stage wall/CPU time and overhead
    counters, and each stage's statistics under its name (finite numbers only)."""
    m: dict[str, float] = {}
    for stage, r in results.items():
        m[f"time.{stage}_seconds"] = r.wall_seconds
        m[f"time.{stage}_cpu_seconds"] = r.cpu_seconds
        for k, v in r.overhead.as_dict().items():
            if k != "wall_seconds" and v:
                m[f"overhead.{stage}.{k}"] = float(v)
    m["overhead.credit.wall_seconds"] = results["credit"].overhead.wall_seconds
    for stage in ("env", "rollout", "reward", "credit", "update"):
        for k, v in results[stage].stats.items():
            m[f"{stage}.{k}"] = v
    return {k: float(v) for k, v in m.items() if isinstance(v, (int, float)) and math.isfinite(float(v))}


def log_heatmap(tracker: Tracker, batch: Optional[Batch], credit: Optional[CreditResult], iteration: int) -> None:
    """The credit heatmap of an iteration as a PNG artifact, drawn by the tracker's sender off the
    flow's path (:mod:`flows.heatmap`); a plotting error is a warning only."""
    try:
        from flows.heatmap import heatmap_data, save_data

        data = heatmap_data(batch, credit, title=f"iteration {iteration}")
        tracker.log_rendered(lambda p: save_data(data, p), "flows.heatmap:render_png",
                             f"heatmaps/credit_iter_{iteration:04d}.png")
    except TrackingUnavailableError:  # the store, not the plot: the run must fail clearly (journal kept)
        raise
    except Exception as exc:  # plotting must never kill training; say why
        print(f"warning: credit heatmap for iteration {iteration} failed: {exc}", file=sys.stderr)


#: per-iteration credit metrics against ground truth kept in a run's curve (``credit.<key>``)
CURVE_GT_KEYS = ("gt_rmse", "gt_rank_corr", "gt_sign_agreement", "gt_zero_advantage_mass", "decisive_share",
                 "gt_shift_invariant_rmse", "gt_pg_cosine", "gt_gradient_variance")


def curve_row(it: int, spent: Spend, metrics: dict[str, float]) -> dict[str, Any]:
    """One point of the run's success-vs-compute curve: cumulative compute after iteration ``it``."""
    row: dict[str, Any] = {"iteration": it, **spent.as_dict(),
                           "success": metrics.get("reward.success_rate", float("nan")),
                           "eval_success": metrics.get("eval.success_rate")}
    row.update({k: metrics[f"credit.{k}"] for k in CURVE_GT_KEYS if f"credit.{k}" in metrics})
    return row


def save_budget(state: RunState, spent: Spend, curve: list[dict[str, Any]], stop_reason: Optional[str],
                 done: int, uncharged: Optional[dict[str, Spend]] = None) -> None:
    """The run's spend, stop reason and curve in ``run.json`` (read by ``creditflow benchmark``), and
    what prepare and the evaluations spent, reported apart (``uncharged``: not charged to the budget)."""
    state.info["budget"] = {"limits": dict(state.obj.budget.limits()), "max_iterations": state.obj.iterations,
                            "spent": spent.as_dict(), "stop_reason": stop_reason, "iterations_done": done,
                            "curve": curve, "charged": CHARGED,
                            "uncharged": {k: v.as_dict() for k, v in (uncharged or {}).items()}}
    state.save_info()
