"""HICRA: hierarchy-aware credit on planning tokens (Wang et al. 2025c, "Emergent Hierarchical
Reasoning in LLMs through Reinforcement Learning", arXiv 2509.03646; survey §3.3.4, Appendix B
row 12).

RL first consolidates low-level *procedural* skills (computations) and then improves
high-level *strategic planning* (deduction, branching, backtracking); GRPO spreads its signal
uniformly over all tokens, diluting it on the few planning tokens. HICRA amplifies the
GRPO advantage on planning tokens:

    A'_t = A_t + alpha · |A_t|   if token t is a planning token
    A'_t = A_t                   otherwise

so planning tokens of a good response are reinforced more and those of a bad response are
penalised less (``A + alpha|A| = (1 - alpha)A`` for ``A < 0``), which keeps exploring strategies.
``alpha = 0`` is GRPO exactly.

Which tokens plan. The paper tags the tokens of *Strategic Grams* — n-grams that steer the
reasoning ("let's try", "we can use", "but the problem mentions"). What plans depends on the task
family's text protocol, so the family declares it once (``needs={"planning_pattern"}``:
:attr:`environments.base.TaskFamily.planning_pattern`, a regular expression; see
:mod:`environments.planning_text`): the characters a match covers in a step's decoded action
text (``Turn.action_text``) are planning text, and a policy token is a planning token when its
decoded characters overlap planning text (``needs={"tokenizer"}`` to decode the tokens; a turn
whose tokens do not decode to its action text piece by piece is marked whole when anything in it
matches). A family that declares no planning text (bifurcation: actions are one letter; code:
one ``return`` line) is refused by the config loader: HICRA there is GRPO exactly.

The regex runs once per distinct (text, token ids) step and the char-to-token overlap is one
cumulative sum per step (no loop over tokens); the advantage arithmetic is batched torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from stages.credit import functional as F
from stages.credit.base import CreditConfig, CreditContext, CreditMethod
from stages.credit.registry import register_method
from stages.schema import Batch, BatchTensors, CreditResult, turn_credit
from stages.config_fields import param


@dataclass
class HICRAConfig(CreditConfig):
    method: str = param("hicra", help="credit-assignment method (registry name; HICRA, Wang et al. 2025c)")
    alpha: float = param(0.2, help="amplification on planning tokens, A' = A + alpha*|A| (Wang et al. 2025c; 0 = GRPO)", ge=0)
    norm_adv_by_std: bool = param(True, help="base GRPO advantage divided by the group std (Wang et al. 2025c build on GRPO)")
    epsilon: float = param(1e-6, help="added to the group std (GRPO, verl's epsilon)", ge=0)


def _step_token_plan(pattern: re.Pattern[str], text: str, pieces: list[str]) -> torch.Tensor:
    """(n,) bool: which of a step's ``n`` tokens (decoded ``pieces``) overlap a match of ``pattern``."""
    n = len(pieces)
    spans = [(m.start(), m.end()) for m in pattern.finditer(text) if m.end() > m.start()]
    if not spans:
        return torch.zeros(n, dtype=torch.bool)
    if "".join(pieces) != text:  # tokens that do not decode piece by piece (split characters): the whole step
        return torch.ones(n, dtype=torch.bool)
    edges = torch.zeros(len(text) + 1, dtype=torch.long)
    s, e = torch.tensor(spans).unbind(-1)
    edges.index_add_(0, s, torch.ones_like(s)).index_add_(0, e, -torch.ones_like(e))
    covered = edges.cumsum(0)[:-1] > 0  # (len(text),) planning characters
    cum = torch.cat([torch.zeros(1, dtype=torch.long), covered.long().cumsum(0)])
    ends = torch.tensor([len(p) for p in pieces], dtype=torch.long).cumsum(0)
    starts = ends - torch.tensor([len(p) for p in pieces], dtype=torch.long)
    return (cum[ends] - cum[starts]) > 0


@register_method
class HICRA(CreditMethod):
    """HICRA: GRPO advantage, amplified by ``alpha·|A|`` on the tokens of the family's planning
    text (module docstring; Wang et al. 2025c; survey §3.3.4)."""

    name = "hicra"
    needs_group = True  # group baseline: rollout.group_size=1 gives zero advantages
    needs = frozenset({"planning_pattern", "tokenizer"})
    Config = HICRAConfig
    granularity = "step"
    methodology = "Hierarchy"
    reference = "Wang et al. 2025c (HICRA, Emergent Hierarchical Reasoning via RL, arXiv 2509.03646); survey §3.3.4"

    def planning_tokens(self, batch: Batch, R: int, tokenizer, pattern: str) -> torch.Tensor:
        """(B, R) bool over response positions: the policy tokens that carry planning text."""
        trajs = batch.trajectories
        if not pattern:
            raise ValueError("credit method 'hicra': the task family declares no planning text "
                             "(TaskFamily.planning_pattern); HICRA would be GRPO")
        rx = re.compile(pattern)
        out = torch.zeros((len(trajs), R), dtype=torch.bool)
        uniq = sorted({i for t in trajs for turn in t.turns for i in t.response_ids[turn.action_span[0]:turn.action_span[1]]})
        piece = dict(zip(uniq, tokenizer.batch_decode([[i] for i in uniq], skip_special_tokens=True))) if uniq else {}
        cache: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
        for b, t in enumerate(trajs):  # host-side text matching, one regex pass per distinct step
            for turn in t.turns:
                a, e = turn.action_span
                e = min(e, R)
                if e <= a:
                    continue
                ids = tuple(t.response_ids[a:e])
                key = (turn.action_text, ids)
                hit = cache.get(key)
                if hit is None:
                    hit = cache[key] = _step_token_plan(rx, turn.action_text, [piece[i] for i in ids])
                out[b, a:e] = hit
        return out

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: HICRAConfig = self.cfg  # type: ignore[assignment]
        rewards = tensors.token_level_rewards
        if not rewards.is_floating_point():
            rewards = rewards.float()
        mask = (tensors.response_mask != 0).to(rewards.dtype)
        B, R = mask.shape
        if len(batch.trajectories) != B:
            raise ValueError(f"credit method 'hicra': batch has {len(batch.trajectories)} trajectories, tensors have {B} rows")
        base = F._grpo_scalars(rewards, mask, tensors.index, cfg.epsilon, cfg.norm_adv_by_std).unsqueeze(-1) * mask
        K = max(int(tensors.num_turns.max().item()) if tensors.num_turns.numel() else 0, 1)
        tid = tensors.turn_ids
        plan_tok = (self.planning_tokens(batch, R, ctx.tokenizer, ctx.planning_pattern) & (tid >= 0)).to(mask.dtype) * mask
        adv = base + cfg.alpha * base.abs() * plan_tok
        n = mask.sum().clamp(min=1)
        idx = torch.where((tid >= 0) & (tid < K), tid, torch.full_like(tid, K))
        step_plan = torch.zeros((B, K + 1), dtype=mask.dtype).scatter_add_(1, idx, plan_tok)[:, :K] > 0
        stats = {
            "planning_token_fraction": float(plan_tok.sum() / n),
            "planning_step_fraction": float(step_plan.sum()) / max(int(tensors.num_turns.sum()), 1),
            "amplification_mass": float((adv - base).abs().sum() / n),
        }
        return CreditResult(advantages=adv, granularity="step", credit=turn_credit(adv, tid, K), stats=stats)
