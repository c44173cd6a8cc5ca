"""Across-seed aggregation of benchmark cells (survey §9.3: "success-vs-compute curves with 95%
bands over >= 3 seeds", final success with confidence intervals, compute to reach a target).

Intervals are Student-t 95% intervals of the mean over seeds (``t_{0.975, n-1} * s / sqrt(n)``);
with one seed there is no interval (``None``), never a made-up one. Curves of different seeds are
put on a common compute grid by linear interpolation, up to the compute every seed reached.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np


def t_interval(values: list[float]) -> tuple[Optional[float], Optional[float], Optional[float]]:
    """(mean, low, high) of the 95% Student-t interval of the mean; ``None`` bounds for n < 2."""
    vals = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if vals.size == 0:
        return None, None, None
    mean = float(vals.mean())
    if vals.size < 2:
        return mean, None, None
    from scipy.stats import t

    half = float(t.ppf(0.975, vals.size - 1) * vals.std(ddof=1) / math.sqrt(vals.size))
    return mean, mean - half, mean + half


@dataclass
class Group:
    """The cells of one (method, task) pair: one per seed (and learning rate, for the sweep)."""

    method: str
    task: str
    cells: list[dict[str, Any]]

    @property
    def seeds(self) -> list[int]:
        return sorted({c.get("seed") for c in self.cells})

    def values(self, getter: Any) -> list[float]:
        out = []
        for c in self.cells:
            try:
                v = getter(c)
            except (KeyError, TypeError):
                v = None
            if v is not None and isinstance(v, (int, float)) and math.isfinite(v):
                out.append(float(v))
        return out

    def interval(self, getter: Any) -> tuple[Optional[float], Optional[float], Optional[float]]:
        return t_interval(self.values(getter))

    def band(self, axis: str, points: int = 60) -> Optional[tuple[np.ndarray, np.ndarray, Optional[np.ndarray],
                                                                  Optional[np.ndarray], int]]:
        """(x grid, mean success, band low, band high, seeds) of success vs cumulative ``axis``."""
        curves = []
        for c in self.cells:
            pts = [(p.get(axis), p.get("success")) for p in c.get("curve") or []]
            pts = [(float(x), float(y)) for x, y in pts if x is not None and y is not None]
            if pts:
                xs, ys = np.asarray(pts).T
                order = np.argsort(xs, kind="stable")
                curves.append((xs[order], ys[order]))
        if not curves:
            return None
        top = min(float(xs[-1]) for xs, _ in curves)
        start = max(float(xs[0]) for xs, _ in curves)
        if top <= start:
            start = 0.0
        grid = np.linspace(start, top, points) if top > start else np.asarray([top])
        ys = np.stack([np.interp(grid, xs, y) for xs, y in curves])
        mean = ys.mean(0)
        if len(curves) < 2:
            return grid, mean, None, None, 1
        from scipy.stats import t

        half = t.ppf(0.975, len(curves) - 1) * ys.std(0, ddof=1) / math.sqrt(len(curves))
        return grid, mean, np.clip(mean - half, 0, 1), np.clip(mean + half, 0, 1), len(curves)

    def compute_to_target(self, axis: str, target: float) -> tuple[Optional[float], int]:
        """Mean compute (``axis``) at which a seed's curve first reaches ``target``; and how many did."""
        hits = []
        for c in self.cells:
            for p in c.get("curve") or []:
                if p.get("success") is not None and p["success"] >= target and p.get(axis) is not None:
                    hits.append(float(p[axis]))
                    break
        return (float(np.mean(hits)) if hits else None), len(hits)


def groups(cells: list[dict[str, Any]], best_lr: Optional[dict[str, float]] = None) -> list[Group]:
    """Cells grouped by (method, task), in first-seen order; with ``best_lr`` (method -> lr) only
    the cells of each method's best learning rate (the sweep's other cells are reported apart)."""
    by: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for c in cells:
        lr = (best_lr or {}).get(c.get("method"))
        if lr is not None and c.get("lr") is not None and not math.isclose(float(c["lr"]), float(lr)):
            continue
        by[(str(c.get("method")), str(c.get("task")))].append(c)
    return [Group(m, t, cs) for (m, t), cs in by.items()]
