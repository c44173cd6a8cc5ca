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

Which tokens plan. The paper tags the tokens of *Strategic Grams* — frequent n-grams that steer
the reasoning ("let's try", "we can use", "but the problem mentions"). Here the unit is the
**step** (one policy turn, one reasoning line): a step is a planning step when its decoded text
(``Turn.action_text``) contains one of ``planning_phrases`` (case-insensitive, whole-word match;
the default list is a set of strategic grams of the paper's kinds: deduction, branching,
backtracking, planning), and all policy tokens of that step are planning tokens. For the math
task family, whose steps are lines such as ``"3+4=7"`` and ``"answer 14"``, set
``non_computation_is_planning=true``: a step is then also a planning step when it is neither a
computation (matches ``computation_pattern``, by default ``<expression> = <number>``) nor the
final answer (matches ``answer_pattern``) — e.g. ``"first add the tens"``. The mask is computed once
per step with one compiled regex and broadcast to tokens with ``turn_ids`` (no loop over tokens).
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

#: strategic grams (deduction, branching, backtracking, planning) after Wang et al. 2025c
DEFAULT_PLANNING_PHRASES = [
    "let's try", "let us try", "let me", "we can use", "we need to", "we need", "the key is", "first",
    "then we", "next we", "the plan", "plan:", "strategy", "approach", "instead", "alternatively", "another way",
    "but the problem", "wait", "on second thought", "let's check", "let's verify", "notice that", "note that",
    "consider", "suppose", "break it down", "break down", "this means", "therefore", "so we", "recall that",
]


def _regex_problem(pattern: str) -> str | None:
    try:
        re.compile(pattern)
    except re.error as e:
        return f"must be a valid regular expression ({e})"
    return None


@dataclass
class HICRAConfig(CreditConfig):
    method: str = param("hicra", help="credit-assignment method (registry name; HICRA, Wang et al. 2025c)")
    alpha: float = param(0.2, help="amplification on planning tokens, A' = A + alpha*|A| (Wang et al. 2025c; 0 = GRPO)", ge=0)
    planning_phrases: list[str] = param(default_factory=lambda: list(DEFAULT_PLANNING_PHRASES), help="strategic grams marking a planning step (Wang et al. 2025c), case-insensitive")
    non_computation_is_planning: bool = param(False, help="math family: a step that is neither a computation nor the answer plans")
    computation_pattern: str = param(r"^[\s\d.+\-*/×÷^()=a-zA-Z]*=\s*-?[\d.]+\s*$", help="regex of a computation step (math family)", check=_regex_problem, rule="must be a valid regular expression")
    answer_pattern: str = param(r"^\s*answer\b", help="regex of the final-answer step (math family), case-insensitive", check=_regex_problem, rule="must be a valid regular expression")
    norm_adv_by_std: bool = param(True, help="base GRPO advantage divided by the group std (Wang et al. 2025c build on GRPO)")
    epsilon: float = param(1e-6, help="added to the group std (GRPO, verl's epsilon)", ge=0)


def _phrase_regex(phrases: list[str]) -> re.Pattern[str] | None:
    parts = []
    for p in phrases:
        p = p.strip().lower()
        if not p:
            continue
        left = r"(?<!\w)" if p[0].isalnum() else ""
        right = r"(?!\w)" if p[-1].isalnum() else ""
        parts.append(left + re.escape(p) + right)
    return re.compile("|".join(parts), re.IGNORECASE) if parts else None


@register_method
class HICRA(CreditMethod):
    """HICRA: GRPO advantage, amplified by ``alpha·|A|`` on planning steps' tokens (module
    docstring; Wang et al. 2025c; survey §3.3.4)."""

    name = "hicra"
    needs_group = True  # group baseline: rollout.group_size=1 gives zero advantages
    Config = HICRAConfig
    granularity = "step"
    methodology = "Hierarchy"
    reference = "Wang et al. 2025c (HICRA, Emergent Hierarchical Reasoning via RL, arXiv 2509.03646); survey §3.3.4"

    def __init__(self, cfg: HICRAConfig):
        super().__init__(cfg)
        self._phrases = _phrase_regex(list(cfg.planning_phrases))
        self._computation = re.compile(cfg.computation_pattern)  # valid: a field rule (_regex_problem)
        self._answer = re.compile(cfg.answer_pattern, re.IGNORECASE)

    def is_planning(self, text: str) -> bool:
        """Whether one step's decoded text is a planning step."""
        if self._phrases is not None and self._phrases.search(text):
            return True
        if self.cfg.non_computation_is_planning:  # type: ignore[attr-defined]
            t = text.strip()
            return bool(t) and not self._computation.match(t) and not self._answer.match(t)
        return False

    def planning_steps(self, batch: Batch, B: int, K: int) -> torch.Tensor:
        """(B, K) bool: planning steps, one regex evaluation per distinct step text."""
        trajs = batch.trajectories
        if len(trajs) != B:
            raise ValueError(f"credit method 'hicra': batch has {len(trajs)} trajectories, tensors have {B} rows")
        cache: dict[str, bool] = {}
        out = torch.zeros((B, K), dtype=torch.bool)
        rows, cols = [], []
        for b, t in enumerate(trajs):
            for k, turn in enumerate(t.turns[:K]):
                text = turn.action_text
                hit = cache.get(text)
                if hit is None:
                    hit = cache[text] = self.is_planning(text)
                if hit:
                    rows.append(b)
                    cols.append(k)
        if rows:
            out[torch.tensor(rows), torch.tensor(cols)] = True
        return out

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: HICRAConfig = self.cfg  # type: ignore[assignment]
        rewards = tensors.token_level_rewards
        if not rewards.is_floating_point():
            rewards = rewards.float()
        mask = (tensors.response_mask != 0).to(rewards.dtype)
        base = F._grpo_scalars(rewards, mask, tensors.index, cfg.epsilon, cfg.norm_adv_by_std).unsqueeze(-1) * mask
        B = mask.shape[0]
        K = max(int(tensors.num_turns.max().item()) if tensors.num_turns.numel() else 0, 1)
        plan = self.planning_steps(batch, B, K)
        tid = tensors.turn_ids
        valid = (tid >= 0) & (tid < K)
        plan_tok = (plan.gather(1, tid.clamp(min=0, max=K - 1)) & valid).to(mask.dtype) * mask
        adv = base + cfg.alpha * base.abs() * plan_tok
        n = mask.sum().clamp(min=1)
        stats = {
            "planning_token_fraction": float(plan_tok.sum() / n),
            "planning_step_fraction": float(plan.sum()) / max(int(tensors.num_turns.sum()), 1),
            "amplification_mass": float((adv - base).abs().sum() / n),
        }
        return CreditResult(advantages=adv, granularity="step", credit=turn_credit(adv, tid, K), stats=stats)
