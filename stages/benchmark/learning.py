"""Learning results of a benchmark over seeds (survey §9.2, §9.5): the learning-rate sweep, final
success with a 95% t-interval, compute to reach a target success, CA overhead share, and the share
of the GRPO -> oracle gap a method closes; and the CA efficiency frontier (survey §9.3, issue 15):
those results over a sweep of the task's horizon at one compute budget.

Pure functions on plain records (one dict per cell, as ``summary.json`` holds them: ``method``,
``task``, ``seed``, ``lr``, ``final_success``, ``final_eval_success``, ``spent``, ``curve``), so the
report reads the same numbers the benchmark wrote.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Iterable, Optional

from stages.benchmark.metrics import gap_closed

#: the episode-level baseline and the upper bound of the gap-closed column
BASELINE, ORACLE = "grpo", "oracle"


def _finite(xs: Iterable[Optional[float]]) -> list[float]:
    return [float(x) for x in xs if x is not None and math.isfinite(float(x))]


def mean(xs: Iterable[Optional[float]]) -> float:
    v = _finite(xs)
    return sum(v) / len(v) if v else float("nan")


def t_interval(xs: Iterable[Optional[float]], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and two-sided Student-t confidence interval over seeds: ``(mean, low, high)``;
    one value gives ``(x, nan, nan)`` (no spread to estimate), none gives nans."""
    from scipy.stats import t

    v = _finite(xs)
    n = len(v)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    m = sum(v) / n
    if n < 2:
        return m, float("nan"), float("nan")
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (n - 1))
    half = float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return m, m - half, m + half


def clip_unit(lo: Optional[float], hi: Optional[float]) -> tuple[Optional[float], Optional[float]]:
    """A success rate's interval clipped to [0, 1] for display: the t-interval of a mean of rates
    can leave it (few seeds, high spread); the raw interval is kept next to it. None stays None."""
    return (None if lo is None else min(max(lo, 0.0), 1.0)), (None if hi is None else max(min(hi, 1.0), 0.0))


def score(cell: dict[str, Any], by: str) -> Optional[float]:
    """The cell's final success by ``by`` (``eval_success``: the eval split after training, falling
    back to the last training batch's success when the cell has no eval; ``success``: the latter)."""
    if by == "eval_success" and cell.get("final_eval_success") is not None:
        return cell["final_eval_success"]
    return cell.get("final_success")


def lr_sweep(cells: list[dict[str, Any]], by: str = "eval_success") -> dict[str, dict[str, Any]]:
    """Per method: mean final success over seeds (and tasks) of every lr, and the best lr.

    ``{method: {"best_lr": lr, "sweep": {str(lr): mean}}}``; cells without a score (failed,
    unfinished) do not count; ties go to the smaller lr; a method none of whose lrs has a score
    gets ``best_lr`` None."""
    by_method: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for c in cells:
        s = score(c, by) if c.get("status") in ("finished", "budget_spent") else None
        by_method[c["method"]][float(c["lr"])]  # every lr of the sweep appears
        if s is not None and math.isfinite(float(s)):
            by_method[c["method"]][float(c["lr"])].append(float(s))
    out: dict[str, dict[str, Any]] = {}
    for method, per_lr in by_method.items():
        sweep = {lr: mean(v) for lr, v in sorted(per_lr.items())}
        scored = [(m, -lr, lr) for lr, m in sweep.items() if math.isfinite(m)]
        best = max(scored)[2] if scored else None
        out[method] = {"best_lr": best, "sweep": {repr(lr): (m if math.isfinite(m) else None) for lr, m in sweep.items()}}
    return out


def compute_to_target(curve: list[dict[str, Any]], target: float, measure: str, key: str = "success") -> Optional[float]:
    """The cumulative compute ``measure`` (e.g. ``forward_tokens``) at the first iteration whose
    ``key`` success reaches ``target``; None if it never does."""
    for row in curve:
        v = row.get(key)
        if v is not None and math.isfinite(float(v)) and float(v) >= target:
            return float(row[measure])
    return None


def _none(x: float) -> Optional[float]:
    return x if x is not None and math.isfinite(x) else None


def learning_table(cells: list[dict[str, Any]], sweep: dict[str, dict[str, Any]], target: float,
                   measure: str, by: str = "eval_success") -> list[dict[str, Any]]:
    """One row per (task, method) at the method's best lr: mean final success with its 95%
    t-interval over seeds (``final_success_ci95``: raw, may leave [0, 1];
    ``final_success_ci95_shown``: clipped to [0, 1] for display, ``ci95_clipped`` says whether it was), compute to reach ``target`` (mean over the seeds that reached it, and
    how many did), the CA overhead share of the compute (``ca_forward_tokens / forward_tokens`` and
    ``ca_seconds / wall_seconds``), and the share of the GRPO -> oracle gap closed on that task."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for c in cells:
        best = sweep.get(c["method"], {}).get("best_lr")
        if best is not None and float(c["lr"]) == float(best) and c.get("status") in ("finished", "budget_spent"):
            groups[(c["task"], c["method"])].append(c)
    rows = []
    for (task, method), cs in sorted(groups.items()):
        m, lo, hi = t_interval(score(c, by) for c in cs)
        reached = [compute_to_target(c.get("curve", []), target, measure) for c in cs]
        hit = [r for r in reached if r is not None]
        fwd = sum(c["spent"].get("forward_tokens", 0) for c in cs)
        wall = sum(c["spent"].get("wall_seconds", 0.0) for c in cs)
        shown = clip_unit(_none(lo), _none(hi))
        rows.append({
            "task": task, "method": method, "lr": float(cs[0]["lr"]), "seeds": len(cs),
            "final_success_mean": _none(m), "final_success_ci95": [_none(lo), _none(hi)],
            "final_success_ci95_shown": list(shown), "ci95_clipped": shown != (_none(lo), _none(hi)),
            "compute_measure": measure, "target_success": target,
            "compute_to_target_mean": (sum(hit) / len(hit)) if hit else None, "seeds_reaching_target": len(hit),
            "forward_tokens_mean": fwd / len(cs),
            "ca_overhead_share_forward_tokens": (sum(c["spent"].get("ca_forward_tokens", 0) for c in cs) / fwd) if fwd else None,
            "ca_overhead_share_seconds": (sum(c["spent"].get("ca_seconds", 0.0) for c in cs) / wall) if wall else None,
        })
    by_task = {(r["task"], r["method"]): r["final_success_mean"] for r in rows}
    for r in rows:
        base, orc = by_task.get((r["task"], BASELINE)), by_task.get((r["task"], ORACLE))
        gc = gap_closed(r["final_success_mean"], base, orc) if None not in (r["final_success_mean"], base, orc) else float("nan")
        r["gap_closed"] = _none(gc + 0.0)  # (-0.0 -> 0.0)
    return rows


def frontier_table(rows: list[dict[str, Any]], cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The CA efficiency frontier (survey §9.3: "more rollouts with crude credit, or fewer with
    precise credit?"): one row per (configured task, horizon H) of a horizon sweep, ordered by H,
    holding each method's final success at its best lr (mean over seeds, the display interval),
    the share of the GRPO -> oracle gap it closes at that H, and its mean forward tokens spent
    (every cell has the same budget, so the methods are compared at equal compute). ``beats_grpo``
    names the methods whose mean final success exceeds GRPO's at that H (empty: none does; None:
    GRPO not run). ``rows`` is :func:`learning_table`'s output, ``cells`` the cell records (their
    ``horizon`` and ``family``); tasks without a horizon are not part of it."""
    where = {c["task"]: (c.get("family") or c["task"], c["horizon"]) for c in cells if c.get("horizon") is not None}
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for r in rows:
        if r["task"] not in where:
            continue
        family, h = where[r["task"]]
        row = out.setdefault((family, h), {"family": family, "horizon": h, "task": r["task"], "methods": {}})
        row["methods"][r["method"]] = {
            "final_success_mean": r["final_success_mean"], "final_success_ci95_shown": r["final_success_ci95_shown"],
            "ci95_clipped": r["ci95_clipped"], "gap_closed": r["gap_closed"], "seeds": r["seeds"], "lr": r["lr"],
            "forward_tokens_mean": r.get("forward_tokens_mean")}
    for row in out.values():
        ms = row["methods"]
        base = (ms.get(BASELINE) or {}).get("final_success_mean")
        row["beats_grpo"] = None if base is None else [
            m for m, v in ms.items() if m != BASELINE and v["final_success_mean"] is not None and v["final_success_mean"] > base]
    return [out[k] for k in sorted(out, key=lambda k: (k[0], k[1]))]


def frontier_grid(frontier: list[dict[str, Any]]) -> tuple[list[str], list[list[str]], bool]:
    """The frontier as text for the CLI summary and the report: headers ``task, H, <method>...,
    beats GRPO``, one row per (task, H); a method's cell is ``success [ci] (gap)``, e.g.
    ``0.500 [0.20, 0.80] (+0.25)`` (``*`` after the interval: clipped to [0, 1] for display; no
    interval with one seed; ``(no gap)``: the oracle is not above GRPO at that H, so no share is defined); GRPO first, the oracle last. Returns (headers, rows, whether any interval was clipped)."""
    methods: list[str] = []
    for row in frontier:
        methods += [m for m in row["methods"] if m not in methods]
    methods.sort(key=lambda m: (m != BASELINE, m == ORACLE))  # GRPO first, the oracle last
    clipped = False
    body = []
    for row in frontier:
        line = [row["family"], str(row["horizon"])]
        for m in methods:
            v = row["methods"].get(m)
            if v is None or v["final_success_mean"] is None:
                line.append("-")
                continue
            lo, hi = v["final_success_ci95_shown"]
            ci = "" if lo is None else f" [{lo:.2f}, {hi:.2f}]{'*' if v['ci95_clipped'] else ''}"
            clipped = clipped or bool(v["ci95_clipped"])
            gap = " (no gap)" if v["gap_closed"] is None else f" ({v['gap_closed']:+.2f})"
            line.append(f"{v['final_success_mean']:.3f}{ci}{gap}")
        beats = row["beats_grpo"]
        line.append("GRPO not run" if beats is None else (", ".join(beats) if beats else "none"))
        body.append(line)
    return ["task", "H"] + methods + ["beats GRPO"], body, clipped
