"""Preference pairs for the DPO-family losses of stage 5 (:mod:`stages.update.dpo_losses`).

One mechanism: the credit stage hands the update its per-token advantages as for every loss,
and the update turns them into pairs here, so every credit method whose granularity a DPO loss
accepts composes with it. Both builders are vectorized (sorts and scatters; no loop over rows,
turns or tokens) and deterministic (ties keep the batch order).

* :func:`trajectory_pairs` (``needs=("trajectory_pairs",)``): within each group (same task,
  ``BatchTensors.index``) the trajectory with the highest advantage is *chosen*, the one with the
  lowest *rejected* (best vs worst outcome for episode-level credit), where the two differ.
* :func:`turn_pairs` (``needs=("turn_pairs",)``): turns taken at the same *anchor* — the same
  group and the same environment state before the turn (``BatchTensors.turn_anchors``, the
  ``Turn.state_key`` ids; GiGPO's anchor states) — the turn with the highest turn advantage is
  chosen, the lowest rejected, where they differ. A turn's advantage is its tokens' mean.
"""

from __future__ import annotations

import torch

#: score gap below which two units count as tied (no pair)
TIE = 1e-6


def best_vs_worst(keys: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(P, 2) long positions (into the flat ``keys``) of the (highest, lowest) score of each key
    with at least two valid entries whose scores differ by more than :data:`TIE`."""
    pos = valid.nonzero().squeeze(-1)
    if pos.numel() < 2:
        return torch.zeros((0, 2), dtype=torch.long)
    k, s = keys[pos], scores[pos].double()
    o = torch.sort(s, stable=True).indices  # ascending score, then stable by key:
    o = o[torch.sort(k[o], stable=True).indices]  # each key's run is sorted by score
    _, counts = torch.unique_consecutive(k[o], return_counts=True)
    ends = counts.cumsum(0)
    starts = ends - counts
    lo, hi = o[starts], o[ends - 1]
    keep = (counts >= 2) & (s[hi] - s[lo] > TIE)
    return torch.stack([pos[hi[keep]], pos[lo[keep]]], dim=-1)


def trajectory_pairs(advantages: torch.Tensor, mask: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(P, 2) long (chosen row, rejected row): per group the highest vs the lowest mean advantage
    over the row's policy tokens (rows without policy tokens take no part)."""
    m = mask.float()
    n = m.sum(-1)
    score = (advantages.float() * m).sum(-1) / n.clamp(min=1)
    return best_vs_worst(index.long(), score, n > 0)


def turn_scores(advantages: torch.Tensor, mask: torch.Tensor, turn_ids: torch.Tensor,
                num_turns: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K) mean advantage of each turn's policy tokens and (B, K) bool presence."""
    B = advantages.shape[0]
    K = max(int(num_turns), 1)
    valid = ((turn_ids >= 0) & (mask != 0)).float()
    idx = turn_ids.clamp(min=0, max=K - 1)
    zeros = torch.zeros((B, K))
    count = zeros.scatter_add(1, idx, valid)
    total = zeros.scatter_add(1, idx, advantages.float() * valid)
    return total / count.clamp(min=1), count > 0


def turn_pairs(advantages: torch.Tensor, mask: torch.Tensor, index: torch.Tensor, turn_ids: torch.Tensor,
               anchors: "torch.Tensor | None") -> torch.Tensor:
    """(P, 4) long (chosen row, chosen turn, rejected row, rejected turn): per (group, anchor state)
    the highest vs the lowest turn advantage. ``anchors`` (B, K) long ids of the state before each
    turn (-1 absent); ``None`` (tensors built without turns' states): the turn index is the anchor."""
    K = max(int(turn_ids.max()) + 1 if turn_ids.numel() else 1, 1)
    if anchors is not None:
        K = max(K, anchors.shape[1])
    score, present = turn_scores(advantages, mask, turn_ids, K)
    B = score.shape[0]
    if anchors is None:
        anchor = torch.arange(K).expand(B, K)
    else:
        anchor = torch.full((B, K), -1, dtype=torch.long)
        anchor[:, : anchors.shape[1]] = anchors.long()
        present = present & (anchor >= 0)
    n_anchor = int(anchor.max()) + 1 if anchor.numel() else 1
    key = index.long().unsqueeze(1) * max(n_anchor, 1) + anchor.clamp(min=0)
    flat = best_vs_worst(key.reshape(-1), score.reshape(-1), present.reshape(-1))
    return torch.stack([flat[:, 0] // K, flat[:, 0] % K, flat[:, 1] // K, flat[:, 1] % K], dim=-1)


def restrict(pairs: torch.Tensor, rows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The pairs whose rows all lie in the mini-batch ``rows`` (indices into the batch), with the
    row columns (0 and, for turn pairs, 2) renumbered to positions in ``rows``."""
    local = torch.full((batch_size,), -1, dtype=torch.long)
    local[rows] = torch.arange(rows.numel())
    cols = [0, 1] if pairs.shape[1] == 2 else [0, 2]
    out = pairs.clone()
    for c in cols:  # the 1 or 2 row columns of a pair, not rows of the batch
        out[:, c] = local[pairs[:, c]]
    keep = (out[:, cols] >= 0).all(-1) if pairs.numel() else torch.zeros(0, dtype=torch.bool)
    return out[keep]


def group_major_permutation(index: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random order of the rows that keeps each group's rows together (groups shuffled, rows
    shuffled inside a group), so a mini-batch of a multiple of the group size holds whole groups
    and no pair is split between mini-batches."""
    B = index.numel()
    _, group = torch.unique(index, return_inverse=True)
    group_rank = torch.randperm(int(group.max()) + 1 if B else 1, generator=gen)[group]
    o = torch.randperm(B, generator=gen)  # random order of rows ...
    return o[torch.sort(group_rank[o], stable=True).indices]  # ... grouped by shuffled group rank
