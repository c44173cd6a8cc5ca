"""The report's figures (matplotlib, Agg): success vs compute with 95% bands over seeds, and the
overhead breakdown. Each figure is returned as a :class:`Figure`: inline SVG for the HTML page
and PNG bytes for the Markdown's image files (no CDN, no network)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from flows.report.aggregate import Group  # noqa: E402

AXIS_LABELS = {"generated_tokens": "generated tokens", "forward_tokens": "forward-pass tokens",
               "env_steps": "environment steps", "wall_seconds": "wall seconds"}


@dataclass
class Figure:
    name: str  # file stem, e.g. "curves"
    caption: str
    svg: str  # inline <svg>...</svg>
    png: bytes


def _export(fig, name: str, caption: str) -> Figure:
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]  # drop the XML prolog and DOCTYPE: the element is inlined in HTML
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=90)
    plt.close(fig)
    return Figure(name, caption, svg, png.getvalue())


def success_curves(groups: list[Group], axes: tuple[str, ...]) -> Optional[Figure]:
    """One panel per compute axis: each (method, task)'s mean training success over seeds with its
    95% Student-t band (no band with one seed)."""
    axes = tuple(a for a in axes if any(g.band(a) is not None for g in groups))
    if not axes:
        return None
    fig, panels = plt.subplots(1, len(axes), figsize=(5.2 * len(axes), 3.8), squeeze=False, layout="constrained")
    tasks = {g.task for g in groups}
    for ax, axis in zip(panels[0], axes):
        for g in groups:
            b = g.band(axis)
            if b is None:
                continue
            x, mean, lo, hi, n = b
            label = f"{g.method}" + (f" / {g.task}" if len(tasks) > 1 else "") + f" (n={n})"
            (line,) = ax.plot(x, mean, label=label, lw=1.6)
            if lo is not None:
                ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
        ax.set_xlabel(f"cumulative {AXIS_LABELS.get(axis, axis)}")
        ax.set_ylabel("training success")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    panels[0][0].legend(fontsize=8, loc="best")
    n_max = max(len(g.seeds) for g in groups)
    return _export(fig, "curves", "Training success vs compute: mean over seeds, shaded 95% Student-t band"
                   + ("" if n_max > 1 else " (one seed: no band)") + ".")


def overhead(rows: list[tuple[str, float, float, dict[str, float]]]) -> Optional[Figure]:
    """Bars of mean wall seconds per method, split into the CA stage and the rest; ``rows`` =
    (label, ca seconds, total wall seconds, per-stage seconds or {})."""
    rows = [r for r in rows if r[2] and r[2] > 0]
    if not rows:
        return None
    stages = sorted({s for r in rows for s in r[3]})
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(rows) + 1.6), layout="constrained")
    labels = [r[0] for r in rows]
    if stages:  # per-stage breakdown (a run's metadata has it)
        left = [0.0] * len(rows)
        for s in stages:
            vals = [r[3].get(s, 0.0) for r in rows]
            ax.barh(labels, vals, left=left, label=s)
            left = [a + b for a, b in zip(left, vals)]
    else:
        ca = [r[1] or 0.0 for r in rows]
        ax.barh(labels, ca, label="credit assignment", color="tab:red")
        ax.barh(labels, [r[2] - c for r, c in zip(rows, ca)], left=ca, label="everything else", color="tab:gray")
    ax.set_xlabel("wall seconds (mean over seeds)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, axis="x")
    return _export(fig, "overhead", "Where the wall time went: the credit-assignment stage against the rest"
                   + (" (per stage of the training iterations, summed; the table's wall seconds also count model "
                      "preparation and evaluation)" if stages else "") + ".")


def frontier(rows: list[dict]) -> Optional[Figure]:
    """The CA efficiency frontier (:func:`stages.benchmark.learning.frontier_table`): final
    success vs horizon H per method at the benchmark's one budget, one panel per configured task,
    error bars = the 95% interval over seeds (clipped to [0, 1]). Fixed margins (no layout solver)."""
    families = list(dict.fromkeys(r["family"] for r in rows))
    if not families or not any(v["final_success_mean"] is not None for r in rows for v in r["methods"].values()):
        return None
    fig, panels = plt.subplots(1, len(families), figsize=(5.4 * len(families), 3.8), squeeze=False)
    fig.subplots_adjust(left=0.1 / len(families), right=0.78 if len(families) == 1 else 0.88, bottom=0.15, top=0.9,
                        wspace=0.25)
    methods = list(dict.fromkeys(m for r in rows for m in r["methods"]))
    for ax, fam in zip(panels[0], families):
        mine = sorted((r for r in rows if r["family"] == fam), key=lambda r: r["horizon"])
        for m in methods:
            pts = [(r["horizon"], r["methods"][m]) for r in mine
                   if m in r["methods"] and r["methods"][m]["final_success_mean"] is not None]
            if not pts:
                continue
            hs = [h for h, _ in pts]
            ys = [v["final_success_mean"] for _, v in pts]
            err = [[y - (v["final_success_ci95_shown"][0] if v["final_success_ci95_shown"][0] is not None else y)
                    for y, (_, v) in zip(ys, pts)],
                   [(v["final_success_ci95_shown"][1] if v["final_success_ci95_shown"][1] is not None else y) - y
                    for y, (_, v) in zip(ys, pts)]]
            ax.errorbar(hs, ys, yerr=err, marker="o", ms=4, lw=1.5, capsize=3, label=m)
        ax.set_xscale("log", base=2)
        ax.set_xticks([r["horizon"] for r in mine], [str(r["horizon"]) for r in mine])
        ax.minorticks_off()
        ax.set_xlabel("horizon H (turns)")
        ax.set_ylabel("final success")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(fam, fontsize=9)
        ax.grid(alpha=0.3)
    panels[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _export(fig, "frontier", "CA efficiency frontier: final success vs horizon per method at the same "
                   "compute budget for every cell; bars: 95% Student-t interval over seeds, clipped to [0, 1] "
                   "(none with one seed).")
