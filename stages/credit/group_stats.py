"""Group ids and per-group statistics of a batch's rows (group baselines, survey §2.3).

``index`` holds one group label per row — the rollouts of one prompt / task instance share a
label, as verl passes them (numpy array of uid strings, list, or torch tensor). GRPO, RLOO,
REINFORCE++-baseline and the step-level methods that normalize within a group (RED, SCAR, PRL,
ACPO, TEMPO) take their baselines from :func:`group_stats`: segment reductions
(``index_add_``), no loop over groups or rows.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

IndexLike = Union[np.ndarray, Sequence[Any], torch.Tensor]


def group_ids(index: IndexLike, bs: int, device: Optional[torch.device] = None) -> tuple[torch.Tensor, int]:
    """Factorize per-row group labels to contiguous ids ``0..G-1``: ``((bs,) long, G)``.

    Accepts what verl passes as ``index``: a numpy array (often of uid strings), a list, or a
    torch tensor of integer ids. Raises ``ValueError`` if the length is not ``bs``.
    """
    if isinstance(index, torch.Tensor):
        flat = index.reshape(-1)
        if flat.numel() != bs:
            raise ValueError(f"index has {flat.numel()} entries but the batch has {bs} rows")
        if flat.is_floating_point() or flat.is_complex():
            raise ValueError(f"index must hold integer group ids, got dtype {flat.dtype}")
        _, inv = torch.unique(flat, return_inverse=True)
        inv = inv.to(dtype=torch.long, device=device)
    else:
        arr = np.asarray(index)
        if arr.ndim != 1:
            arr = arr.reshape(-1)
        if arr.shape[0] != bs:
            raise ValueError(f"index has {arr.shape[0]} entries but the batch has {bs} rows")
        try:
            _, inv_np = np.unique(arr, return_inverse=True)
        except TypeError:  # mixed, unorderable labels: group by their string form
            _, inv_np = np.unique(np.array([str(x) for x in arr], dtype=object), return_inverse=True)
        inv = torch.as_tensor(np.asarray(inv_np).reshape(-1).astype(np.int64), device=device)
    G = int(inv.max().item()) + 1 if inv.numel() else 0
    return inv, G


def group_stats(
    scores: torch.Tensor, index: IndexLike, with_std: bool
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Per-row group statistics with verl's singleton rule, as segment reductions.

    Returns ``(count, mean, std, gid)`` gathered back to rows (each ``(bs,)``): ``count`` the
    group size, ``mean`` the group mean (0 for singleton groups), ``std`` the unbiased group
    standard deviation as ``torch.std`` computes it (two-pass, centred; 1 for singletons) or None.
    """
    bs = scores.shape[0]
    gid, G = group_ids(index, bs, device=scores.device)
    count = torch.zeros(G, dtype=scores.dtype, device=scores.device).index_add_(0, gid, torch.ones_like(scores))
    total = torch.zeros(G, dtype=scores.dtype, device=scores.device).index_add_(0, gid, scores)
    single = count <= 1
    mean = torch.where(single, torch.zeros_like(total), total / count.clamp(min=1))
    std = None
    if with_std:
        centred = scores - mean[gid]
        ss = torch.zeros(G, dtype=scores.dtype, device=scores.device).index_add_(0, gid, centred * centred)
        std = torch.where(single, torch.ones_like(ss), torch.sqrt(ss / (count - 1).clamp(min=1)))
        std = std[gid]
    return count[gid], mean[gid], std, gid


def pooled_turn_normalize(u: torch.Tensor, present: torch.Tensor, index: IndexLike,
                          epsilon: float = 1e-6, scale: bool = True) -> torch.Tensor:
    """Turn-level group normalisation (IGPO, CriticSearch: survey §5.5, §5.2): every present turn
    reward ``u[b, k]`` of a group's trajectories is pooled into one sample, and each is replaced by
    ``(u - mean_g) / (std_g + epsilon)`` (unbiased std over the group's pooled turns, as
    ``torch.std``; a group with a single turn reward keeps mean 0 and std 1, verl's singleton rule).
    ``scale=False``: centred only, ``u - mean_g`` (Dr. GRPO's rule, on the reward's own scale).
    ``u``, ``present``: (B, K); absent turns stay 0. Segment reductions, no loop."""
    B = u.shape[0]
    gid, G = group_ids(index, B, device=u.device)
    p = present.to(u.dtype)
    x = torch.where(present, u, torch.zeros_like(u))
    count = torch.zeros(G, dtype=u.dtype, device=u.device).index_add_(0, gid, p.sum(-1))
    total = torch.zeros(G, dtype=u.dtype, device=u.device).index_add_(0, gid, x.sum(-1))
    single = count <= 1
    mean = torch.where(single, torch.zeros_like(total), total / count.clamp(min=1))
    centred = (x - mean[gid].unsqueeze(1)) * p
    if not scale:
        return centred
    ss = torch.zeros(G, dtype=u.dtype, device=u.device).index_add_(0, gid, (centred * centred).sum(-1))
    std = torch.where(single, torch.ones_like(ss), torch.sqrt(ss / (count - 1).clamp(min=1)))
    return centred / (std[gid].unsqueeze(1) + epsilon) * p
