"""Monte Carlo value estimation from forked prefixes: VinePPO and SPO (chain and tree).

Both methods replace PPO's learned critic by Monte Carlo (MC) estimates of the value of a
*prefix* of the response: the credit stage asks the rollout engine (``ctx.mc_rollouts``, the
:class:`~stages.credit.base.MCRollouts` provider) for ``k`` continuations of the current policy
from each requested point of each episode, with the environment restored to that turn, and
averages their returns-to-go. Advantages are then one-step TD errors between consecutive
estimation points, ``A_j = r_j + gamma * V(s_{j+1}) - V(s_j)`` with ``V(terminal) = 0``, where
``r_j`` is the reward collected between the two points (turn rewards, and the terminal reward in
the last unit). No critic is trained.

* **VinePPO** (Kazemnejad et al. 2025; survey §3.1.1, Appendix B row 1): estimation points are
  the starts of the reasoning steps (``Trajectory.step_spans`` where given, else the turns: in the
  math family one turn is one step line); every token of step ``j`` gets ``A_j``. The values are
  unbiased MC estimates, so the advantages are unbiased and converge to the exact ones as ``k``
  grows. Cost: ``k`` continuations per step.
* **SPO** (Guo et al. 2025; survey §3.2, Appendix B row 5): estimation points are *segment*
  cuts: every ``segment_tokens`` policy tokens, or SPO-chain's probability-guided cut points
  (a new segment starts at every ``cutpoints_per_segment``-th token whose behaviour probability
  is below ``cutpoint_threshold`` — the tokens where the sampled path could have diverged).
  ``probability_mask`` gives each segment's advantage only to its cut-point tokens (SPO's
  probability-mask policy optimization). ``variant=tree`` is SPO-tree's estimator: the episode's
  own path is one child of every segment node and the ``k`` continuations from the node are its
  other children, so the node value is the mean of its children's values (the subtree mean of a
  tree whose siblings share the node's prefix): ``V(s_j) = (sum_i G_ij + r_j + V(s_{j+1})) /
  (k + 1)``. It is unbiased given ``s_j`` when the episode was sampled by the current policy (by
  induction from the last segment), pools every continuation below the node and thus has lower
  variance than the chain estimator at the same ``k``; like SPO-tree and GRPO's group mean, the
  node value includes the trajectory's own subtree, which shrinks advantages by about
  ``k / (k + 1)``. Unlike SPO-tree the continuations are not trained on (the provider returns
  their returns, not their tokens).

Both telescope: the advantages of one trajectory's units sum to ``return - V(s_0)``.

Overhead: the provider's :class:`~stages.schema.Overhead` (generated tokens, forward passes,
environment resets/steps); ``stats["mc_continuations"]`` is the number of continuations asked
for, ``k`` per estimation point.

The step/segment helpers at the top (:func:`step_segments`, :func:`segment_rewards`,
:func:`broadcast`, :func:`group_episode_advantages`) are shared with the RED and SCAR modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from stages.credit import functional as F
from stages.credit.base import CreditConfig, CreditContext, CreditMethod, MCRollouts, register_method
from stages.schema import Batch, BatchTensors, CreditResult, Overhead
from stages.config_fields import param

# --------------------------------------------------------------------------------------------
# shared: steps / segments of a response
# --------------------------------------------------------------------------------------------


@dataclass
class Segments:
    """A partition of each response's policy tokens into consecutive units (steps / segments).

    ``seg_id`` (B, R) long: unit index of each policy token (0..count-1, increasing along the
    response), -1 on observation/padding tokens and policy tokens outside every unit;
    ``starts`` (B, K) long: response position of each unit's first token (-1 where absent);
    ``present`` (B, K) bool; ``count`` (B,) long: number of units of each row (units of a row are
    ``0..count-1``, no gaps).
    """

    seg_id: torch.Tensor
    starts: torch.Tensor
    present: torch.Tensor
    count: torch.Tensor

    @property
    def K(self) -> int:
        return int(self.present.shape[1])


def segments_from_ids(seg_id: torch.Tensor) -> Segments:
    """Starts / presence / counts of a compact ``seg_id`` (B, R) (ids 0..n-1 without gaps)."""
    B, R = seg_id.shape
    K = max(int(seg_id.max().item()) + 1 if seg_id.numel() else 0, 1)
    valid = seg_id >= 0
    idx = seg_id.clamp(min=0)
    pos = torch.arange(R, device=seg_id.device).expand(B, R)
    big = torch.full_like(pos, R)
    starts = torch.full((B, K), R, dtype=torch.long, device=seg_id.device)
    starts = starts.scatter_reduce(1, idx, torch.where(valid, pos, big), "amin")
    present = starts < R
    starts = torch.where(present, starts, torch.full_like(starts, -1))
    return Segments(seg_id=seg_id, starts=starts, present=present, count=present.sum(-1))


def _compact(raw: torch.Tensor) -> torch.Tensor:
    """Renumber per-row unit ids (-1 = none) to 0..n-1 in order, dropping empty ids (vectorized)."""
    B, R = raw.shape
    K = max(int(raw.max().item()) + 1 if raw.numel() else 0, 1)
    valid = raw >= 0
    hit = torch.zeros((B, K), dtype=torch.long, device=raw.device)
    hit.scatter_add_(1, raw.clamp(min=0), valid.long())
    new = (hit > 0).long().cumsum(-1) - 1
    out = new.gather(1, raw.clamp(min=0))
    return torch.where(valid, out, torch.full_like(out, -1))


def step_segments(tensors: BatchTensors, batch: Optional[Batch]) -> Segments:
    """The reasoning steps of each response: ``Trajectory.step_spans`` where a trajectory has
    them, else its turns' action spans (``tensors.turn_ids``; the math family's step = turn).

    Only policy tokens belong to a step. Spans must be sorted and non-overlapping.
    """
    mask = tensors.response_mask != 0
    B, R = mask.shape
    trajs = batch.trajectories if batch is not None else []
    if not any(t.step_spans for t in trajs):
        raw = torch.where(mask, tensors.turn_ids, torch.full_like(tensors.turn_ids, -1))
        return segments_from_ids(_compact(raw))
    if len(trajs) != B:
        raise ValueError(f"batch has {len(trajs)} trajectories but the tensors have {B} rows")
    spans: list[list[tuple[int, int]]] = []
    for t in trajs:  # reading the span lists (O(B*K) Python, like BatchTensors.from_batch)
        s = [tuple(x) for x in (t.step_spans or [turn.action_span for turn in t.turns])]
        s = [(a, b) for a, b in s if b > a]
        for j in range(1, len(s)):
            if s[j][0] < s[j - 1][1]:
                raise ValueError(f"trajectory {t.uid}: step_spans[{j}]={s[j]} overlaps or precedes step_spans[{j-1}]={s[j-1]}")
        spans.append(s)
    K = max(max((len(s) for s in spans), default=0), 1)
    starts = torch.full((B, K), R + 1, dtype=torch.long)
    ends = torch.zeros((B, K), dtype=torch.long)
    for i, s in enumerate(spans):
        if s:
            starts[i, : len(s)] = torch.tensor([a for a, _ in s])
            ends[i, : len(s)] = torch.tensor([b for _, b in s])
    pos = torch.arange(R).expand(B, R).contiguous()
    idx = torch.searchsorted(starts, pos, right=True) - 1  # last span starting at or before pos
    inside = (idx >= 0) & (pos < ends.gather(1, idx.clamp(min=0))) & mask
    raw = torch.where(inside, idx, torch.full_like(idx, -1)).to(tensors.turn_ids.device)
    return segments_from_ids(_compact(raw))


def segment_rewards(tensors: BatchTensors, seg: Segments) -> torch.Tensor:
    """(B, K) reward collected in each unit: every token reward goes to the last unit starting at
    or before it (rewards before the first unit go to unit 0), so a row's units sum to its
    return. Absent units are 0."""
    rewards = tensors.token_level_rewards
    rewards = rewards if rewards.is_floating_point() else rewards.float()
    ff = seg.seg_id.cummax(dim=1).values.clamp(min=0)  # seg ids increase along the row
    out = torch.zeros((rewards.shape[0], seg.K), dtype=rewards.dtype, device=rewards.device)
    return out.scatter_add_(1, ff, rewards)


def broadcast(unit_values: torch.Tensor, seg: Segments, mask: torch.Tensor) -> torch.Tensor:
    """(B, K) per-unit values -> (B, R) on the unit's tokens, 0 elsewhere (and where nan)."""
    vals = torch.nan_to_num(unit_values, nan=0.0)
    out = vals.gather(1, seg.seg_id.clamp(min=0))
    return out * (seg.seg_id >= 0).to(out.dtype) * (mask != 0).to(out.dtype)


def group_episode_advantages(
    step_rewards: torch.Tensor, present: torch.Tensor, index: torch.Tensor, norm_adv_by_std: bool, epsilon: float
) -> torch.Tensor:
    """Per-step advantages from per-step (redistributed) rewards that sum to the episode return:
    ``A_ik = (n_i * r_ik - mean_g R) / (std_g R + eps)`` with ``R_i = sum_k r_ik`` and ``n_i``
    the number of steps. ``n_i * r_ik`` is step k's reward in episode units, so the mean over a
    trajectory's steps is exactly GRPO's advantage and an equal redistribution reduces to GRPO;
    singleton groups use mean 0 and std 1 (verl's rule). Absent steps: nan."""
    r = torch.where(present, step_rewards, torch.zeros_like(step_rewards))
    ret = r.sum(-1)
    _, mean, std, _ = F._group_stats(ret, index, with_std=True)
    n = present.sum(-1, keepdim=True).to(r.dtype)
    adv = n * r - mean.unsqueeze(-1)
    if norm_adv_by_std:
        adv = adv / (std.unsqueeze(-1) + epsilon)
    return torch.where(present, adv, torch.full_like(adv, float("nan")))


# --------------------------------------------------------------------------------------------
# shared: MC values at estimation points and one-step TD advantages
# --------------------------------------------------------------------------------------------


def mc_returns(mc: MCRollouts, seg: Segments, k: int, name: str) -> tuple[torch.Tensor, Overhead, int]:
    """Ask the provider for ``k`` continuations from every unit start. Returns ``(G, overhead,
    n_points)`` with ``G`` (B, K, k) float (nan at absent units)."""
    if k < 1:
        raise ValueError(f"credit method {name!r}: k (continuations per point) must be >= 1, got {k}")
    rows, cols = seg.present.nonzero(as_tuple=True)
    positions = seg.starts[rows, cols]
    starts = list(zip(rows.tolist(), positions.tolist()))
    B, K = seg.present.shape
    G = torch.full((B, K, k), float("nan"))
    if not starts:
        return G, Overhead(), 0
    returns, overhead = mc(starts, k)
    returns = torch.as_tensor(returns, dtype=torch.get_default_dtype())
    if tuple(returns.shape) != (len(starts), k):
        raise ValueError(
            f"credit method {name!r}: mc_rollouts returned shape {tuple(returns.shape)}, expected "
            f"({len(starts)}, {k}) for {len(starts)} start points and k={k}"
        )
    bad = (~torch.isfinite(returns)).nonzero()
    if bad.numel():
        i, j = bad[0].tolist()
        raise ValueError(
            f"credit method {name!r}: mc_rollouts returns[{i}, {j}] must be finite, got "
            f"{returns[i, j].item()!r} (start {starts[i]})"
        )
    G[rows, cols] = returns
    return G, overhead if overhead is not None else Overhead(), len(starts)


def next_values(values: torch.Tensor, seg: Segments) -> torch.Tensor:
    """``V(s_{j+1})`` per unit with ``V(terminal) = 0`` after each row's last unit."""
    nxt = torch.zeros_like(values)
    nxt[:, :-1] = values[:, 1:]
    k = torch.arange(values.shape[1], device=values.device)
    last = k.unsqueeze(0) >= (seg.count.unsqueeze(1) - 1)
    nxt = torch.where(last, torch.zeros_like(nxt), nxt)
    return torch.nan_to_num(nxt, nan=0.0)


def td_advantages(values: torch.Tensor, rewards: torch.Tensor, seg: Segments, gamma: float) -> torch.Tensor:
    """``A_j = r_j + gamma V(s_{j+1}) - V(s_j)`` per unit (nan where absent)."""
    adv = rewards + gamma * next_values(values, seg) - values
    return torch.where(seg.present, adv, torch.full_like(adv, float("nan")))


def tree_values(G: torch.Tensor, rewards: torch.Tensor, seg: Segments) -> torch.Tensor:
    """SPO-tree node values: ``V_j = (sum_i G_ji + r_j + V_{j+1}) / (k + 1)``, ``V_n = 0``.

    A loop over the K unit positions (vectorized over rows), from the last to the first."""
    B, K, k = G.shape
    V = torch.full((B, K), float("nan"), dtype=G.dtype)
    nxt = torch.zeros(B, dtype=G.dtype)
    for j in range(K - 1, -1, -1):
        here = seg.present[:, j]
        is_last = seg.count == j + 1
        child = rewards[:, j] + torch.where(is_last, torch.zeros_like(nxt), nxt)
        v = (torch.nan_to_num(G[:, j], nan=0.0).sum(-1) + child) / (k + 1)
        V[:, j] = torch.where(here, v, V[:, j])
        nxt = torch.where(here, v, torch.zeros_like(nxt))
    return V


def _mc_result(
    adv_units: torch.Tensor,
    values: torch.Tensor,
    seg: Segments,
    tensors: BatchTensors,
    token_weight: torch.Tensor,
    granularity: str,
    overhead: Overhead,
    n_points: int,
    k: int,
) -> CreditResult:
    mask = (tensors.response_mask != 0).to(values.dtype)
    adv = broadcast(adv_units, seg, mask) * token_weight
    vtok = broadcast(values, seg, mask)
    present = seg.present
    stats = {
        "mc_points": float(n_points),
        "mc_continuations": float(n_points * k),
        "units_per_trajectory": float(seg.count.float().mean()) if seg.count.numel() else 0.0,
        "value_mean": float(values[present].mean()) if present.any() else 0.0,
        "unit_adv_abs_mean": float(adv_units[present].abs().mean()) if present.any() else 0.0,
    }
    return CreditResult(
        advantages=adv,
        granularity=granularity,
        credit=adv_units,
        overhead=overhead,
        returns=(adv + vtok) * mask,
        values=vtok,
        stats=stats,
    )


# --------------------------------------------------------------------------------------------
# VinePPO
# --------------------------------------------------------------------------------------------


@dataclass
class VinePPOConfig(CreditConfig):
    method: str = param("vineppo", help="credit-assignment method (registry name; VinePPO, Kazemnejad et al. 2025)")
    k: int = param(9, help="MC continuations (\"vines\") per step boundary; VinePPO uses K=9 (Kazemnejad et al. 2025)", ge=1)
    gamma: float = param(1.0, help="per-step discount of V(s_{t+1}); the MC returns are undiscounted, so only 1.0 (VinePPO's) is unbiased", ge=0, le=1)


@register_method
class VinePPO(CreditMethod):
    """VinePPO (Kazemnejad et al. 2025, ICML; survey §3.1.1): step values ``V(s_t)`` as the mean
    return of ``k`` current-policy continuations forked at each step start, step advantage
    ``r_t + gamma V(s_{t+1}) - V(s_t)`` (``V(terminal) = 0``) on every token of the step.
    Unbiased, critic-free; ``k`` continuations per step (see the module docstring)."""

    name = "vineppo"
    Config = VinePPOConfig
    granularity = "step"
    methodology = "MC (forked rollouts replace the critic)"
    needs = frozenset({"mc_rollouts"})
    reference = "Kazemnejad et al. 2025 (VinePPO, ICML); survey §3.1.1, Appendix B row 1"

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: VinePPOConfig = self.cfg  # type: ignore[assignment]
        assert ctx.mc_rollouts is not None  # CreditMethod.__call__ checked ``needs``
        seg = step_segments(tensors, batch)
        G, overhead, n = mc_returns(ctx.mc_rollouts, seg, cfg.k, self.name)
        values = G.mean(-1)
        rewards = segment_rewards(tensors, seg).to(values.dtype)
        adv_units = td_advantages(values, rewards, seg, cfg.gamma)
        ones = torch.ones_like(tensors.response_mask, dtype=values.dtype)
        return _mc_result(adv_units, values, seg, tensors, ones, "step", overhead, n, cfg.k)


# --------------------------------------------------------------------------------------------
# SPO
# --------------------------------------------------------------------------------------------


@dataclass
class SPOConfig(CreditConfig):
    method: str = param("spo", help="credit-assignment method (registry name; Segment Policy Optimization, Guo et al. 2025)")
    variant: str = param("chain", help="chain: MC values per cut point (SPO-chain); tree: subtree-mean values, episode path as one child (SPO-tree)", choices=("chain", "tree"))
    partition: str = param("cutpoint", help="segment cuts: cutpoint (SPO-chain's probability-guided), fixed (every segment_tokens tokens), step (reasoning steps)", choices=("cutpoint", "fixed", "step"))
    segment_tokens: int = param(32, help="policy tokens per segment with partition=fixed (Guo et al. 2025, SPO-tree's fixed-length segments)", ge=1)
    cutpoint_threshold: float = param(0.9, help="a token is a cut point if its behaviour probability is below this (Guo et al. 2025, rho)", gt=0, le=1)
    cutpoints_per_segment: int = param(1, help="cut points per segment with partition=cutpoint (Guo et al. 2025, SPO-chain)", ge=1)
    k: int = param(4, help="MC continuations per segment cut (Guo et al. 2025)", ge=1)
    probability_mask: bool = param(True, help="give segment advantages only to cut-point tokens (Guo et al. 2025, probability mask)")


@register_method
class SPO(CreditMethod):
    """SPO (Guo et al. 2025; survey §3.2): segment partition (probability-guided cut points or
    fixed length), MC segment values from ``k`` continuations at each cut, segment advantage
    ``r_j + V(s_{j+1}) - V(s_j)`` on the segment's tokens (only its cut-point tokens with
    ``probability_mask``). ``variant=tree`` estimates values as SPO-tree's subtree means (module
    docstring)."""

    name = "spo"
    Config = SPOConfig
    granularity = "segment"
    methodology = "MC (segment values from forked rollouts)"
    needs = frozenset({"mc_rollouts"})
    reference = "Guo et al. 2025 (Segment Policy Optimization, SPO-chain / SPO-tree); survey §3.2, Appendix B row 5"

    def segments(self, tensors: BatchTensors, batch: Optional[Batch]) -> tuple[Segments, torch.Tensor]:
        """``(segments, cut)``: the partition and the (B, R) bool cut-point tokens."""
        cfg: SPOConfig = self.cfg  # type: ignore[assignment]
        mask = tensors.response_mask != 0
        cut = mask & (tensors.old_logprobs < math.log(cfg.cutpoint_threshold))
        if cfg.partition == "cutpoint":
            c = cut.long().cumsum(-1)  # cut points up to and including each token
            raw = (c - 1).clamp(min=0) // cfg.cutpoints_per_segment  # a segment starts at every m-th cut point
            seg = segments_from_ids(_compact(torch.where(mask, raw, torch.full_like(raw, -1))))
        elif cfg.partition == "fixed":
            q = mask.long().cumsum(-1) - 1
            raw = torch.where(mask, q // cfg.segment_tokens, torch.full_like(q, -1))
            seg = segments_from_ids(_compact(raw))
        elif cfg.partition == "step":
            seg = step_segments(tensors, batch)
        else:
            raise ValueError(f"credit method 'spo': partition must be cutpoint, fixed or step, got {cfg.partition!r}")
        return seg, cut

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: SPOConfig = self.cfg  # type: ignore[assignment]
        assert ctx.mc_rollouts is not None  # CreditMethod.__call__ checked ``needs``
        seg, cut = self.segments(tensors, batch)
        G, overhead, n = mc_returns(ctx.mc_rollouts, seg, cfg.k, self.name)
        rewards = segment_rewards(tensors, seg).to(G.dtype)
        values = G.mean(-1) if cfg.variant == "chain" else tree_values(G, rewards, seg)
        adv_units = td_advantages(values, rewards, seg, 1.0)
        weight = cut.to(values.dtype) if cfg.probability_mask else torch.ones_like(values[:, :1]).expand_as(cut)
        result = _mc_result(adv_units, values, seg, tensors, weight, "segment", overhead, n, cfg.k)
        mask = tensors.response_mask != 0
        result.stats["cutpoint_fraction"] = float(cut.sum()) / max(int(mask.sum()), 1)
        return result
