"""The reporting checklist of survey Appendix C, filled automatically for every run.

Values come from the resolved config and from measurements of the run itself (parameter
count, measured process CPU time or GPU wall time, overhead counters, trajectory lengths),
never from guesses. Items that cannot be measured (an ablation, a compute-matched baseline)
are filled from ``report.*`` config keys and checked against the tracking store, or listed as
missing. ``creditflow checklist RUN_ID`` prints one run; ``creditflow audit`` prints all runs
side by side, as the survey's Table 12 does for papers.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from stages.schema import Batch, Overhead

#: (key, category, priority, item text) — the 14 items of Appendix C, in order
ITEMS: list[tuple[str, str, str, str]] = [
    ("model.base_model", "Model & Data", "Required", "Base model name, size, and version"),
    ("data.training_data", "Model & Data", "Required", "Training data: source, size, and any filtering applied"),
    ("ca.granularity", "CA Method", "Required", "Credit granularity (token / segment / step / turn / multi-agent)"),
    ("ca.methodology", "CA Method", "Required", "Methodology family per the survey's taxonomy"),
    ("baseline.episode_level", "Baselines", "Required",
     "At least one episode-level baseline (GRPO or PPO) with identical base model"),
    ("baseline.compute", "Baselines", "Required",
     "Baseline training recipe: same compute budget or explicit compute comparison"),
    ("baseline.ablation", "Baselines", "Recommended", "CA-component ablation isolating the contribution"),
    ("eval.benchmark", "Evaluation", "Required", "Benchmark names and specific splits"),
    ("eval.metric", "Evaluation", "Required", "Evaluation metric with exact definition"),
    ("eval.variance", "Evaluation", "Recommended", "Variance estimates (std across 3 seeds, or confidence intervals)"),
    ("compute.device_hours", "Compute", "Required", "Total GPU-hours for training (device-hours, measured)"),
    ("compute.ca_overhead", "Compute", "Recommended",
     "CA-specific overhead: additional forward passes, environment resets, or LLM calls"),
    ("trajectory.avg_length", "Trajectory Info", "Required",
     "Average trajectory length (tokens for reasoning, turns for agentic)"),
    ("trajectory.length_distribution", "Trajectory Info", "Recommended", "Trajectory length distribution (min, median, max)"),
]

FILLED, MISSING, NOT_APPLICABLE = "filled", "missing", "n/a"


@dataclass
class Item:
    key: str
    category: str
    priority: str
    item: str
    status: str
    value: str = ""


@dataclass
class Accumulator:
    """Measurements gathered while the flow walks the stages (cached results included)."""

    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    ca_overhead: Overhead = field(default_factory=Overhead)
    traj_tokens: list[int] = field(default_factory=list)
    traj_turns: list[int] = field(default_factory=list)
    episodes: int = 0
    #: prompt + response tokens of the trained trajectories (one update pass over them; x epochs = update forwards)
    update_tokens: int = 0
    #: each iteration's MLflow metrics (:func:`flows.reporting.log_iteration`; the run's metadata sums them)
    iterations: list[dict[str, float]] = field(default_factory=list)

    def add_stage(self, result: Any) -> None:
        self.cpu_seconds += result.cpu_seconds
        self.wall_seconds += result.wall_seconds

    def add_batch(self, batch: Batch, credit_overhead: Overhead) -> None:
        self.ca_overhead = self.ca_overhead + credit_overhead
        self.update_tokens += sum(len(t.prompt_ids) + len(t.response_ids) for t in batch.trajectories)
        self.traj_tokens.extend(len(t.response_ids) for t in batch.trajectories)
        self.traj_turns.extend(len(t.turns) for t in batch.trajectories)
        self.episodes += len(batch)


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score 95% interval of a binomial proportion."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _baseline_run_facts(tracker: Any, run_ref: str) -> Optional[dict[str, str]]:
    """Tags of the run named by ``report.baseline_run`` (creditflow run id or MLflow run id)."""
    client = tracker.client
    runs = client.search_runs([tracker.experiment_id], filter_string=f"tags.`creditflow.run_id` = '{run_ref}'")
    if not runs:
        try:
            runs = [client.get_run(run_ref)]
        except Exception:
            return None
    return dict(runs[0].data.tags)


def fill(state: Any, acc: Accumulator, tracker: Any, before: Optional[dict], after: Optional[dict]) -> list[Item]:
    cfg, method, family = state.obj, state.method, state.family
    info = state.model_info or {}
    desc = family.describe()
    values: dict[str, tuple[str, str]] = {}

    params = info.get("num_parameters")
    values["model.base_model"] = (FILLED, (
        f"{info.get('name', cfg.model.name)}; {params:,} parameters; version "
        f"{info.get('version') or info.get('config_hash', 'unknown')}"
        + (f"; path {cfg.model.path}" if cfg.model.path else "; built locally (tiny Qwen2 architecture)")
    ) if params else "")
    values["data.training_data"] = (FILLED, (
        f"source: {desc.get('source', family.name)}; size: {desc.get('size', '?')}; "
        f"filtering: {desc.get('filtering', 'none')}; used: {acc.episodes} training episodes"
    ))
    device = "GPU" if str(state.device).startswith("cuda") else "CPU"
    hours = (acc.wall_seconds if device == "GPU" else acc.cpu_seconds) / 3600
    values["ca.granularity"] = (FILLED, f"{method.granularity} ({method.name})")
    note = method.checklist_note()
    values["ca.methodology"] = (FILLED, method.methodology + (f"; {note}" if note else ""))

    if cfg.report.baseline_run:
        # looked up once per run (fill runs after every iteration; the baseline run does not change)
        looked_up = state.baseline_tags
        if cfg.report.baseline_run not in looked_up:
            looked_up[cfg.report.baseline_run] = _baseline_run_facts(tracker, cfg.report.baseline_run)
        tags = looked_up[cfg.report.baseline_run]
        mine = f"{info.get('name')}|{info.get('config_hash')}"
        if tags is None:
            values["baseline.episode_level"] = (MISSING, f"report.baseline_run={cfg.report.baseline_run} not found")
            values["baseline.compute"] = (MISSING, "")
        else:
            theirs = f"{tags.get('checklist.model.name')}|{tags.get('checklist.model.config_hash')}"
            same = theirs == mine
            is_baseline = tags.get("checklist.ca.episode_level_baseline") == "true"
            values["baseline.episode_level"] = (
                FILLED if same and is_baseline else MISSING,
                f"run {cfg.report.baseline_run} ({tags.get('creditflow.method')}"
                f"{'' if is_baseline else ', NOT an episode-level baseline'}); base model "
                f"{'identical' if same else 'DIFFERS: ' + theirs}",
            )
            try:
                theirs_h = float(tags.get("checklist.compute.device_hours_value", "nan"))
            except ValueError:
                theirs_h = float("nan")
            mine_h = hours
            values["baseline.compute"] = (
                FILLED if math.isfinite(theirs_h) else MISSING,
                f"this run {mine_h:.4f} device-hours vs baseline {theirs_h:.4f} (ratio {mine_h / theirs_h:.2f})"
                if math.isfinite(theirs_h) and theirs_h > 0 else "baseline compute not recorded",
            )
    elif method.episode_level_baseline:
        values["baseline.episode_level"] = (FILLED, f"this run is an episode-level baseline ({method.name})")
        values["baseline.compute"] = (NOT_APPLICABLE, "this run is itself the episode-level baseline")
    else:
        values["baseline.episode_level"] = (MISSING, "set report.baseline_run to the id of a GRPO/PPO run")
        values["baseline.compute"] = (MISSING, "")
    values["baseline.ablation"] = (
        (FILLED, f"ablation of run {cfg.report.ablation_of}") if cfg.report.ablation_of else (MISSING, "")
    )
    values["eval.benchmark"] = (FILLED, desc.get("benchmark", f"{family.name}: train / eval splits"))
    values["eval.metric"] = (FILLED, desc.get("metric", "success rate"))
    if after is not None or before is not None:
        ev = after or before
        lo, hi = ev["ci95"]
        values["eval.variance"] = (FILLED, (
            f"95% Wilson CI of the success rate over {ev['episodes']} eval episodes: [{lo:.3f}, {hi:.3f}] "
            f"(single seed {cfg.seed}; across-seed std needs >= 3 runs)"))
    else:
        values["eval.variance"] = (MISSING, "")
    values["compute.device_hours"] = (FILLED, (
        f"{hours:.5f} {device}-hours measured "
        f"({'wall time x 1 GPU' if device == 'GPU' else 'process CPU time, user+system'}, "
        f"all stages incl. warm-up and eval; wall {acc.wall_seconds / 3600:.5f} h)"))
    o = acc.ca_overhead
    values["compute.ca_overhead"] = (FILLED, (
        f"extra forward passes {o.extra_forward_passes}, extra tokens {o.extra_tokens}, env resets {o.env_resets}, "
        f"env steps {o.env_steps}, judge calls {o.judge_calls}, credit wall {o.wall_seconds:.3f}s"))
    if acc.traj_tokens:
        values["trajectory.avg_length"] = (FILLED, (
            f"{statistics.fmean(acc.traj_turns):.2f} turns, {statistics.fmean(acc.traj_tokens):.1f} tokens "
            f"(over {len(acc.traj_tokens)} training episodes)"))
        values["trajectory.length_distribution"] = (FILLED, (
            f"turns min/median/max {min(acc.traj_turns)}/{statistics.median(acc.traj_turns):g}/{max(acc.traj_turns)}; "
            f"tokens {min(acc.traj_tokens)}/{statistics.median(acc.traj_tokens):g}/{max(acc.traj_tokens)}"))
    else:
        values["trajectory.avg_length"] = (MISSING, "")
        values["trajectory.length_distribution"] = (MISSING, "")
    items = [Item(k, c, p, t, *values[k]) for k, c, p, t in ITEMS]
    # raw values other runs compare against (not printed as items)
    state.checklist_raw = {
        "checklist.model.name": info.get("name", cfg.model.name),
        "checklist.model.config_hash": info.get("config_hash", ""),
        "checklist.model.parameters": params or "",
        "checklist.compute.device_hours_value": f"{hours:.6f}",
        "checklist.compute.device": device,
        "checklist.ca.episode_level_baseline": "true" if method.episode_level_baseline else "false",
    }
    return items


def as_tags(items: list[Item]) -> dict[str, str]:
    tags = {}
    for it in items:
        tags[f"checklist.{it.key}"] = it.value or "(missing)"
        tags[f"checklist.{it.key}.status"] = it.status
    missing = [it.key for it in items if it.status == MISSING]
    tags["checklist.missing"] = ",".join(missing) or "none"
    tags["checklist.required_missing"] = ",".join(it.key for it in items
                                                  if it.status == MISSING and it.priority == "Required") or "none"
    return tags


def as_json(items: list[Item]) -> list[dict[str, str]]:
    return [asdict(it) for it in items]


def from_tags(tags: dict[str, str]) -> list[Item]:
    out = []
    for key, cat, prio, text in ITEMS:
        status = tags.get(f"checklist.{key}.status", MISSING)
        value = tags.get(f"checklist.{key}", "")
        out.append(Item(key, cat, prio, text, status, "" if value == "(missing)" else value))
    return out


def render(items: list[Item]) -> str:
    mark = {FILLED: "✓", MISSING: "✗", NOT_APPLICABLE: "–"}
    lines, cat = [], None
    for it in items:
        if it.category != cat:
            cat = it.category
            lines.append(f"\n{cat}")
        lines.append(f"  {mark[it.status]} [{it.priority:<11}] {it.item}")
        lines.append(f"      {it.status}: {it.value or '—'}")
    n_req = sum(1 for it in items if it.priority == "Required")
    ok_req = sum(1 for it in items if it.priority == "Required" and it.status != MISSING)
    lines.append(f"\nRequired items reported: {ok_req}/{n_req}; recommended: "
                 f"{sum(1 for it in items if it.priority == 'Recommended' and it.status != MISSING)}"
                 f"/{sum(1 for it in items if it.priority == 'Recommended')}")
    return "\n".join(lines).lstrip("\n")


def render_audit(runs: list[tuple[str, list[Item]]]) -> str:
    """Items x runs table (✓ reported, ✗ missing, – not applicable), like the survey's Table 12."""
    mark = {FILLED: "✓", MISSING: "✗", NOT_APPLICABLE: "–"}
    names = [name for name, _ in runs]
    width = max([len(n) for n in names] + [4])
    head = f"{'Category':<16} {'Item':<44} " + " ".join(f"{n[-width:]:>{width}}" for n in names)
    lines = [head, "-" * len(head)]
    for idx, (key, cat, prio, text) in enumerate(ITEMS):
        short = text if len(text) <= 44 else text[:41] + "..."
        cells = " ".join(f"{mark[items[idx].status]:>{width}}" for _, items in runs)
        lines.append(f"{cat:<16} {short:<44} {cells}")
    totals = " ".join(f"{sum(1 for i in items if i.status != MISSING):>{width}}" for _, items in runs)
    lines.append(f"{'':<16} {'items reported (of 14)':<44} {totals}")
    return "\n".join(lines)
