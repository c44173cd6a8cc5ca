"""The report's content, independent of the output format: sections of paragraphs, tables and
figures built from a :class:`flows.report.sources.ReportData` (:mod:`flows.report.render` writes
them as HTML and Markdown).

Sections follow the issue's list (survey §9.3 and Appendix C): the decision-tree recommendation
for the task profile (§7.5, Table 8) next to what was measured; success vs compute with 95% bands
over seeds; final success with intervals, compute to a target and the share of the GRPO -> oracle
gap closed; the learning-rate sweep; identification and gradient-validity metrics against ground
truth; the overhead breakdown; credit heatmaps against ground truth; the filled checklist.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from flows import checklist as checklist_mod
from flows.report import figures
from flows.report.aggregate import Group, groups
from flows.report.sources import ReportData
from stages.benchmark.learning import clip_unit, frontier_grid

IDENTIFICATION = (("rmse", "RMSE"), ("spearman", "Spearman"), ("sign_accuracy", "sign accuracy"),
                  ("zero_advantage_mass", "mass on zero-adv. turns"), ("decisive_share", "share on decisive turns"))
GRADIENT = (("shift_invariant_error", "shift-invariant error"), ("pg_cosine", "PG cosine to oracle"),
            ("batch_variance", "gradient variance between two half-batches (each holds half of every group)"))
MARK = {checklist_mod.FILLED: "✓", checklist_mod.MISSING: "✗", checklist_mod.NOT_APPLICABLE: "–"}


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Image:
    name: str
    caption: str
    png: bytes


Block = Union[str, Table, figures.Figure, Image]


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)


@dataclass
class Document:
    title: str
    subtitle: str
    sections: list[Section]


def fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) >= 1000):
        return f"{int(v):,}"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) >= 1000 or (v != 0 and abs(v) < 1e-3) else f"{v:.{digits}f}"
    return str(v)


def fmt_n(v: Any) -> str:
    """A count (or a mean of counts): thousands separators, no decimals unless it has a fraction."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return f"{v:,.0f}" if float(v).is_integer() else f"{v:,.1f}"


def fmt_lr(v: Any) -> str:
    return "—" if v is None else f"{float(v):g}"


def _clip01(ci: tuple) -> tuple:
    """A success rate's interval clipped to [0, 1] (:func:`stages.benchmark.learning.clip_unit`)."""
    mean, lo, hi = ci
    return (mean, *clip_unit(lo, hi))


def fmt_ci(mean: Optional[float], lo: Optional[float], hi: Optional[float], digits: int = 3) -> str:
    if mean is None:
        return "—"
    return fmt(mean, digits) + ("" if lo is None else f" [{fmt(lo, digits)}, {fmt(hi, digits)}]")


def _spent(key: str):
    return lambda c: (c.get("spent") or {}).get(key)


def _gt(key: str):
    return lambda c: (c.get("gt") or {}).get(key)


def _first_metadata(data: ReportData) -> Optional[dict[str, Any]]:
    return next((r.metadata for r in data.runs.values() if r.metadata), None)


def _recommendation(data: ReportData, gs: list[Group]) -> Section:
    from stages.credit import decision_tree

    sec = Section("Decision-tree recommendation vs measured (survey §7.5, Table 8)")
    meta = _first_metadata(data)
    profile = ((meta or {}).get("task") or {}).get("profile")
    if not profile:
        sec.blocks.append("No task profile recorded (no cell run's metadata.json was found, or the task family "
                          "declares no profile): the decision tree cannot be consulted.")
        return sec
    sec.blocks.append("Task profile: " + ", ".join(f"{k}={v}" for k, v in profile.items()))
    recs = decision_tree.recommend(decision_tree.TaskProfile.from_dict(profile), top_k=5)
    measured = {g.method: g.interval(lambda c: c.get("final_success")) for g in gs}
    rows = []
    for rank, r in enumerate(recs, 1):
        m = measured.get(r.method)
        rows.append([str(rank), r.display_name, fmt(r.score), r.consideration,
                     fmt_ci(*m) if m else "not run"])
    for name, m in measured.items():
        if name not in {r.method for r in recs}:
            rows.append(["—", name, "not recommended", "", fmt_ci(*m)])
    sec.blocks.append(Table(["rank", "method", "score", "key consideration (Table 8)", "measured final success [95% CI]"],
                            rows))
    best = max(measured.items(), key=lambda kv: -1 if kv[1][0] is None else kv[1][0], default=None)
    if best and best[1][0] is not None:
        top = recs[0].method if recs else None
        sec.blocks.append(f"Best measured: {best[0]} ({fmt(best[1][0])}); the tree's first choice: {top}"
                          + (" — they agree." if best[0] == top else " — they differ."))
    return sec


def _results(gs: list[Group], target: float) -> Section:
    from stages.benchmark.metrics import gap_closed

    sec = Section("Final success")
    by = {(g.method, g.task): g.interval(lambda c: c.get("final_success"))[0] for g in gs}
    gap = any(m == "grpo" for m, _ in by) and any(m == "oracle" for m, _ in by)
    headers = ["method", "task", "seeds", "final training success [95% CI]", "final eval success [95% CI]",
               f"generated tokens to success ≥ {target:g} (seeds reaching it)"]
    if gap:
        headers.append("share of GRPO → oracle gap closed")
    rows = []
    for g in gs:
        to, hit = g.compute_to_target("generated_tokens", target)
        row = [g.method, g.task, str(len(g.seeds)), fmt_ci(*_clip01(g.interval(lambda c: c.get("final_success")))),
               fmt_ci(*_clip01(g.interval(lambda c: c.get("final_eval_success")))), f"{fmt_n(to)} ({hit}/{len(g.cells)})"]
        if gap:
            nan = float("nan")
            row.append(fmt(gap_closed(*(nan if v is None else v for v in (
                by[(g.method, g.task)], by.get(("grpo", g.task)), by.get(("oracle", g.task)))))))
        rows.append(row)
    sec.blocks.append(Table(headers, rows, "Intervals: 95% Student-t over seeds, clipped to [0, 1] (none with one seed)."
                            + (" Gap closed: (method - GRPO) / (oracle - GRPO), mean final success on the same task."
                               if gap else "")))
    single = [g for g in gs if len(g.seeds) == 1]
    for g in single:
        ci = next((c.get("eval_ci95") for c in g.cells if c.get("eval_ci95")), None)
        if ci:
            sec.blocks.append(f"{g.method}: one seed; 95% Wilson interval of its final eval success over its eval "
                              f"episodes: [{fmt(ci[0])}, {fmt(ci[1])}]. Across-seed variance needs ≥ 3 seeds.")
    return sec


def _frontier(data: ReportData) -> Optional[Section]:
    """The CA efficiency frontier of a horizon sweep (summary ``frontier``), as the CLI prints it."""
    rows = data.summary.get("frontier") or []
    if not rows:
        return None
    headers, body, clipped = frontier_grid(rows)
    budget = ", ".join(f"{k}={fmt(v)}" for k, v in (data.summary.get("budget") or {}).items()
                       if v is not None and k in ("forward_tokens", "generated_tokens", "env_steps", "wall_seconds"))
    sec = Section("CA efficiency frontier (survey §9.3)", [
        f"Final success per method at each horizon H, every cell with the same budget ({budget or 'none'}): "
        "where does fine-grained credit pay for its cost? \"beats GRPO\" names the methods whose mean final "
        "success exceeds GRPO's at that H (none: nothing does)."])
    sec.blocks.append(Table(headers, body, "Mean final success over seeds at the method's best lr [95% CI] "
                            "(share of the GRPO → oracle gap closed at that H)."
                            + (" * interval clipped to [0, 1] for display." if clipped else "")))
    fwd = [[r["family"], str(r["horizon"])] + [fmt_n((r["methods"].get(m) or {}).get("forward_tokens_mean"))
                                               for m in headers[2:-1]] for r in rows]
    sec.blocks.append(Table(headers[:-1], fwd, "Mean forward tokens spent per cell (incl. the CA method's own "
                                "passes): the budget stops a cell at the end of the iteration that reaches it."))
    fig = figures.frontier(rows)
    if fig is not None:
        sec.blocks.append(fig)
    return sec


def _sweep(data: ReportData) -> Optional[Section]:
    methods = data.summary.get("methods") or {}
    if not methods:
        return None
    lrs = sorted({float(lr) for m in methods.values() for lr in (m.get("sweep") or {})})
    rows = [[name, fmt_lr(m.get("best_lr"))] + [fmt((m.get("sweep") or {}).get(_lr_key(m, lr))) for lr in lrs]
            for name, m in methods.items()]
    return Section("Learning-rate sweep", [Table(["method", "best lr"] + [f"lr={lr:g}" for lr in lrs], rows,
                                                 "Mean final success over seeds at each learning rate; the "
                                                 "other tables use each method's best learning rate.")])


def _lr_key(m: dict[str, Any], lr: float) -> str:
    return next((k for k in (m.get("sweep") or {}) if math.isclose(float(k), lr)), "")


def _gt_tables(gs: list[Group]) -> Section:
    sec = Section("Credit accuracy against ground truth")
    with_gt = [g for g in gs if any(c.get("gt") for c in g.cells)]
    if not with_gt:
        sec.blocks.append("No cell has ground-truth credit (the tasks have no exact advantage).")
        return sec
    sec.blocks.append("Identification — is the output an advantage? Gradient validity — does it push the policy "
                      "the right way? (stages/benchmark/metrics.py). A method can fail the first and pass the second.")
    for title, keys in (("Identification", IDENTIFICATION), ("Gradient validity", GRADIENT)):
        rows = [[g.method, g.task, str(len(g.values(_gt(keys[0][0])) or g.cells))]
                + [fmt_ci(*g.interval(_gt(k))) for k, _ in keys] for g in with_gt]
        sec.blocks.append(Table(["method", "task", "seeds"] + [label for _, label in keys], rows,
                                f"{title}: mean over seeds [95% CI]."))
    return sec


def _overhead(gs: list[Group]) -> Section:
    sec = Section("Compute and overhead")
    rows, bars = [], []
    for g in gs:
        mean = {k: g.interval(_spent(k))[0] for k in ("generated_tokens", "forward_tokens", "ca_forward_tokens",
                                                       "env_steps", "env_resets", "judge_calls", "wall_seconds",
                                                       "cpu_seconds", "ca_seconds", "iterations")}
        ca_tok = (mean["ca_forward_tokens"] / mean["forward_tokens"]
                  if mean["ca_forward_tokens"] is not None and mean["forward_tokens"] else None)
        ca_t = mean["ca_seconds"] / mean["wall_seconds"] if mean["ca_seconds"] is not None and mean["wall_seconds"] else None
        rows.append([g.method, g.task, fmt_n(mean["iterations"]), fmt_n(mean["generated_tokens"]),
                     fmt_n(mean["forward_tokens"]),
                     fmt_n(mean["ca_forward_tokens"]) + (f" ({ca_tok:.1%})" if ca_tok is not None else ""),
                     fmt_n(mean["env_steps"]), fmt_n(mean["env_resets"]), fmt_n(mean["judge_calls"]),
                     fmt(mean["wall_seconds"]), fmt(mean["cpu_seconds"]),
                     fmt(mean["ca_seconds"]) + (f" ({ca_t:.1%})" if ca_t is not None else "")])
        stage = {}
        if len(g.cells) == 1 and g.cells[0].get("stage_seconds"):
            stage = g.cells[0]["stage_seconds"]
        bars.append((f"{g.method} / {g.task}", mean["ca_seconds"], mean["wall_seconds"], stage))
    sec.blocks.append(Table(["method", "task", "iterations", "generated tokens", "forward tokens",
                             "CA forward tokens (share)", "env steps", "env resets", "judge calls", "wall s", "CPU s",
                             "CA s (share of wall)"], rows,
                            "Mean spent compute per cell (measured by the run; CA = the credit-assignment stage)."))
    fig = figures.overhead(bars)
    if fig is not None:
        sec.blocks.append(fig)
    return sec


def _heatmaps(data: ReportData, gs: list[Group]) -> Section:
    sec = Section("Credit heatmaps against ground truth")
    shown = 0
    for g in gs:
        for c in sorted(g.cells, key=lambda c: (c.get("seed") is None, c.get("seed"))):
            run = data.runs.get(c.get("run_id"))
            if run is not None and run.heatmap:
                sec.blocks.append(Image(f"heatmap_{len(sec.blocks)}", f"{g.method} / {g.task}, seed {c.get('seed')} "
                                        f"(run {c.get('run_id')}, {run.heatmap_name}): the method's turn credit beside "
                                        "the exact advantage (flows/heatmap.py)", run.heatmap))
                shown += 1
                break
    if not shown:
        sec.blocks.append("No cell run logged a credit heatmap that could be found.")
    return sec


def _checklist(data: ReportData) -> Section:
    sec = Section("Reporting checklist (survey Appendix C, Table 11)")
    lists = [(rid, r.checklist) for rid, r in data.runs.items() if r.checklist]
    if not lists:
        sec.blocks.append("No cell run's checklist was found.")
        return sec
    if len(lists) == 1:
        items = lists[0][1]
        sec.blocks.append(Table(["category", "priority", "item", "status", "value"],
                                [[i.category, i.priority, i.item, f"{MARK[i.status]} {i.status}", i.value or "—"]
                                 for i in items]))
    else:
        sec.blocks.append(Table(["category", "item"] + [rid for rid, _ in lists],
                                [[cat, text] + [MARK[items[k].status] for _, items in lists]
                                 for k, (_, cat, _, text) in enumerate(checklist_mod.ITEMS)],
                                "✓ reported, ✗ missing, – not applicable (cf. the survey's Table 12)."))
    req = [sum(1 for i in items if i.priority == "Required" and i.status != checklist_mod.MISSING)
           for _, items in lists]
    n_req = sum(1 for _, _, p, _ in checklist_mod.ITEMS if p == "Required")
    sec.blocks.append(f"Required items reported: {min(req)}–{max(req)} of {n_req} per run." if min(req) != max(req)
                      else f"Required items reported: {req[0]}/{n_req} per run.")
    return sec


def _cells(data: ReportData) -> Section:
    rows = [[str(c.get("cell_id")), str(c.get("method")), str(c.get("task")), fmt(c.get("seed")), fmt_lr(c.get("lr")),
             str(c.get("status")), str(c.get("reason") or ""), fmt(c.get("final_success")),
             fmt_n((c.get("spent") or {}).get("generated_tokens")), str(c.get("run_id"))] for c in data.cells]
    sec = Section("Cells", [Table(["cell", "method", "task", "seed", "lr", "status", "reason", "final success",
                                   "generated tokens", "run id"], rows)])
    missing = sorted({m for r in data.runs.values() for m in r.missing})
    if missing:
        sec.blocks.append("Not available: " + "; ".join(missing))
    return sec


def build(data: ReportData, target: float = 0.5) -> Document:
    s = data.summary
    best = {m: v.get("best_lr") for m, v in (s.get("methods") or {}).items() if v.get("best_lr") is not None}
    gs = groups(data.cells, best or None)
    meta = _first_metadata(data) or {}
    if data.kind == "run":
        c = data.cells[0]
        title = f"creditflow run {data.id}"
        sub = f"{c['method']} on {c['task']}, seed {c['seed']}, status {c['status']}"
    else:
        title = f"creditflow benchmark {data.id}"
        sub = (f"{len({c.get('method') for c in data.cells})} methods × {len({c.get('task') for c in data.cells})} "
               f"tasks × {len({c.get('seed') for c in data.cells})} seeds, {len(data.cells)} cells, status "
               f"{s.get('status')}")
    head = Section("About")
    facts = [["created", str(s.get("created") or "—")], ["command", s.get("command") or "—"],
             ["MLflow run", str(s.get("mlflow_run_id") or "—")]]
    if s.get("budget"):
        facts.append(["budget", ", ".join(f"{k}={fmt(v)}" for k, v in s["budget"].items() if v is not None)])
    if meta:
        facts += [["git commit", meta.get("git_commit", "—")], ["config hash", meta.get("config_hash", "—")],
                  ["model", f"{meta['model']['name']} ({fmt(meta['model']['parameters'])} parameters, "
                            f"{meta['model']['device']})"],
                  ["software", ", ".join(f"{k} {v}" for k, v in meta.get("software", {}).items())]]
    head.blocks.append(Table(["", ""], facts))
    sections = [head, _recommendation(data, gs)]
    curves = figures.success_curves(gs, ("generated_tokens", "forward_tokens", "env_steps"))
    sections.append(Section("Success vs compute", [curves] if curves else ["No cell has a learning curve yet."]))
    sections.append(_results(gs, target))
    front = _frontier(data)
    if front:
        sections.append(front)
    sweep = _sweep(data)
    if sweep:
        sections.append(sweep)
    sections += [_gt_tables(gs), _overhead(gs), _heatmaps(data, gs), _checklist(data), _cells(data)]
    return Document(title, sub, sections)
