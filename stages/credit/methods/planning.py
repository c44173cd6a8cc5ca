"""Credit for planning: HICRA (planning tokens of reasoning, §3.3.4) and PilotRL (plan-first agents, §5.4).

HICRA
-----
HICRA: hierarchy-aware credit on planning tokens (Wang et al. 2025c, "Emergent Hierarchical
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

PilotRL
-------
Progressive plan-level -> step-level -> token-level credit for agents that write a global plan
first (Lu et al. 2025, arXiv 2508.00344; survey §5.4, Appendix B row 30), on the plan-first
variant of a family (``env.plan_first=true``, :mod:`environments.plan_first`); the formulas, what
we could read of the paper and every simplification are in :class:`PilotRL`'s docstring.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from stages.credit import functional as F
from stages.credit.base import CreditConfig, CreditContext, CreditMethod
from stages.credit.group_stats import group_ids, group_stats
from stages.credit.registry import register_method
from stages.credit.segments import steps_to_tokens
from stages.schema import Batch, BatchTensors, CreditResult, Overhead, turn_credit
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


def _float_rewards_and_mask(tensors: BatchTensors) -> tuple[torch.Tensor, torch.Tensor]:
    """((B, R) token rewards as float, (B, R) 0/1 policy-token mask in their dtype)."""
    rewards = tensors.token_level_rewards
    if not rewards.is_floating_point():
        rewards = rewards.float()
    return rewards, (tensors.response_mask != 0).to(rewards.dtype)


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
        rewards, mask = _float_rewards_and_mask(tensors)
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


# --------------------------------------------------------------------------------------------
# PilotRL
# --------------------------------------------------------------------------------------------

#: the orders in which the cascade activates its levels (PilotRL's config ``cascade``)
CASCADES = ("plan_step_token", "step_plan_token")


@dataclass
class PilotRLConfig(CreditConfig):
    method: str = param("pilotrl", help="credit-assignment method (registry name; PilotRL, Lu et al. 2025)")
    cascade: str = param("plan_step_token", help="order in which the levels switch on: plan_step_token (the survey "
                         "§5.4: plan-level, then step-level, then token-level) | step_plan_token (the paper's stages: "
                         "follow the plan, then plan quality, then joint outcome; Lu et al. 2025)", choices=CASCADES)
    phase2_start: int = param(4, help="iteration from which the cascade's second level is added (PilotRL's stage 2, "
                              "Lu et al. 2025)", ge=0)
    phase3_start: int = param(8, help="iteration from which the token-level outcome advantage (GRPO) is added "
                              "(PilotRL's stage 3, joint optimisation, Lu et al. 2025)", ge=0)
    plan_coef: float = param(1.0, help="weight of the plan-level advantage on the plan turn's tokens (PilotRL's "
                             "plan-quality stage, Lu et al. 2025)", ge=0, finite=True)
    quality_coef: float = param(1.0, help="weight of the plan's quality (plan_score against the task's optimal "
                                "path) in the plan-level reward R + quality_coef*plan_score (Lu et al. 2025 judge the "
                                "plan against a reference; 0: the plan gets the outcome's group advantage)", ge=0,
                                finite=True)
    step_coef: float = param(1.0, help="weight of the step-level advantage on the execution turns' tokens "
                             "(PilotRL's step level, Lu et al. 2025)", ge=0, finite=True)
    follow_coef: float = param(0.5, help="weight of following the plan (the execution turn's action is the "
                               "plan's) in the step-level reward (PilotRL's plan-following stage, Lu et al. 2025)",
                               ge=0, finite=True)
    token_coef: float = param(1.0, help="weight of the token-level outcome advantage (GRPO) on every policy token "
                              "once phase 3 starts (Lu et al. 2025 train with GRPO)", ge=0, finite=True)
    norm_adv_by_std: bool = param(True, help="group advantages divided by the group std (GRPO, which Lu et al. 2025 "
                                  "train with)")
    epsilon: float = param(1e-6, help="added to the group std (GRPO, verl's epsilon)", ge=0)

    def config_rules(self):
        if self.phase3_start < self.phase2_start:
            yield "phase3_start", f"must be >= credit.phase2_start={self.phase2_start} (the cascade runs coarse to fine)"
        first = self.plan_coef if self.cascade == "plan_step_token" else self.step_coef
        if self.phase2_start > 0 and first == 0:
            key = "plan_coef" if self.cascade == "plan_step_token" else "step_coef"
            yield key, (f"must be > 0 with credit.phase2_start={self.phase2_start}: phase 1 assigns only this level's "
                        "credit, so every advantage of the first iterations would be 0")


def pilotrl_phase(cfg: PilotRLConfig, iteration: int) -> int:
    """The cascade's phase (1, 2 or 3) at ``iteration``: 1 before ``phase2_start``, 2 before
    ``phase3_start``, else 3 (the schedule is over iterations, as PRS's, ``batch.iteration``)."""
    it = int(iteration)
    return 1 if it < cfg.phase2_start else (2 if it < cfg.phase3_start else 3)


def _group_normalise(scores: torch.Tensor, index, epsilon: float, by_std: bool) -> torch.Tensor:
    """(n,) scores -> ``(s - mean_g) / (std_g + epsilon)`` (or ``s - mean_g``) within the groups of
    ``index``, verl's singleton rule (:func:`stages.credit.group_stats.group_stats`)."""
    _, mean, std, _ = group_stats(scores, index, with_std=by_std)
    return (scores - mean) / (std + epsilon) if by_std else scores - mean


@register_method
class PilotRL(CreditMethod):
    """PilotRL: progressive plan-level -> step-level -> token-level credit for agents that write a
    global plan first (Lu et al. 2025, arXiv 2508.00344; survey §5.4, Appendix B row 30).

    What we read. The survey (§5.4): "a three-stage progressive framework: (1) plan-level RL,
    where credit is assigned to high-level plan components; (2) step-level RL, where credit is
    refined within each plan component; (3) token-level RL, where credit cascades to individual
    tokens ... designed for agents that explicitly formulate plans before executing them". The
    paper's abstract (arXiv 2508.00344) and its reference code's README and launch scripts
    (github 8023looker/PilotRL: verl GRPO without KL, one script and reward function per stage,
    a verifier model serving the rewards, global plans generated ahead and kept in the prompt):
    AdaPlan agents write a global plan and execute under it; stage 1 trains the model "to follow
    explicit guidance from global plans", stage 2 "the quality of generated plans", stage 3 "joint
    optimization of the model's planning and execution coordination". We could not read the
    paper's reward formulas nor its reward code (the ``my_reward`` package is not in the stored
    repository), so the signals below are ours, built from what the family can check exactly.

    Setting. ``env.plan_first=true`` (:mod:`environments.plan_first`): turn 0 of every trajectory
    is the plan turn (``Turn.info["plan"]``, its ``plan_score`` in [0, 1] against the task's
    optimal path), turns 1.. execute it. For trajectory i of group g, with outcome
    ``R_i = sum_t r_{i,t}`` (GRPO's score) and ``norm_g(x) = (x - mean_g x) / (std_g x + eps)``:

    * **plan level** (plan tokens): ``A^plan_i = norm_g(R_i + quality_coef * plan_score_i)``;
    * **step level** (execution turn k >= 1): ``A^step_{i,k} = norm_{g,k}(G_{i,k} + follow_coef *
      f_{i,k})``, normalised over the group's trajectories *at the same turn index k*, with
      ``G_{i,k}`` the return-to-go from turn k and ``f_{i,k} = 1[a_{i,k} = plan_i[k-1]]`` (the
      execution followed its own plan: the plan level feeds the step level's reward);
    * **token level** (every policy token): GRPO's ``A_i = norm_g(R_i)``.

    The cascade (``cascade=plan_step_token``, the survey's order) switches the levels on over
    training: phase 1 (``iteration < phase2_start``) gives only ``plan_coef * A^plan`` to the plan
    tokens and nothing to the execution tokens; phase 2 adds ``step_coef * A^step`` on the
    execution tokens; phase 3 (``iteration >= phase3_start``) adds ``token_coef * A`` (GRPO) on
    every policy token. ``cascade=step_plan_token`` is the paper's order (follow the plan first,
    then plan quality, then joint): the step level in phase 1, the plan level added in phase 2.
    Relations to GRPO (tested): in phase 3 with ``plan_coef = step_coef = 0`` and ``token_coef = 1``
    it is GRPO exactly; in phase 1 with ``quality_coef = 0`` the plan tokens carry GRPO's advantage
    exactly and every execution token 0.

    Simplifications (named in the inventory row): the paper's verifier-model rewards (plan
    following, plan quality against a reference trajectory) are replaced by the family's exact
    checks: ``plan_score`` against the ground-truth optimal path (privileged information used as a
    training reward, as a gold-reference judge would) and exact plan following of the parsed plan;
    the three stages are phases of one run switched by iteration (the paper: three successive
    training runs on separate data); the levels are added, not replaced; the plan is the policy's
    own (the paper's stage 1 follows plans generated beforehand by another model); step-level
    credit normalises per turn index (no anchor states), and "plan components" are the plan's
    per-turn actions. No extra forward passes, tokens or environment steps: the plan turn's tokens
    are counted by the rollout stage; the method's :class:`~stages.schema.Overhead` is empty.
    The per-row plan flags and scores are read from the turn lists (O(B*K) host work, as
    :func:`stages.credit.segments.parsed_turns`); the advantage arithmetic is batched torch.
    """

    name = "pilotrl"
    needs_group = True  # group baselines at every level
    needs_plan_turn = True
    Config = PilotRLConfig
    granularity = "step"
    methodology = "Progressive"
    reference = ("Lu et al. 2025 (PilotRL: global planning-guided progressive RL, arXiv 2508.00344); survey §5.4")

    def plan_rows(self, batch: Batch, B: int, K: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """((B,) bool row has a plan turn, (B,) plan_score, (B, K) float: execution turn k followed
        the row's plan) from the turn lists (module docstring of :mod:`environments.plan_first`)."""
        trajs = batch.trajectories
        if len(trajs) != B:
            raise ValueError(f"credit method 'pilotrl': batch has {len(trajs)} trajectories, tensors have {B} rows")
        has = torch.zeros(B, dtype=torch.bool)
        score = torch.zeros(B)
        follow = torch.zeros((B, K))
        for b, t in enumerate(trajs):  # host-side turn lists, O(B*K)
            if not t.turns or not t.turns[0].info.get("plan"):
                continue
            has[b] = True
            score[b] = float(t.turns[0].info.get("plan_score", 0.0))
            plan = t.turns[0].action or ""
            row = [float(k - 1 < len(plan) and turn.action == plan[k - 1]) for k, turn in enumerate(t.turns[:K]) if k]
            if row:
                follow[b, 1:1 + len(row)] = torch.tensor(row)
        if not bool(has.any()):
            raise ValueError("credit method 'pilotrl' needs trajectories whose turn 0 is a plan (env.plan_first=true); "
                             f"none of the {B} has one (env {trajs[0].env_name!r})")
        return has, score, follow

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: PilotRLConfig = self.cfg  # type: ignore[assignment]
        rewards, mask = _float_rewards_and_mask(tensors)
        B, R = mask.shape
        tid = tensors.turn_ids
        K = max(tensors.max_turns, 1)
        has, score, follow = self.plan_rows(batch, B, K)
        score, follow = score.to(rewards.dtype), follow.to(rewards.dtype)
        on_turn = (tid >= 0) & (tid < K)
        plan_tok = ((tid == 0) & has[:, None]).to(rewards.dtype) * mask
        exec_tok = (on_turn & ((tid > 0) | ~has[:, None])).to(rewards.dtype) * mask
        # plan level: the outcome plus the plan's quality, normalised in the group
        outcome = rewards.sum(-1)
        a_plan = _group_normalise(outcome + cfg.quality_coef * score, tensors.index, cfg.epsilon, cfg.norm_adv_by_std)
        # step level: return-to-go (+ plan following) of each execution turn, normalised over the
        # group's trajectories at the same turn index
        idx = torch.where(on_turn, tid, torch.full_like(tid, K))
        turn_r = torch.zeros((B, K + 1), dtype=rewards.dtype).scatter_add_(1, idx, rewards * on_turn)[:, :K]
        rtg = turn_r.flip(1).cumsum(1).flip(1)
        present = torch.zeros((B, K + 1), dtype=torch.bool).scatter_(1, idx, on_turn & (mask != 0))[:, :K]
        present = present & ~(has[:, None] & (torch.arange(K)[None, :] == 0))  # the plan turn is not a step
        gid = group_ids(tensors.index, B)[0]
        rows, cols = present.nonzero(as_tuple=True)
        a_step = torch.zeros((B, K), dtype=rewards.dtype)
        if rows.numel():
            key = gid[rows] * K + cols
            a_step[rows, cols] = _group_normalise(rtg[rows, cols] + cfg.follow_coef * follow[rows, cols], key,
                                                  cfg.epsilon, cfg.norm_adv_by_std)
        a_grpo = F._grpo_scalars(rewards, mask, tensors.index, cfg.epsilon, cfg.norm_adv_by_std)
        phase = pilotrl_phase(cfg, batch.iteration)
        plan_on = phase >= 2 or cfg.cascade == "plan_step_token"
        step_on = phase >= 2 or cfg.cascade == "step_plan_token"
        plan_part = cfg.plan_coef * a_plan[:, None] * plan_tok * float(plan_on)
        step_part = cfg.step_coef * steps_to_tokens(a_step, tid) * exec_tok * float(step_on)
        token_part = cfg.token_coef * a_grpo[:, None] * mask * float(phase >= 3)
        adv = plan_part + step_part + token_part
        n = mask.sum().clamp(min=1)
        played = present.sum().clamp(min=1)
        stats = {
            "phase": float(phase),
            "plan_score_mean": float(score[has].mean()),
            "plan_follow_rate": float((follow * present).sum() / played),
            "plan_token_fraction": float(plan_tok.sum() / n),
            "plan_level_abs_mean": float(plan_part.abs().sum() / plan_tok.sum().clamp(min=1)),
            "step_level_abs_mean": float(step_part.abs().sum() / exec_tok.sum().clamp(min=1)),
            "token_level_abs_mean": float(token_part.abs().sum() / n),
        }
        return CreditResult(advantages=adv, granularity="step", credit=turn_credit(adv, tid, K), overhead=Overhead(),
                            stats=stats)
