"""Credit heatmap artifact: turns x episodes, the method's turn credit beside the ground truth.

Two halves, so the drawing leaves the flow's critical path (issue 14): :func:`heatmap_data`
takes the few small matrices out of an iteration's batch and credit (tensor ops, ~1 ms), which the
flow writes to the tracking journal as an ``.npz`` blob; :func:`render_png` draws the figure from
that blob when the background sender sends it (``Tracker.log_rendered``), and again from the
journal on resume if the process died before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from stages.schema import Batch, CreditResult, turn_credit


def heatmap_data(batch: Batch, credit: CreditResult, title: str = "", max_episodes: int = 64) -> dict[str, np.ndarray]:
    """The heatmap's panels as arrays (episodes x turns) plus its title: what :func:`render_heatmap` draws."""
    tensors = batch.to_tensors()
    K = max(tensors.max_turns, 1)
    data: dict[str, np.ndarray] = {
        "method": turn_credit(credit.advantages.float(), tensors.turn_ids, K)[:max_episodes].numpy(),
        "title": np.array(f"{credit.granularity}-level credit, {title} (squares: decisive turns)"),
    }
    if tensors.gt_turn_advantage is not None:
        data["ground_truth"] = tensors.gt_turn_advantage[:max_episodes, :K].float().numpy()
    if tensors.decisive is not None:
        data["decisive"] = tensors.decisive[:max_episodes, :K].numpy().astype(bool)
    return data


def render_heatmap(data: dict[str, Any]) -> Any:
    """The matplotlib figure of :func:`heatmap_data`'s arrays (Agg backend, no pyplot state)."""
    from matplotlib.figure import Figure

    panels = [("method turn credit", np.asarray(data["method"], dtype=float))]
    if "ground_truth" in data:
        panels.append(("ground-truth advantage", np.asarray(data["ground_truth"], dtype=float)))
    K = panels[0][1].shape[1] if panels[0][1].ndim == 2 else 1
    # fixed margins instead of layout="constrained": the layout solver was half of the drawing time
    fig = Figure(figsize=(4 + 3 * len(panels), 4))
    axes = fig.subplots(1, len(panels), squeeze=False)
    fig.subplots_adjust(left=0.07, right=0.97, bottom=0.13, top=0.85, wspace=0.3)
    for ax, (name, mat) in zip(axes[0], panels):
        lim = float(np.abs(np.nan_to_num(mat, nan=0.0)).max(initial=0.0)) or 1.0
        im = ax.imshow(mat.T, aspect="auto", cmap="coolwarm", vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set_xlabel("episode")
        ax.set_ylabel("turn")
        ax.set_yticks(range(K))
        ax.set_title(name)
        fig.colorbar(im, ax=ax, shrink=0.8)
        if "decisive" in data:
            ys, xs = np.asarray(data["decisive"]).T.nonzero()
            ax.scatter(xs, ys, marker="s", s=6, facecolors="none", edgecolors="k", linewidths=0.4)
    fig.suptitle(str(data["title"]))
    return fig


def save_data(data: dict[str, np.ndarray], path: Path) -> None:
    """Write :func:`heatmap_data`'s arrays as the ``.npz`` blob :func:`render_png` reads."""
    with open(path, "wb") as fh:
        np.savez(fh, **data)


def render_png(src: Path, out: Path) -> None:
    """Draw the PNG ``out`` from the ``.npz`` blob ``src`` (the renderer ``Tracker.log_rendered`` names)."""
    with np.load(src, allow_pickle=False) as npz:
        data = {k: npz[k] for k in npz.files}
    render_heatmap(data).savefig(out, dpi=100)

