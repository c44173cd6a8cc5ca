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

* **Credit-uncertainty-driven branching** (``uncertainty_branching``; creditflow's own, survey
  §8.1/§9.2): VinePPO's budget of ``k`` continuations per step boundary, spent as ``k0`` at every
  boundary, then the rest where the first pass's value estimates have the largest variance
  (:class:`UncertaintyBranching`).

Both telescope: the advantages of one trajectory's units sum to ``return - V(s_0)``.

Overhead: the provider's :class:`~stages.schema.Overhead` (generated tokens, forward passes,
environment resets/steps); ``stats["mc_continuations"]`` is the number of continuations asked
for, ``k`` per estimation point.

Steps and segments (:class:`~stages.credit.segments.Segments`) come from
:mod:`stages.credit.segments`, which the RED, SCAR and process-reward methods share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from stages.credit.base import CreditConfig, CreditContext, CreditMethod, MCRollouts
from stages.credit.registry import register_method
from stages.credit.segments import Segments, broadcast, compact_ids, segment_rewards, segments_from_ids, step_segments
from stages.schema import Batch, BatchTensors, CreditResult, Overhead
from stages.config_fields import param

# --------------------------------------------------------------------------------------------
# MC values at estimation points and one-step TD advantages
# --------------------------------------------------------------------------------------------


def mc_sample(mc: MCRollouts, starts: list[tuple[int, int]], k: int, name: str) -> tuple[torch.Tensor, Overhead]:
    """``k`` continuations from each of ``starts`` through the provider, checked: ``(returns,
    overhead)`` with ``returns`` (N, k) finite floats."""
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
    return returns, overhead if overhead is not None else Overhead()


def unit_starts(seg: Segments) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """``(rows, cols, starts)`` of every present unit, in row-major order: the ``(row, position)``
    estimation points the MC methods ask continuations from."""
    rows, cols = seg.present.nonzero(as_tuple=True)
    positions = seg.starts[rows, cols]
    return rows, cols, list(zip(rows.tolist(), positions.tolist()))


def mc_returns(mc: MCRollouts, seg: Segments, k: int, name: str) -> tuple[torch.Tensor, Overhead, int]:
    """Ask the provider for ``k`` continuations from every unit start. Returns ``(G, overhead,
    n_points)`` with ``G`` (B, K, k) float (nan at absent units)."""
    if k < 1:
        raise ValueError(f"credit method {name!r}: k (continuations per point) must be >= 1, got {k}")
    rows, cols, starts = unit_starts(seg)
    B, K = seg.present.shape
    G = torch.full((B, K, k), float("nan"))
    if not starts:
        return G, Overhead(), 0
    returns, overhead = mc_sample(mc, starts, k, name)
    G[rows, cols] = returns
    return G, overhead, len(starts)


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
            seg = segments_from_ids(compact_ids(torch.where(mask, raw, torch.full_like(raw, -1))))
        elif cfg.partition == "fixed":
            q = mask.long().cumsum(-1) - 1
            raw = torch.where(mask, q // cfg.segment_tokens, torch.full_like(q, -1))
            seg = segments_from_ids(compact_ids(raw))
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


# --------------------------------------------------------------------------------------------
# Credit-uncertainty-driven branching (a method of our own)
# --------------------------------------------------------------------------------------------


def shrunk_variance(first: torch.Tensor, prior_strength: float) -> torch.Tensor:
    """(P,) per-point return variance from a first pass ``first`` (P, k0), k0 >= 2: the unbiased
    sample variance shrunk towards the batch's mean sample variance with ``prior_strength``
    pseudo-observations, ``((k0 - 1) s_i^2 + nu * mean(s^2)) / (k0 - 1 + nu)`` (a few 0/1
    returns often agree by chance, which alone would call the point certain)."""
    k0 = first.shape[1]
    var = first.var(dim=-1, correction=1)
    pooled = var.mean() if var.numel() else var.new_zeros(())
    return ((k0 - 1) * var + prior_strength * pooled) / (k0 - 1 + prior_strength)


def allocate_extra(var: torch.Tensor, first: int, extra: int, cap: int, rule: str) -> torch.Tensor:
    """(P,) long: how many of ``extra`` further continuations each point gets, given its variance
    ``var`` (P,), the ``first`` continuations it already has and at most ``cap`` in all.

    Greedy allocation, one continuation at a time, vectorized: the j-th extra continuation of point
    i scores ``var_i / (n (n + 1))`` with ``n = first + j - 1`` (``rule="variance"``: the drop of
    the variance of the mean ``var_i / n`` it buys, so the top-``extra`` scores minimize the summed
    variance: integer Neyman allocation, ``n_i`` about proportional to ``sigma_i``) or ``sqrt(var_i
    / n)`` (``rule="max_se"``: the point's standard error before it, so the top scores are what
    always branching at the largest standard error gives). Each point's scores decrease in j, so
    the top ``extra`` of all (points x depths) scores are exactly the greedy choices. Ties go to
    the lower depth, then to the earlier point: equal variances (all zero, too) spread the budget
    uniformly, VinePPO's allocation."""
    P = var.numel()
    depth = cap - first
    if extra <= 0 or P == 0 or depth <= 0:
        return torch.zeros(P, dtype=torch.long)
    if extra > P * depth:
        raise ValueError(f"allocate_extra: {extra} extra continuations exceed the cap of {depth} more at each of {P} points")
    n = (first + torch.arange(depth, dtype=var.dtype)).unsqueeze(1)  # (depth, 1): continuations before the j-th extra
    score = var.unsqueeze(0) / (n * (n + 1)) if rule == "variance" else (var.unsqueeze(0) / n).sqrt()
    # flat index j * P + i: a stable sort breaks ties by depth first, then by point
    take = torch.sort(score.flatten(), descending=True, stable=True).indices[:extra]
    return torch.bincount(take % P, minlength=P)


@dataclass
class UncertaintyBranchingConfig(CreditConfig):
    method: str = param("uncertainty_branching", help="credit-assignment method (registry name; credit-uncertainty-driven branching, survey §8.1/§9.2: a method of creditflow's own)")
    k: int = param(9, help="continuation budget per step boundary, as the parent VinePPO's k (Kazemnejad et al. 2025): exactly k x boundaries continuations in all", ge=2)
    k0: int = param(3, help="first-pass continuations at every boundary (>= 2: a sample variance needs two); the other (k - k0) x boundaries go where the value estimates are most uncertain", ge=2)
    allocation: str = param("variance", help="variance: give each extra continuation where it lowers the summed variance of the value estimates most (Neyman allocation); max_se: to the boundary with the largest standard error", choices=("variance", "max_se"))
    prior_strength: float = param(1.0, help="pseudo-observations of the batch's mean variance that each boundary's first-pass variance is shrunk towards (0: the raw sample variance)", ge=0)
    max_multiple: int = param(4, help="a boundary gets at most max_multiple x k continuations in all", ge=1)
    gamma: float = param(1.0, help="per-step discount of V(s_{t+1}); the MC returns are undiscounted, so only 1.0 (VinePPO's) is unbiased", ge=0, le=1)

    def config_rules(self):
        """The first pass is part of the budget."""
        if self.k0 > self.k:
            yield "k0", f"must be <= credit.k={self.k} (the first pass is part of the budget of k continuations per boundary)"


@register_method
class UncertaintyBranching(CreditMethod):
    """Credit-uncertainty-driven branching (creditflow's own; survey §8.1 "CA <-> Exploration" and
    §9.2 "Credit Assignment Meets Exploration": no method uses the uncertainty of its credit
    estimates to direct where it explores). VinePPO (Kazemnejad et al. 2025, §3.1.1) with the
    same continuation budget, spent where the value estimates are uncertain:

    1. a first pass of ``k0`` continuations from every step boundary (the VinePPO fork points);
    2. each boundary's return variance from it (:func:`shrunk_variance`), and the remaining
       ``(k - k0) x boundaries`` continuations allocated by :func:`allocate_extra` (the boundaries
       whose value estimates have the largest variance get more; a boundary whose continuations
       all agree, e.g. after the outcome is decided, gets few or none), at most ``max_multiple x k``
       per boundary; asked from the provider in ``log2`` batched calls (a boundary with ``m``
       extra continuations is in the call of ``2^b`` continuations for every bit ``b`` of ``m``);
    3. ``V(s_t)`` = the mean of all of a boundary's continuations (both passes), then VinePPO's
       step advantage ``r_t + gamma V(s_{t+1}) - V(s_t)`` on every token of the step.

    Total continuations = ``k x boundaries``, VinePPO's at the same ``k``, so the comparison is
    compute-controlled (continuations from a later turn are shorter, so generated tokens and
    environment steps can differ either way; the Overhead records them). With ``k0 = k`` it is
    VinePPO exactly. Recorded: the allocation's statistics (``branch_*``: continuations per
    boundary min/max/quantiles, share of boundaries that got extras, the predicted summed variance
    against the uniform allocation's) and its histogram and per-step means (record
    ``branching``).

    Simplifications / caveats (named): the uncertainty is the variance of each boundary's value
    estimate, not of the advantage (a TD advantage shares each value with its neighbour); the
    pooled mean is slightly biased because how many continuations a boundary gets depends on its
    first-pass returns (adaptive sampling); the variance is the shrunk first-pass sample variance
    (no second round of re-allocation); extra compute goes to extra continuations from existing
    fork points, not to new episodes branched there (they are not trained on, like VinePPO's)."""

    name = "uncertainty_branching"
    Config = UncertaintyBranchingConfig
    granularity = "step"
    methodology = "MC (forked rollouts, allocated by credit uncertainty)"
    needs = frozenset({"mc_rollouts"})
    reference = ("creditflow's own (survey §8.1 CA<->Exploration, §9.2): VinePPO (Kazemnejad et al. 2025) with its "
                 "continuation budget allocated by the variance of the value estimates (Neyman allocation)")

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: UncertaintyBranchingConfig = self.cfg  # type: ignore[assignment]
        assert ctx.mc_rollouts is not None  # CreditMethod.__call__ checked ``needs``
        seg = step_segments(tensors, batch)
        rows, cols, starts = unit_starts(seg)
        P, cap = len(starts), max(cfg.max_multiple * cfg.k, cfg.k)
        pool = torch.full((P, cap), float("nan"))
        overhead = Overhead()
        extra = torch.zeros(P, dtype=torch.long)
        var = torch.zeros(P)
        if P:
            first, overhead = mc_sample(ctx.mc_rollouts, starts, cfg.k0, self.name)
            pool[:, : cfg.k0] = first
            if cfg.k > cfg.k0:
                var = shrunk_variance(first, cfg.prior_strength)
                extra = allocate_extra(var, cfg.k0, P * (cfg.k - cfg.k0), cap, cfg.allocation)
        filled = torch.full((P,), cfg.k0, dtype=torch.long)
        # one provider call per bit of the largest allocation (<= log2(cap) calls, not per boundary)
        for b in range(int(extra.max()).bit_length() if P else 0):
            sel = ((extra >> b) & 1).nonzero().squeeze(-1)
            if not sel.numel():
                continue
            m = 1 << b
            got, oh = mc_sample(ctx.mc_rollouts, [starts[i] for i in sel.tolist()], m, self.name)
            pool[sel.unsqueeze(1), filled[sel].unsqueeze(1) + torch.arange(m)] = got
            filled[sel] += m
            overhead = overhead + oh
        B, K = seg.present.shape
        values = torch.full((B, K), float("nan"))
        n = cfg.k0 + extra
        if P:
            values[rows, cols] = pool[:, : cfg.k0].mean(-1) if cfg.k == cfg.k0 else pool.nansum(-1) / n
        rewards = segment_rewards(tensors, seg).to(values.dtype)
        adv_units = td_advantages(values, rewards, seg, cfg.gamma)
        ones = torch.ones_like(tensors.response_mask, dtype=values.dtype)
        result = _mc_result(adv_units, values, seg, tensors, ones, "step", overhead, P, cfg.k)
        result.stats.update(self._allocation_stats(n, var, first if P else pool[:, :0], cfg))
        result.records["branching"] = self._allocation_record(n, cols, K, cfg)
        return result

    @staticmethod
    def _allocation_stats(n: torch.Tensor, var: torch.Tensor, first: torch.Tensor,
                          cfg: UncertaintyBranchingConfig) -> dict[str, float]:
        if not n.numel():
            return {"branch_first_pass": 0.0, "branch_extra": 0.0}
        nf = n.to(var.dtype)
        uniform = float((var / cfg.k).sum())
        stats = {
            "branch_first_pass": float(n.numel() * cfg.k0),
            "branch_extra": float((n - cfg.k0).sum()),
            "branch_alloc_min": float(n.min()),
            "branch_alloc_max": float(n.max()),
            "branch_alloc_p50": float(nf.quantile(0.5)),
            "branch_alloc_p90": float(nf.quantile(0.9)),
            "branch_extra_point_fraction": float((n > cfg.k0).double().mean()),
            # boundaries whose first-pass continuations all agreed (sample variance 0)
            "branch_agreeing_point_fraction": float((first.amax(-1) == first.amin(-1)).double().mean()),
            "branch_first_std_mean": float(var.sqrt().mean()),
            # predicted summed variance of the value estimates, this allocation over the uniform one (k each)
            "branch_variance_ratio": float((var / nf).sum()) / uniform if uniform > 0 else 1.0,
        }
        if var.std() > 0 and nf.std() > 0:
            stats["branch_alloc_std_corr"] = float(torch.corrcoef(torch.stack([var.sqrt(), nf]))[0, 1])
        return stats

    @staticmethod
    def _allocation_record(n: torch.Tensor, cols: torch.Tensor, K: int, cfg: UncertaintyBranchingConfig) -> dict:
        counts = torch.bincount(n, minlength=1)
        per_unit = torch.zeros(K, dtype=torch.double).index_add_(0, cols, n.double())
        units = torch.bincount(cols, minlength=K).double()
        return {
            "k": cfg.k, "k0": cfg.k0, "allocation": cfg.allocation, "budget": int(n.numel() * cfg.k),
            "spent": int(n.sum()),
            # how many boundaries got how many continuations in all
            "histogram": {str(c): int(counts[c]) for c in counts.nonzero().squeeze(-1).tolist()},
            # mean continuations at the j-th step boundary of a trajectory
            "per_step_mean": [round(float(x), 4) for x in (per_unit / units.clamp(min=1)).tolist()],
        }
