"""SCAR: Shapley credit over the reasoning steps of a response (Cao et al. 2025; survey §3.2).

SCAR treats the units of a response as the players of a cooperative game whose value is the
score a reward model gives to the response restricted to a coalition, and distributes the
sequence reward by the players' Shapley values. Here the players are the reasoning steps before
the final step (steps as in VinePPO: ``Trajectory.step_spans``, else turns — in the math family
one turn is one step line, the last one the answer line), and the scorer is the current policy
itself (``ctx.scorer``; no reward model is trained here):

    v(S) = log p_theta(answer line | prompt, steps in S kept in order)

the log-likelihood of the trajectory's own final step given the prompt and only the kept steps
(each kept step with the observation that follows it). ``v(all) - v(empty)`` measures how much
the reasoning supports the answer it led to, and step ``k``'s Shapley value
``phi_k = sum_S |S|! (n-|S|-1)! / n! (v(S + k) - v(S))`` its share of that support.

* Exact enumeration of the ``2^n`` coalitions for ``n <= exact_max_segments``; otherwise
  ``num_permutations`` random orders (seeded by ``seed`` and the batch iteration) and the mean
  marginal contribution along them. Both are exactly efficient (``sum phi = v(all) - v(empty)``;
  every sampled order telescopes); exact values are symmetric and give null players zero.
* Shaping (SCAR's dense reward, summing to the outcome): the shaped reward of reasoning step
  ``k`` is ``rho_k = R * s_k`` with shares ``s_k = phi_k / sum phi`` when ``sum phi > 0`` and
  uniform shares otherwise (the reasoning did not raise the answer's likelihood, so nothing
  singles a step out). ``sum_k rho_k = R``. The answer step is the scored target, not a player;
  it keeps the outcome's credit.
* Advantages (GRPO baseline family, survey Appendix B): reasoning step ``k`` gets
  ``(n * rho_k - mean_g R) / (std_g R + eps)`` (its shaped reward in episode units, so the mean
  over the reasoning steps is GRPO's advantage and uniform shares give exactly GRPO), the answer
  step ``(R - mean_g R) / (std_g R + eps)``. A failed episode (``R = 0``) has no reward to
  distribute and gets GRPO's advantage on every step. Trajectories with a single step are plain
  GRPO. The rows that fall back to GRPO are counted by reason in ``stats`` (``fallback_single_step``,
  ``fallback_failed``, ``fallback_zero_sum``: Shapley values summing to <= 0, uniform shares;
  ``fallback_rows`` in all), so a run can see how often SCAR is GRPO.

Native credit: the (B, K) Shapley values ``phi`` (nan for the answer step and absent steps).
Overhead: the scorer's forward passes as the scorer counts them (the policy scorer batches all
contexts of a call); ``stats["scorer_contexts"]`` counts the coalition contexts scored (``2^n`` per
trajectory exact, at most ``num_permutations * (n + 1)`` sampled).

Departures from the paper (inventory ``simplified``): SCAR's game is a reward model scoring the
response restricted to a coalition of tokens/spans (Owen values over a span hierarchy), its
Shapley rewards are dense PPO rewards; here the players are steps, the game is the policy's own
answer likelihood, and the shares feed a GRPO baseline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from stages.credit.group_stats import group_stats
from stages.credit.base import CreditConfig, CreditContext, CreditMethod, Scorer
from stages.credit.registry import register_method
from stages.credit.segments import Segments, broadcast, step_segments
from stages.reward.judge import judge_overhead, usage
from stages.schema import Batch, BatchTensors, CreditResult, Overhead
from stages.config_fields import param


def shapley_exact(v: torch.Tensor, n: int) -> torch.Tensor:
    """Exact Shapley values from ``v`` (2^n,) indexed by coalition bitmask: (n,)."""
    masks = torch.arange(1 << n)
    size = torch.zeros(1 << n, dtype=torch.long)
    for i in range(n):
        size += (masks >> i) & 1
    fact = torch.tensor([math.factorial(j) for j in range(n + 1)], dtype=v.dtype)
    weight = fact[size] * fact[(n - 1 - size).clamp(min=0)] / fact[n]
    phi = torch.empty(n, dtype=v.dtype)
    for i in range(n):  # loop over the (few) players, vectorized over coalitions
        without = ((masks >> i) & 1) == 0
        m = masks[without]
        phi[i] = (weight[without] * (v[m | (1 << i)] - v[m])).sum()
    return phi


def permutation_masks(n: int, num: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(perms (M, n), masks (M, n+1))``: random player orders and the coalition bitmask after
    each prefix of each order (``masks[:, 0] = 0``, ``masks[:, n] = all``)."""
    perms = torch.argsort(torch.rand(num, n, generator=generator), dim=1)
    bits = (torch.ones_like(perms) << perms).cumsum(1)
    masks = torch.cat([torch.zeros(num, 1, dtype=torch.long), bits], dim=1)
    return perms, masks


def shapley_from_permutations(v_of: dict[int, float], perms: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean marginal contributions along the sampled orders: (n,)."""
    M, n = perms.shape
    vals = torch.tensor([[v_of[int(m)] for m in row] for row in masks.tolist()], dtype=torch.float64)
    marg = vals[:, 1:] - vals[:, :-1]
    phi = torch.zeros(n, dtype=torch.float64).index_add_(0, perms.reshape(-1), marg.reshape(-1))
    return phi / M


@dataclass
class SCARConfig(CreditConfig):
    method: str = param("scar", help="credit-assignment method (registry name; SCAR, Cao et al. 2025)")
    exact_max_segments: int = param(8, help="enumerate all 2^n coalitions up to this many players, else sample orders (Cao et al. 2025)", ge=1)
    num_permutations: int = param(64, help="sampled player orders when n > exact_max_segments (Monte Carlo Shapley; Cao et al. 2025)", ge=1)
    seed: int = param(0, help="seed of the sampled orders (combined with the batch iteration)")
    norm_adv_by_std: bool = param(True, help="divide by the group std of the outcome (GRPO baseline, Shao et al. 2024)")
    epsilon: float = param(1e-6, help="added to the group std (GRPO)", ge=0)


@register_method
class SCAR(CreditMethod):
    """SCAR (Cao et al. 2025, "Shapley Credit Assignment for More Efficient RLHF"; survey §3.2):
    Shapley values of the reasoning steps in the game ``v(S) = log p(answer line | prompt, S)``
    scored by the current policy, the outcome reward distributed in proportion to them, GRPO
    baseline (module docstring)."""

    name = "scar"
    Config = SCARConfig
    granularity = "segment"
    methodology = "Game-theoretic (Shapley values over steps)"
    needs = frozenset({"scorer"})
    reference = "Cao et al. 2025 (SCAR: Shapley Credit Assignment Rewards); survey §3.2, Appendix B row 6"

    def shapley(self, tensors: BatchTensors, batch: Batch, scorer: Scorer, seg: Segments) -> tuple[torch.Tensor, dict[str, float]]:
        """(B, K) Shapley values of the reasoning steps (nan elsewhere) and statistics."""
        cfg: SCARConfig = self.cfg  # type: ignore[assignment]
        B, K = seg.present.shape
        phi = torch.full((B, K), float("nan"), dtype=torch.float64)
        attn = tensors.attention_mask
        P = tensors.prompt_len
        rows, contexts, targets, plan = [], [], [], []
        gen = torch.Generator().manual_seed(int(cfg.seed) * 1_000_003 + int(getattr(batch, "iteration", 0) or 0))
        starts = seg.starts.tolist()
        counts = seg.count.tolist()
        ids = tensors.input_ids.tolist()
        n_exact = n_sampled = 0
        for i in range(B):  # building token-id contexts for the scorer (a list API) is per row
            n_steps = counts[i]
            if n_steps < 2:
                continue
            n = n_steps - 1  # players: every step before the answer step
            prompt = [t for t, a in zip(ids[i][:P], attn[i, :P].tolist()) if a]
            resp = ids[i][P:]
            st = starts[i][:n_steps]
            pieces = [resp[st[k] : st[k + 1]] for k in range(n)]  # step k + the observation after it
            ans_end = int(((seg.seg_id[i] == n).nonzero().max() + 1).item())
            target = resp[st[n] : ans_end]
            if n <= cfg.exact_max_segments:
                needed = list(range(1 << n))
                n_exact += 1
                how = ("exact", n, None)
            else:
                perms, masks = permutation_masks(n, cfg.num_permutations, gen)
                needed = sorted(set(masks.reshape(-1).tolist()))
                n_sampled += 1
                how = ("sampled", n, (perms, masks))
            base = len(contexts)
            for m in needed:
                ctx_ids = list(prompt)
                for k in range(n):
                    if (m >> k) & 1:
                        ctx_ids.extend(pieces[k])
                contexts.append(ctx_ids)
                targets.append(list(target))
            rows.append(i)
            plan.append((how, base, needed))
        if contexts:
            logps = scorer(contexts, targets)
            if len(logps) != len(contexts):
                raise ValueError(f"credit method 'scar': scorer returned {len(logps)} results for {len(contexts)} contexts")
            v_all = torch.tensor([float(torch.as_tensor(lp, dtype=torch.float64).sum()) for lp in logps], dtype=torch.float64)
            if not torch.isfinite(v_all).all():
                j = int((~torch.isfinite(v_all)).nonzero()[0])
                raise ValueError(f"credit method 'scar': scorer log-prob of context {j} must be finite, got {v_all[j].item()!r}")
            for i, ((kind, n, extra), base, needed) in zip(rows, plan):
                vals = v_all[base : base + len(needed)]
                if kind == "exact":
                    phi[i, :n] = shapley_exact(vals, n)
                else:
                    perms, masks = extra
                    phi[i, :n] = shapley_from_permutations(dict(zip(needed, vals.tolist())), perms, masks)
        stats = {"scorer_contexts": float(len(contexts)), "exact_rows": float(n_exact), "sampled_rows": float(n_sampled)}
        return phi, stats

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: SCARConfig = self.cfg  # type: ignore[assignment]
        assert ctx.scorer is not None  # CreditMethod.__call__ checked ``needs``
        before = usage(ctx.scorer)
        seg = step_segments(tensors, batch)
        phi, stats = self.shapley(tensors, batch, ctx.scorer, seg)
        rewards = tensors.token_level_rewards
        rewards = rewards if rewards.is_floating_point() else rewards.float()
        mask = (tensors.response_mask != 0).to(rewards.dtype)
        R = (rewards * mask).sum(-1).double()
        B, K = seg.present.shape
        k = torch.arange(K).unsqueeze(0)
        n = (seg.count - 1).clamp(min=0).unsqueeze(1)  # players per row
        player = k < n
        p = torch.where(player, torch.nan_to_num(phi, nan=0.0), torch.zeros_like(phi))
        total = p.sum(-1, keepdim=True)
        uniform = player.double() / n.clamp(min=1).double()
        share = torch.where(total > 1e-12, p / total.clamp(min=1e-12), uniform)
        rho = R.unsqueeze(1) * share  # shaped rewards of the reasoning steps, summing to R
        _, mean, std, _ = group_stats(R, tensors.index, with_std=True)
        denom = (std + cfg.epsilon) if cfg.norm_adv_by_std else torch.ones_like(std)
        step_adv = (n.double() * rho - mean.unsqueeze(1)) / denom.unsqueeze(1)
        outcome_adv = ((R - mean) / denom).unsqueeze(1).expand(B, K)
        unit_adv = torch.where(player, step_adv, outcome_adv)
        unit_adv = torch.where(seg.present, unit_adv, torch.full_like(unit_adv, float("nan")))
        adv = broadcast(unit_adv, seg, mask).to(rewards.dtype)
        spent = judge_overhead(ctx.scorer, before)  # forward passes and their tokens (per scored sequence)
        passes = spent.extra_forward_passes
        overhead = Overhead(extra_forward_passes=passes if passes > 0 else int(stats["scorer_contexts"]),
                            forward_tokens=spent.forward_tokens)
        credit = torch.where(player, phi, torch.full_like(phi, float("nan"))).to(rewards.dtype)
        stats["shaped_reward_abs_mean"] = float(rho[player].abs().mean()) if player.any() else 0.0
        # rows whose advantages are exactly GRPO's, by reason (mutually exclusive, in this order)
        single = n.squeeze(1) == 0
        failed = ~single & (R.abs() < 1e-12)
        zero_sum = ~single & ~failed & (total.squeeze(1) <= 1e-12)
        stats["fallback_single_step"] = float(single.sum())
        stats["fallback_failed"] = float(failed.sum())
        stats["fallback_zero_sum"] = float(zero_sum.sum())
        stats["fallback_rows"] = float((single | failed | zero_sum).sum())
        return CreditResult(advantages=adv, granularity="segment", credit=credit, overhead=overhead, stats=stats)
