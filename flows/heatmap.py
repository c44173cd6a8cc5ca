"""Credit heatmap artifact: turns x episodes, the method's turn credit beside the ground truth."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from stages.schema import Batch, CreditResult, turn_credit  # noqa: E402


def credit_heatmap(batch: Batch, credit: CreditResult, title: str = "", max_episodes: int = 64):
    tensors = batch.to_tensors()
    K = max(tensors.max_turns, 1)
    tc = turn_credit(credit.advantages.float(), tensors.turn_ids, K)[:max_episodes]
    panels = [("method turn credit", tc)]
    if tensors.gt_turn_advantage is not None:
        panels.append(("ground-truth advantage", tensors.gt_turn_advantage[:max_episodes, :K]))
    # fixed margins instead of layout="constrained": the layout solver was half of the drawing time
    # (0.64 s vs 0.28 s a figure here), and it is drawn on the flow's critical path
    fig, axes = plt.subplots(1, len(panels), figsize=(4 + 3 * len(panels), 4), squeeze=False)
    fig.subplots_adjust(left=0.07, right=0.97, bottom=0.13, top=0.85, wspace=0.3)
    for ax, (name, mat) in zip(axes[0], panels):
        m = mat.clone()
        lim = float(torch.nan_to_num(m, nan=0.0).abs().max()) or 1.0
        im = ax.imshow(m.T.numpy(), aspect="auto", cmap="coolwarm", vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set_xlabel("episode")
        ax.set_ylabel("turn")
        ax.set_yticks(range(K))
        ax.set_title(name)
        fig.colorbar(im, ax=ax, shrink=0.8)
        if tensors.decisive is not None:
            d = tensors.decisive[:max_episodes, :K].T.numpy()
            ys, xs = d.nonzero()
            ax.scatter(xs, ys, marker="s", s=6, facecolors="none", edgecolors="k", linewidths=0.4)
    fig.suptitle(f"{credit.granularity}-level credit, {title} (squares: decisive turns)")
    return fig
