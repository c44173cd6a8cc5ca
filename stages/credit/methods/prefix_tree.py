"""TEMPO: tree-estimated mean prefix values with branch-gated TD (Tran et al. 2025; survey §3.2).

The responses of one group (one prompt) form a prefix tree (Prefix-to-Tree, P2T): a node is a
distinct token prefix, its value ``V(s)`` is the mean outcome of the group's responses that pass
through it (non-parametric, no critic, no extra generation). TEMPO adds to GRPO's group-relative
advantage a temporal-difference correction at *branching* tokens::

    A_{i,t} = z_i + td_coef * [s_t branches] * (V(s_{t+1}) - V(s_t))

with ``z_i`` the GRPO advantage of response ``i`` (``(R_i - mean_g) / (std_g + eps)``) and
``s_t`` the prefix before token ``t``. At a node with a single child both values average the same
responses, so the TD term is zero there and TEMPO reduces to GRPO; at a branching node the chosen
token gets the exact value difference between the child it leads to and the node. Values use the
normalized outcomes ``z`` (``normalize_values``; the paper's mean *normalized* reward), so the TD
term is on the same scale as ``z``.

The root (the bare prompt) branches in every group of distinct responses; its TD term,
``V(first-token child) - mean_g z``, re-measures what GRPO's group advantage already measures, so
by default it is left out (``root_td``): then a group whose responses share no prefix gets exactly
GRPO's advantages, as the paper states.

The end of a response is a child of its own (an end symbol): a response that stops where others
continue makes the node branch. Observation tokens of multi-turn responses are part of the prefix
(a stochastic environment can branch there); advantages are zero outside ``response_mask``.

Vectorization and cost (no Python loop over rows, tokens or tree nodes): rows are sorted
lexicographically by (group, tokens + 1, end symbol 0) with one ``numpy.lexsort``; the longest
common prefix of sorted neighbours (``cumprod`` of equal tokens) identifies the tree exactly —
prefix ``L`` of sorted row ``i`` opens a new node iff ``lcp(i-1, i) < L`` — so node ids are a
column-wise ``cumsum``; node values and child counts are ``scatter_add`` over the ``B x (R + 1)``
(row, prefix length) pairs. Time ``O(B R log B)``, memory ``O(B R)``; the tree is exact (no
hashing).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from stages.credit import functional as F
from stages.credit.group_stats import group_ids
from stages.credit.base import CreditConfig, CreditContext, CreditMethod
from stages.credit.registry import register_method
from stages.schema import Batch, BatchTensors, CreditResult
from stages.config_fields import param


@dataclass
class PrefixTree:
    """The prefix trees of a batch's groups. ``node[i, L]`` (B, R+2) is the node of row ``i``'s
    prefix of length ``L`` (``L = len_i + 1`` is the end-symbol leaf; larger ``L``: -1);
    ``value`` (N,) mean score below each node; ``children`` (N,) number of distinct children;
    ``depth`` (N,) prefix length; ``lengths`` (B,) response lengths."""

    node: torch.Tensor
    value: torch.Tensor
    children: torch.Tensor
    depth: torch.Tensor
    lengths: torch.Tensor


def build_prefix_tree(response_ids: torch.Tensor, lengths: torch.Tensor, gid: torch.Tensor, scores: torch.Tensor) -> PrefixTree:
    """Exact prefix trees of the groups ``gid`` over ``response_ids[:, :lengths]`` (vectorized)."""
    B, R = response_ids.shape
    dev = response_ids.device
    pos = torch.arange(R + 1, device=dev)
    # symbols: token id + 1 inside the response, 0 (end symbol) at position len, -1 after
    x = torch.full((B, R + 1), -1, dtype=torch.long, device=dev)
    x[:, :R] = response_ids.long() + 1
    x = torch.where(pos < lengths.unsqueeze(1), x, torch.where(pos == lengths.unsqueeze(1), 0, -1))
    keys = np.concatenate([x.cpu().numpy()[:, ::-1].T, gid.cpu().numpy()[None, :]], axis=0)
    order = torch.as_tensor(np.lexsort(keys), dtype=torch.long, device=dev)  # last key = primary (group)
    xs, gs = x[order], gid[order]
    # lcp(i-1, i) in symbols (end symbol included), 0 across groups
    eq = (xs[1:] == xs[:-1]) & (xs[1:] >= 0)
    lcp = torch.zeros(B, dtype=torch.long, device=dev)
    if B > 1:
        lcp[1:] = torch.where(gs[1:] == gs[:-1], eq.long().cumprod(-1).sum(-1), torch.full_like(gs[1:], -1))
    else:
        lcp[:] = -1
    lcp[0] = -1
    L = torch.arange(R + 2, device=dev)  # prefix length 0..R+1 (R+1 only as an end leaf)
    len_s = lengths[order]
    exists = L.unsqueeze(0) <= (len_s.unsqueeze(1) + 1)
    new = (lcp.unsqueeze(1) < L.unsqueeze(0)) & exists  # prefix L of row i opens a node
    col_ids = new.long().cumsum(0) - 1  # node index within column L
    per_col = new.long().sum(0)
    offset = torch.zeros(R + 2, dtype=torch.long, device=dev)
    offset[1:] = per_col.cumsum(0)[:-1]
    node_sorted = torch.where(exists, col_ids + offset.unsqueeze(0), torch.full_like(col_ids, -1))
    node = torch.empty_like(node_sorted)
    node[order] = node_sorted
    N = int(per_col.sum())
    flat = node.clamp(min=0)
    w = exists[torch.argsort(order)].to(scores.dtype)  # back in batch order
    tot = torch.zeros(N, dtype=scores.dtype, device=dev).scatter_add_(0, flat.reshape(-1), (scores.unsqueeze(1) * w).reshape(-1))
    cnt = torch.zeros(N, dtype=scores.dtype, device=dev).scatter_add_(0, flat.reshape(-1), w.reshape(-1))
    value = tot / cnt.clamp(min=1)
    # children: distinct prefixes of length L+1 under a node of length L
    child_new = new[:, 1:] & exists[:, 1:]
    parent = node_sorted[:, :-1].clamp(min=0)
    children = torch.zeros(N, dtype=torch.long, device=dev).scatter_add_(0, parent.reshape(-1), child_new.long().reshape(-1))
    depth = torch.repeat_interleave(torch.arange(R + 2, device=dev), per_col)
    return PrefixTree(node=node, value=value, children=children, depth=depth, lengths=lengths)


@dataclass
class TEMPOConfig(CreditConfig):
    method: str = param("tempo", help="credit-assignment method (registry name; TEMPO, Tran et al. 2025)")
    td_coef: float = param(1.0, help="weight of the branch-gated TD term added to the GRPO advantage (Tran et al. 2025)")
    normalize_values: bool = param(True, help="node values from group-normalized outcomes (the paper's mean normalized reward); false: raw returns")
    root_td: bool = param(False, help="also add the TD term at the root's branching (double-counts the group advantage; off: no shared prefix -> GRPO)")
    norm_adv_by_std: bool = param(True, help="divide the group advantage by the group std (GRPO, Shao et al. 2024)")
    epsilon: float = param(1e-6, help="added to the group std (GRPO)", ge=0)


@register_method
class TEMPO(CreditMethod):
    """TEMPO (Tran et al. 2025, "Exploiting Tree Structure for Credit Assignment in RL Training of
    LLMs"; survey §3.2): GRPO's group advantage plus branch-gated TD corrections
    ``V(child) - V(node)`` from the group's prefix tree (module docstring). Token-level credit,
    no extra compute (no forward pass, no generation)."""

    name = "tempo"
    needs_group = True  # group baseline: rollout.group_size=1 gives zero advantages
    Config = TEMPOConfig
    granularity = "token"
    methodology = "Tree-TD (prefix-tree values, branch-gated TD on GRPO)"
    reference = "Tran et al. 2025 (TEMPO / Prefix-to-Tree); survey §3.2, Appendix B row 7"

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: TEMPOConfig = self.cfg  # type: ignore[assignment]
        rewards = tensors.token_level_rewards
        rewards = rewards if rewards.is_floating_point() else rewards.float()
        mask = (tensors.response_mask != 0).to(rewards.dtype)
        scores = (rewards * mask).sum(-1)
        z = F._grpo_scalars(rewards, mask, tensors.index, cfg.epsilon, cfg.norm_adv_by_std)
        gid, G = group_ids(tensors.index, scores.shape[0], device=scores.device)
        R = tensors.response_ids.shape[1]
        lengths = tensors.attention_mask[:, tensors.prompt_len :].sum(-1).long().clamp(max=R)
        tree = build_prefix_tree(tensors.response_ids, lengths, gid, z if cfg.normalize_values else scores)
        before = tree.node[:, :R]  # s_t: prefix of length t
        after = tree.node[:, 1 : R + 1]  # s_{t+1}
        inside = torch.arange(R).unsqueeze(0) < lengths.unsqueeze(1)
        vb = tree.value[before.clamp(min=0)]
        va = tree.value[after.clamp(min=0)]
        branching = tree.children[before.clamp(min=0)] > 1
        if not cfg.root_td:
            branching = branching & (tree.depth[before.clamp(min=0)] > 0)
        gate = branching & inside
        td = torch.where(gate, va - vb, torch.zeros_like(va))
        adv = (z.unsqueeze(1) + cfg.td_coef * td) * mask
        values = torch.where(inside, vb, torch.zeros_like(vb)) * mask
        n_nodes = tree.value.numel()
        stats = {
            "tree_nodes": float(n_nodes),
            "branch_nodes": float((tree.children > 1).sum()),
            "branch_token_fraction": float((gate.to(mask.dtype) * mask).sum() / mask.sum().clamp(min=1)),
            "td_abs_mean": float((td.abs() * mask).sum() / (gate.to(mask.dtype) * mask).sum().clamp(min=1)),
            "groups": float(G),
        }
        return CreditResult(advantages=adv, granularity="token", credit=adv, values=values, stats=stats)
