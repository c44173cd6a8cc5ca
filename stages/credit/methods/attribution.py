"""ACPO: attribution-based credit with factorized hierarchical rewards (Yin et al. 2025,
"Pinpointing crucial steps: Attribution-based Credit Assignment for Verifiable Reinforcement
Learning", arXiv 2510.08899; survey §3.3.2, Appendix B row 11).

The survey: ACPO "computes factorized hierarchical rewards that decompose the outcome reward
into step contributions using attribution methods, then uses these step-level signals to
construct a difficulty-aware training curriculum"; the paper's attribution is an
information-theoretic one (a mutual-information surrogate of each step's contribution to the
answer). Implemented here, for response ``i`` with steps (policy turns) ``0 .. n-1`` whose last
one is the answer ``y`` (for the math family the line ``"answer 14"``):

1. **Attribution** (``needs={"scorer"}``: log-probs under the current policy). With
   ``c_j`` = prompt + response up to the start of step ``j``'s action, the contribution of
   reasoning step ``k < n-1`` is its pointwise information gain about the answer

       g_k = log p(y | c_{k+1}) - log p(y | c_k)

   (``n`` contexts per response, all scored in one batched scorer call; the gains telescope to
   ``log p(y | c_{n-1}) - log p(y | c_0)``).
2. **Factorized hierarchical reward**: step shares ``w_k = softmax_k(g_k / tau)`` over the
   reasoning steps; the outcome reward ``R_i`` (level 1, episode) is split into step rewards
   (level 2) ``r_{i,k} = R_i · w_k``, which recombine exactly: ``sum_k r_{i,k} = R_i`` (a
   response with a single step keeps ``r_{i,0} = R_i``). Exposed in ``ctx.extras["acpo"]``.
3. **Credit**: with ``Â_i`` the GRPO advantage of ``R_i`` and ``d_g = 1 + gamma·(1 - acc_g)`` a
   difficulty weight of the response's group (``acc_g`` its success rate; harder problems weigh
   more), the tokens of reasoning step ``k`` get

       A_{i,t} = d_g · Â_i · (1 + beta · ((n-1)·w_k - 1))

   and the answer step's tokens ``d_g · Â_i``. ``0 <= beta <= 1`` keeps every factor >= 0 (no sign
   flips); the factors average to 1 over the reasoning steps, so the mean step advantage equals
   the episode advantage (the hierarchical decomposition is conservative). ``beta = 0`` and
   ``gamma = 0`` give GRPO exactly; uniform attribution gives GRPO too.
4. **Difficulty-aware curriculum** (the sampling schedule; survey §3.3.2: "problems where credit
   is concentrated on a few steps are prioritized early in training, while problems with diffuse
   credit are introduced later"): the concentration ``c = 1 - H(w)/log(n-1)`` of each response's
   shares (1 = one decisive step, 0 = diffuse) averaged per task instance is the method's
   ``CreditResult.curriculum`` (task_id -> c). The flow carries it, with the earlier iterations'
   scores, to the next iteration's environment stage, which samples the train instances with
   weights (:meth:`ACPO.task_weights`)

       w_i = exp(s · (1 - p) · (c_i - c̄)),   p = iteration / (iterations - 1)

   (``c̄`` the mean recorded concentration; an instance not yet seen has ``c_i = c̄``, weight 1;
   ``s = curriculum_strength``): concentrated problems are preferred at the start, the preference
   fades linearly and the last iteration samples uniformly, so diffuse problems come in later.
   ``s = 0`` samples uniformly. The paper's entropy-regulation phase is not part of credit
   assignment and is not implemented.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from stages.credit import functional as F
from stages.credit.group_stats import group_ids
from stages.credit.base import CreditConfig, CreditContext, CreditMethod
from stages.credit.registry import register_method
from stages.reward.judge import judge_overhead, usage
from stages.schema import Batch, BatchTensors, CreditResult, turn_credit
from stages.config_fields import param


@dataclass
class ACPOConfig(CreditConfig):
    method: str = param("acpo", help="credit-assignment method (registry name; ACPO, Yin et al. 2025)")
    step_weight: float = param(0.5, help="beta in [0, 1]: how far step attribution reshapes the episode advantage (Yin et al. 2025)", ge=0, le=1)
    attribution_temperature: float = param(1.0, help="tau of the softmax turning information gains into step shares (Yin et al. 2025)", gt=0)
    difficulty_weight: float = param(0.0, help="gamma: difficulty-aware weight 1 + gamma*(1 - group success rate) (Yin et al. 2025 curriculum)", ge=0)
    curriculum_strength: float = param(3.0, help="s: task sampling weight exp(s*(1-progress)*(concentration - mean)), concentrated-credit problems first (Yin et al. 2025 curriculum; survey 3.3.2); 0 = uniform", ge=0)
    norm_adv_by_std: bool = param(True, help="episode advantage divided by the group std (GRPO; false: Dr. GRPO)")
    epsilon: float = param(1e-6, help="added to the group std (GRPO, verl's epsilon)", ge=0)


@dataclass
class Factorization:
    """Per-response attribution and factorized rewards ((B, K) tensors, nan where absent)."""

    gains: torch.Tensor  # information gain g_k of each reasoning step (nan on the answer step / absent)
    shares: torch.Tensor  # w_k over the reasoning steps (answer step of a one-step response: 1)
    step_rewards: torch.Tensor  # r_{i,k} = R_i * w_k; rows sum to R_i
    factors: torch.Tensor  # 1 + beta((n-1) w_k - 1) on reasoning steps, 1 on the answer step
    concentration: torch.Tensor  # (B,) 1 - H(w)/log(n-1) (1 with one reasoning step, nan with none)
    total_rewards: torch.Tensor  # (B,) R_i


def _step_starts_ends(turn_ids: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K) first and one-past-last response position of each turn's policy tokens (-1 if none)."""
    B, R = turn_ids.shape
    pos = torch.arange(R).expand(B, R)
    valid = (turn_ids >= 0) & (turn_ids < K)
    idx = torch.where(valid, turn_ids, torch.full_like(turn_ids, K))  # K = dump column
    starts = torch.full((B, K + 1), R, dtype=torch.long).scatter_reduce(1, idx, pos, "amin")[:, :K]
    ends = torch.full((B, K + 1), -1, dtype=torch.long).scatter_reduce(1, idx, pos, "amax")[:, :K] + 1
    present = ends > 0
    return torch.where(present, starts, torch.full_like(starts, -1)), torch.where(present, ends, torch.full_like(ends, -1))


@register_method
class ACPO(CreditMethod):
    """ACPO: information-gain attribution of each reasoning step to the answer, factorized
    hierarchical rewards and difficulty-aware step credit (module docstring; Yin et al. 2025;
    survey §3.3.2)."""

    name = "acpo"
    needs_group = True  # group baseline: rollout.group_size=1 gives zero advantages
    Config = ACPOConfig
    granularity = "step"
    methodology = "Attribution"
    needs = frozenset({"scorer"})
    reference = "Yin et al. 2025 (ACPO: attribution-based credit assignment for RLVR, arXiv 2510.08899); survey §3.3.2"

    # ---------------------------------------------------------------- attribution
    def information_gains(self, tensors: BatchTensors, scorer, K: int) -> torch.Tensor:
        """(B, K) g_k for reasoning steps k < n-1 (nan elsewhere), from one batched scorer call."""
        B = tensors.response_ids.shape[0]
        P = tensors.prompt_len
        starts, ends = _step_starts_ends(tensors.turn_ids, K)
        n = tensors.num_turns.clamp(max=K)
        gains = torch.full((B, K), float("nan"))
        contexts: list[list[int]] = []
        targets: list[list[int]] = []
        where: list[tuple[int, int]] = []  # (row, j) of each context c_j
        am = tensors.attention_mask[:, :P].bool()
        for b in range(B):  # host-side assembly of token lists (the scorer batches the forwards)
            nb = int(n[b])
            if nb < 2 or int(starts[b, nb - 1]) < 0 or bool((starts[b, :nb] < 0).any()):
                continue
            prompt = tensors.input_ids[b, :P][am[b]].tolist()
            resp = tensors.response_ids[b].tolist()
            target = resp[int(starts[b, nb - 1]) : int(ends[b, nb - 1])]
            if not target or (not prompt and int(starts[b, 0]) == 0):
                continue
            for j in range(nb):
                contexts.append(prompt + resp[: int(starts[b, j])])
                targets.append(target)
                where.append((b, j))
        if not contexts:
            return gains
        lps = scorer(contexts, targets)
        if len(lps) != len(contexts):
            raise ValueError(f"credit method 'acpo': scorer returned {len(lps)} results for {len(contexts)} queries")
        S = torch.full((B, K), float("nan"), dtype=torch.float64)
        for (b, j), lp in zip(where, lps):
            S[b, j] = float(torch.as_tensor(lp).double().sum())
        nxt = torch.cat([S[:, 1:], torch.full((B, 1), float("nan"), dtype=torch.float64)], dim=1)
        g = nxt - S  # g_k = S_{k+1} - S_k
        k_idx = torch.arange(K).expand(B, K)
        g = torch.where(k_idx < (n - 1).unsqueeze(-1), g, torch.full_like(g, float("nan")))
        return g.float()

    def factorize(self, gains: torch.Tensor, total: torch.Tensor, num_steps: torch.Tensor) -> Factorization:
        """Shares, factorized step rewards and advantage factors from the gains (vectorized)."""
        cfg: ACPOConfig = self.cfg  # type: ignore[assignment]
        B, K = gains.shape
        n = num_steps.clamp(max=K)
        k_idx = torch.arange(K).expand(B, K)
        reasoning = k_idx < (n - 1).unsqueeze(-1)
        attributed = reasoning & ~torch.isnan(gains)
        rows_ok = attributed.sum(-1) == (n - 1).clamp(min=0)  # every reasoning step has a gain
        # rows without attribution (scorer skipped them) get uniform shares over their reasoning steps
        logits = torch.where(attributed, gains / cfg.attribution_temperature, torch.zeros_like(gains))
        logits = torch.where(rows_ok.unsqueeze(-1), logits, torch.zeros_like(logits))
        logits = logits.masked_fill(~reasoning, -float("inf"))
        has_reasoning = reasoning.any(-1)
        shares = torch.softmax(torch.where(has_reasoning.unsqueeze(-1), logits, torch.zeros_like(logits)), dim=-1)
        shares = torch.where(reasoning, shares, torch.zeros_like(shares))
        present = k_idx < n.unsqueeze(-1)
        answer = k_idx == (n - 1).unsqueeze(-1)
        single = (n == 1).unsqueeze(-1) & answer  # a one-step response: the answer step holds the whole reward
        shares = torch.where(single, torch.ones_like(shares), shares)
        step_rewards = total.unsqueeze(-1).to(shares.dtype) * shares
        m = (n - 1).clamp(min=1).unsqueeze(-1).to(shares.dtype)
        factors = torch.where(reasoning, 1 + cfg.step_weight * (m * shares - 1), torch.ones_like(shares))
        nan = torch.full_like(shares, float("nan"))
        ent = -(torch.where(reasoning & (shares > 0), shares * shares.log(), torch.zeros_like(shares))).sum(-1)
        nr = (n - 1).to(shares.dtype)
        conc = torch.where(nr >= 2, 1 - ent / nr.clamp(min=2).log(), torch.where(nr == 1, torch.ones_like(nr), torch.full_like(nr, float("nan"))))
        return Factorization(
            gains=gains,
            shares=torch.where(present, shares, nan),
            step_rewards=torch.where(present, step_rewards, nan),
            factors=torch.where(present, factors, nan),
            concentration=conc,
            total_rewards=total,
        )

    def difficulty(self, tensors: BatchTensors, batch: Batch | None, total: torch.Tensor) -> torch.Tensor:
        """(B,) d_g = 1 + gamma (1 - success rate of the response's group)."""
        cfg: ACPOConfig = self.cfg  # type: ignore[assignment]
        B = total.shape[0]
        if batch is not None and len(batch.trajectories) == B:
            succ = torch.tensor([float(t.success) for t in batch.trajectories])
        else:
            succ = (total > 0).float()
        gid, G = group_ids(tensors.index, B, device=total.device)
        cnt = torch.zeros(G).index_add_(0, gid, torch.ones(B))
        acc = torch.zeros(G).index_add_(0, gid, succ) / cnt.clamp(min=1)
        return 1 + cfg.difficulty_weight * (1 - acc[gid])

    # ---------------------------------------------------------------- credit
    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: ACPOConfig = self.cfg  # type: ignore[assignment]
        assert ctx.scorer is not None  # CreditMethod.__call__ checked ``needs``
        rewards = tensors.token_level_rewards
        if not rewards.is_floating_point():
            rewards = rewards.float()
        mask = (tensors.response_mask != 0).to(rewards.dtype)
        total = (rewards * mask).sum(-1)
        adv_ep = F._grpo_scalars(rewards, mask, tensors.index, cfg.epsilon, cfg.norm_adv_by_std)
        K = max(int(tensors.num_turns.max().item()) if tensors.num_turns.numel() else 0, 1)
        before = usage(ctx.scorer)
        gains = self.information_gains(tensors, ctx.scorer, K)
        fac = self.factorize(gains, total, tensors.num_turns)
        d = self.difficulty(tensors, batch, total)
        tid = tensors.turn_ids
        valid = (tid >= 0) & (tid < K)
        f_tok = torch.where(valid, torch.nan_to_num(fac.factors, nan=1.0).gather(1, tid.clamp(0, K - 1)), torch.ones_like(mask))
        adv = (d * adv_ep).unsqueeze(-1) * f_tok * mask
        credit = turn_credit(adv, tid, K)
        ctx.extras["acpo"] = {"gains": fac.gains, "shares": fac.shares, "step_rewards": fac.step_rewards,
                              "factors": fac.factors, "difficulty": d, "concentration": fac.concentration}
        conc_ok = ~torch.isnan(fac.concentration)
        per_task: dict[str, list[float]] = {}
        if batch is not None and len(batch.trajectories) == len(total):
            for t, c in zip(batch.trajectories, fac.concentration.tolist()):
                if not math.isnan(c):
                    per_task.setdefault(t.task_id, []).append(c)
        curriculum = {k: sum(v) / len(v) for k, v in per_task.items()}
        g_ok = ~torch.isnan(gains)
        stats = {
            "attributed_steps": float(g_ok.sum()),
            "gain_abs_mean": float(gains[g_ok].abs().mean()) if bool(g_ok.any()) else 0.0,
            "concentration_mean": float(fac.concentration[conc_ok].mean()) if bool(conc_ok.any()) else 0.0,
            "difficulty_mean": float(d.mean()),
            "factor_max": float(torch.nan_to_num(fac.factors, nan=1.0).max()),
        }
        overhead = judge_overhead(ctx.scorer, before)
        overhead.judge_calls = 0  # a scorer is forward passes of the policy, not judge queries
        return CreditResult(advantages=adv, granularity="step", credit=credit, overhead=overhead, stats=stats,
                            curriculum=curriculum)

    # ---------------------------------------------------------------- curriculum
    def task_weights(self, curriculum: dict[str, float], iteration: int, iterations: int) -> dict[str, float] | None:
        """Sampling weights ``exp(s (1 - p) (c_i - c̄))`` of the instances with a recorded
        concentration (module docstring, step 4); None (uniform) without scores or with ``s = 0``."""
        s = float(self.cfg.curriculum_strength)  # type: ignore[attr-defined]
        if not curriculum or s == 0:
            return None
        ids = sorted(curriculum)
        c = torch.tensor([float(curriculum[i]) for i in ids], dtype=torch.float64)
        p = min(max(iteration / max(iterations - 1, 1), 0.0), 1.0)
        w = torch.exp(s * (1 - p) * (c - c.mean()))
        return dict(zip(ids, w.tolist()))
