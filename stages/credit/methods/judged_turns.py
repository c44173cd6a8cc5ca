"""Turn credit from an LLM judge that reads agent trajectories (``needs={"judge"}``): CriticSearch
(survey §5.2), TARL (§5.1), LaRe (§5.7) and MT-GRPO's hybrid turn rewards (§5.1).

The judge is a real model, configured per method like CAPO's (:mod:`stages.credit.judge_config`:
``credit.judge=policy`` — the live policy —, a local Hugging Face directory, or ``openai`` — an
OpenAI-compatible endpoint; :func:`stages.reward.judge.make_judge`). Each turn is one free-form
yes/no query (:meth:`~stages.credit.base.Judge.prompt_scores`: a local judge's renormalised
``P(yes)``, an endpoint's 1/0 verdict; nan = unparsed). The prompts are in
:mod:`stages.reward.judge_prompts`; building them is a host-side loop over the batch's turns (text,
not tensors); the credit arithmetic is vectorized over (B, K). Every method starts from the GRPO
episode advantage ``Â_i`` (survey §2.3) and adds a turn term, so with a judge that says nothing
(constant scores) each is GRPO exactly — their differential tests.

* :class:`CriticSearch` (Zhang et al. 2025, "CriticSearch: Fine-Grained Credit Assignment for Search
  Agents via a Retrospective Critic", arXiv 2511.12159; Appendix B row 35): a *frozen*, asymmetric
  critic sees the **whole trajectory and the gold answer** (privileged, training time only) and
  judges every turn retrospectively; its scores ``c_ik`` are dense turn rewards, normalised over the
  group's pooled turns and added to the outcome advantage (the paper's hybrid advantage):
  ``A_ik = Â_i + lambda * (c_ik - mean_g c) / (std_g c + eps)``.
* :class:`TARL` (Tan et al. 2025, "Process-Supervised Reinforcement Learning for Interactive
  Multimodal Tool-Use Agents", arXiv 2509.14480; Appendix B row 25): during training an LLM judge
  adjudicates each turn's contribution to the episode as a discrete turn reward
  ``r_ik in {-1, 0, +1}`` (``P(yes) >= hi``: +1, ``<= lo``: -1, else or unparsed: 0); the turn's
  advantage adds the adjudicated return-to-go: ``A_ik = Â_i + lambda * sum_{k'>=k} gamma^(k'-k) r_ik'``.
* :class:`LaRe` (Qu et al. 2025, "Latent Reward: LLM-Empowered Credit Assignment in Episodic
  Reinforcement Learning", AAAI 2025; Appendix B row 31): the judge first *writes* why each step
  helped or hurt (``Judge.propose``), then the explanation is turned into a scalar — the judge's
  ``P(yes)`` that the step helped given that explanation — and the step reward is
  ``r_ik = 2 s_ik - 1`` in [-1, 1]: ``A_ik = Â_i + lambda * r_ik``. Every explanation (prompt,
  text, score) is returned in ``CreditResult.records["explanations"]`` and logged by the flow as an
  MLflow artifact per iteration (``credit/explanations/iter_XXXX.json``): interpretability is the point.
* :class:`MTGRPO` (Wei et al. 2025, "Reinforcing Multi-Turn Reasoning in LLM Agents via Turn-Level
  Reward Design", arXiv 2505.11821, NeurIPS 2025; Appendix B row 22 "Turn-Level"): hybrid turn
  rewards matched to the turn. A *verifiable* turn — one whose action the environment checks exactly,
  declared by the family per turn (``Turn.info["verifiable"]``: bifurcation's decisive turns, tooluse's
  search and answer turns) — gets the environment's exact turn reward ``r_ik = Turn.reward`` and is
  never shown to the judge; every other turn gets the LLM judge's score ``r_ik = judge_scale * P(yes)``
  (:func:`~stages.reward.judge_prompts.turn_quality_prompt`: the turns so far, no outcome). MT-GRPO,
  the paper's GRPO variant, normalises the turn rewards within the group turn by turn and adds the
  outcome's GRPO advantage ``Â^O_i`` (of the terminal reward ``Trajectory.reward``):
  ``Ã_ik = (r_ik - mean_{g,k} r) / (std_{g,k} r + eps)`` over the group's rows that have a turn
  reward at turn k (0 where fewer than two do), and
  ``A_ik = Â^O_i + lambda * sum_{k'>=k} gamma^(k'-k) Ã_ik'`` — the turn's own and later normalised
  turn rewards (with two turns and gamma = 1: ``Â^T + Â^O`` on the tool turn, ``Â^O`` on the answer
  turn, the paper's two-turn MT-GRPO). With all turn rewards zero and constant judge scores every
  ``Ã`` is 0: GRPO's outcome advantage exactly (its differential test).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from stages.config_fields import param
from stages.credit import functional as F
from stages.credit.base import CreditContext, CreditMethod
from stages.credit.group_stats import group_ids, group_stats, pooled_turn_normalize
from stages.credit.judge_config import JudgeCreditConfig
from stages.credit.registry import register_method
from stages.credit.reverse_scan import reverse_discounted_scan
from stages.credit.segments import steps_to_tokens
from stages.reward.judge import check_judge_config, judge_overhead, usage
from stages.reward.judge_prompts import (adjudicate_turn_prompt, critic_turn_prompt, explain_turn_prompt,
                                         explanation_score_prompt, gold_reference, turn_quality_prompt)
from stages.schema import Batch, BatchTensors, CreditResult, turn_credit


def _num_turns(tensors: BatchTensors) -> int:
    return max(int(tensors.num_turns.max().item()) if tensors.num_turns.numel() else 0, 1)


def _positions(batch: Batch, K: int) -> list[tuple[int, int]]:
    return [(b, k) for b, t in enumerate(batch.trajectories) for k in range(min(len(t.turns), K))]


def _scores(name: str, judge: Any, prompts: list[str]) -> torch.Tensor:
    """(N,) the judge's ``prompt_scores``, checked: values in [0, 1] or nan, one per prompt."""
    if not prompts:
        return torch.zeros(0)
    fn = getattr(judge, "prompt_scores", None)
    if fn is None:
        raise ValueError(f"credit method {name!r}: the judge {type(judge).__name__} has no prompt_scores() "
                         "(free-form yes/no queries); use credit.judge=policy, a local model or openai")
    s = torch.as_tensor(fn(prompts), dtype=torch.float32).detach().cpu().reshape(-1)
    if s.numel() != len(prompts):
        raise ValueError(f"credit method {name!r}: judge.prompt_scores returned {s.numel()} scores for {len(prompts)} prompts")
    bad = ~torch.isnan(s) & ((s < 0) | (s > 1))
    if bool(bad.any()):
        raise ValueError(f"credit method {name!r}: judge score {float(s[bad][0])} is outside [0, 1]")
    return s


def _to_grid(values: torch.Tensor, where: list[tuple[int, int]], B: int, K: int) -> torch.Tensor:
    """(N,) values at (row, turn) positions -> (B, K), nan elsewhere."""
    out = torch.full((B, K), float("nan"))
    if where:
        idx = torch.tensor(where, dtype=torch.long)
        out[idx[:, 0], idx[:, 1]] = values
    return out


def _episode_advantage(tensors: BatchTensors, epsilon: float, norm_adv_by_std: bool) -> tuple[torch.Tensor, torch.Tensor]:
    rewards = tensors.token_level_rewards.float()
    mask = (tensors.response_mask != 0).float()
    return F._grpo_scalars(rewards, mask, tensors.index, epsilon, norm_adv_by_std), mask


class _TurnJudgeMethod(CreditMethod):
    """Shared shape: judge the batch's turns, ``turn_term`` (B, K), ``A = Â_i + turn_term`` on the turn's tokens."""

    granularity = "turn"
    needs = frozenset({"judge"})
    needs_group = True

    def __init__(self, cfg):
        super().__init__(cfg)
        check_judge_config(cfg)

    def _finish(self, tensors: BatchTensors, episode: torch.Tensor, mask: torch.Tensor, term: torch.Tensor, K: int,
                judge: Any, before: dict, stats: dict, records: dict | None = None) -> CreditResult:
        turn_adv = episode.unsqueeze(1) + torch.nan_to_num(term, nan=0.0)
        adv = steps_to_tokens(turn_adv, tensors.turn_ids) * mask
        return CreditResult(advantages=adv, granularity="turn", credit=turn_credit(adv, tensors.turn_ids, K),
                            overhead=judge_overhead(judge, before), stats=stats, records=records or {})


# --------------------------------------------------------------------------------------------
# CriticSearch
# --------------------------------------------------------------------------------------------


@dataclass
class CriticSearchConfig(JudgeCreditConfig):
    method: str = param("criticsearch", help="credit-assignment method (registry name; CriticSearch, Zhang et al. 2025)")
    turn_coef: float = param(1.0, help="lambda: weight of the critic's normalised turn reward beside the outcome advantage (CriticSearch's hybrid advantage)", ge=0)
    norm_adv_by_std: bool = param(True, help="outcome advantage divided by the group std (GRPO; false: Dr. GRPO)")
    epsilon: float = param(1e-6, help="added to the group stds (GRPO, pooled turn normalisation)", ge=0)


@register_method
class CriticSearch(_TurnJudgeMethod):
    """CriticSearch: a frozen critic that sees the whole trajectory and the gold answer scores every
    turn retrospectively; dense turn rewards, group-normalised, added to the outcome advantage (module
    docstring; Zhang et al. 2025; survey §5.2)."""

    name = "criticsearch"
    Config = CriticSearchConfig
    methodology = "Retrospective Critic"
    needs_privileged = ("answer", "gold_path")
    reference = ("Zhang et al. 2025 (CriticSearch: fine-grained credit assignment for search agents via a retrospective "
                 "critic, arXiv 2511.12159); survey §5.2")

    def checklist_note(self) -> str:
        return "the retrospective critic sees the whole trajectory and the gold answer / gold path (privileged, training time only)"

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: CriticSearchConfig = self.cfg  # type: ignore[assignment]
        episode, mask = _episode_advantage(tensors, cfg.epsilon, cfg.norm_adv_by_std)
        B, K = mask.shape[0], _num_turns(tensors)
        trajs = batch.trajectories
        refs = [gold_reference(t.privileged) for t in trajs]
        missing = [t.uid for t, r in zip(trajs, refs) if not r]
        if missing:
            raise ValueError(f"credit method 'criticsearch': trajectory {missing[0]} carries no gold answer or gold path "
                             "(Trajectory.privileged['answer'] / ['gold_path']); the critic needs one")
        where = _positions(batch, K)
        prompts = [critic_turn_prompt(trajs[b], k, refs[b]) for b, k in where]
        before = usage(ctx.judge)
        c = _to_grid(_scores(self.name, ctx.judge, prompts), where, B, K)
        judged = ~torch.isnan(c)
        term = cfg.turn_coef * pooled_turn_normalize(torch.nan_to_num(c), judged, tensors.index, cfg.epsilon)
        stats = {
            "judged_turns": float(judged.sum()),
            "unparsed_turns": float(len(where) - int(judged.sum())),
            "critic_score_mean": float(c[judged].mean()) if bool(judged.any()) else 0.0,
            "critic_turn_term_abs_mean": float(term[judged].abs().mean()) if bool(judged.any()) else 0.0,
        }
        return self._finish(tensors, episode, mask, term, K, ctx.judge, before, stats)


# --------------------------------------------------------------------------------------------
# TARL
# --------------------------------------------------------------------------------------------


@dataclass
class TARLConfig(JudgeCreditConfig):
    method: str = param("tarl", help="credit-assignment method (registry name; TARL, Tan et al. 2025)")
    turn_coef: float = param(0.5, help="lambda: weight of the adjudicated turn return beside the outcome advantage (Tan et al. 2025)", ge=0)
    gamma: float = param(1.0, help="discount of the adjudicated return-to-go over turns", ge=0, le=1)
    positive_threshold: float = param(0.6, help="judge P(yes) at or above which a turn is adjudicated +1 (TARL's {-1, 0, +1} turn rewards)", ge=0, le=1)
    negative_threshold: float = param(0.4, help="judge P(yes) at or below which a turn is adjudicated -1; between the thresholds (or unparsed): 0", ge=0, le=1)
    norm_adv_by_std: bool = param(True, help="outcome advantage divided by the group std (GRPO; false: Dr. GRPO)")
    epsilon: float = param(1e-6, help="added to the group std (GRPO)", ge=0)

    def config_rules(self):
        """The neutral band must be a band."""
        if not self.negative_threshold < self.positive_threshold:
            yield "negative_threshold", f"must be < credit.positive_threshold={self.positive_threshold} (TARL's neutral band)"


@register_method
class TARL(_TurnJudgeMethod):
    """TARL: an LLM judge adjudicates each turn's contribution during training as -1 / 0 / +1; the
    adjudicated return-to-go is added to the outcome advantage (module docstring; Tan et al. 2025; survey §5.1)."""

    name = "tarl"
    Config = TARLConfig
    methodology = "LLM-Judge"
    reference = ("Tan et al. 2025 (TARL: turn-level adjudicated RL, process-supervised RL for interactive multimodal "
                 "tool-use agents, arXiv 2509.14480); survey §5.1")

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: TARLConfig = self.cfg  # type: ignore[assignment]
        episode, mask = _episode_advantage(tensors, cfg.epsilon, cfg.norm_adv_by_std)
        B, K = mask.shape[0], _num_turns(tensors)
        where = _positions(batch, K)
        prompts = [adjudicate_turn_prompt(batch.trajectories[b], k) for b, k in where]
        before = usage(ctx.judge)
        p = _to_grid(_scores(self.name, ctx.judge, prompts), where, B, K)
        judged = ~torch.isnan(p)
        r = torch.zeros((B, K))
        r = torch.where(judged & (p >= cfg.positive_threshold), torch.ones_like(r), r)
        r = torch.where(judged & (p <= cfg.negative_threshold), -torch.ones_like(r), r)
        term = cfg.turn_coef * reverse_discounted_scan(r, cfg.gamma)
        n = max(len(where), 1)
        stats = {
            "judged_turns": float(judged.sum()),
            "positive_turn_fraction": float((r > 0).sum()) / n,
            "negative_turn_fraction": float((r < 0).sum()) / n,
            "neutral_turn_fraction": float(len(where) - int((r != 0).sum())) / n,
            "adjudicated_return_abs_mean": float(term[judged].abs().mean()) if bool(judged.any()) else 0.0,
        }
        return self._finish(tensors, episode, mask, term, K, ctx.judge, before, stats)


# --------------------------------------------------------------------------------------------
# LaRe
# --------------------------------------------------------------------------------------------


@dataclass
class LaReConfig(JudgeCreditConfig):
    method: str = param("lare", help="credit-assignment method (registry name; LaRe, Qu et al. 2025)")
    step_coef: float = param(0.5, help="lambda: weight of the explanation-derived step reward 2s-1 beside the outcome advantage (Qu et al. 2025)", ge=0)
    explain_max_new_tokens: int = param(32, help="length cap of each step's written explanation (Qu et al. 2025: the LLM explains why the step helped or hurt)", ge=1)
    judge_propose_temperature: float = param(0.0, help="sampling temperature of the written explanations (0 = greedy)", ge=0)
    norm_adv_by_std: bool = param(True, help="outcome advantage divided by the group std (GRPO; false: Dr. GRPO)")
    epsilon: float = param(1e-6, help="added to the group std (GRPO)", ge=0)


@register_method
class LaRe(_TurnJudgeMethod):
    """LaRe: the judge writes why each step helped or hurt; the explanation is scored into a scalar step
    reward 2s-1; explanations are kept as a per-iteration artifact (module docstring; Qu et al. 2025; survey §5.7)."""

    name = "lare"
    Config = LaReConfig
    methodology = "LLM-Critic"
    reference = ("Qu et al. 2025 (LaRe: Latent Reward, LLM-empowered credit assignment in episodic RL, AAAI 2025); "
                 "survey §5.7")

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: LaReConfig = self.cfg  # type: ignore[assignment]
        episode, mask = _episode_advantage(tensors, cfg.epsilon, cfg.norm_adv_by_std)
        B, K = mask.shape[0], _num_turns(tensors)
        trajs = batch.trajectories
        where = _positions(batch, K)
        before = usage(ctx.judge)
        ask = [explain_turn_prompt(trajs[b], k) for b, k in where]
        texts = ctx.judge.propose(ask, cfg.explain_max_new_tokens) if ask else []
        if len(texts) != len(ask):
            raise ValueError(f"credit method 'lare': judge.propose returned {len(texts)} explanations for {len(ask)} steps")
        texts = [str(x).strip() for x in texts]
        score_prompts = [explanation_score_prompt(trajs[b], k, x) for (b, k), x in zip(where, texts)]
        s = _scores(self.name, ctx.judge, score_prompts)
        s = torch.where(torch.tensor([bool(x) for x in texts], dtype=torch.bool), s, torch.full_like(s, float("nan")))
        grid = _to_grid(s, where, B, K)  # an empty explanation explains nothing: no step reward
        scored = ~torch.isnan(grid)
        r = torch.where(scored, 2.0 * grid - 1.0, torch.zeros_like(grid))
        term = cfg.step_coef * r
        records = [{"uid": trajs[b].uid, "row": b, "step": k, "action": trajs[b].turns[k].action_text,
                    "outcome": float(trajs[b].reward), "prompt": q, "explanation": x,
                    "score": None if torch.isnan(v) else float(v),
                    "step_reward": float(r[b, k])}
                   for (b, k), q, x, v in zip(where, ask, texts, s)]
        n = max(len(where), 1)
        stats = {
            "explained_steps": float(len(where)),
            "empty_explanations": float(sum(1 for x in texts if not x)),
            "scored_steps": float(scored.sum()),
            "explanation_chars_mean": sum(len(x) for x in texts) / n,
            "step_reward_mean": float(r[scored].mean()) if bool(scored.any()) else 0.0,
            "helpful_step_fraction": float((r > 0).sum()) / n,
        }
        return self._finish(tensors, episode, mask, term, K, ctx.judge, before, stats,
                            records={"explanations": records})


# --------------------------------------------------------------------------------------------
# MT-GRPO: hybrid (verifiable + LLM-judge) turn rewards
# --------------------------------------------------------------------------------------------


def per_turn_group_normalize(u: torch.Tensor, present: torch.Tensor, index, epsilon: float,
                             by_std: bool = True) -> torch.Tensor:
    """(B, K) turn rewards normalised within (group, turn index): ``(u - mean) / (std + eps)`` over the
    group's rows with ``present`` at that turn (unbiased std as ``torch.std``); 0 where fewer than two
    rows of the group have a reward at that turn (nothing to compare against) and where absent.
    One segment reduction over the flattened (row, turn) cells, no loop."""
    B, K = u.shape
    gid, _ = group_ids(index, B, device=u.device)
    cell = (gid.unsqueeze(1) * K + torch.arange(K, device=u.device)).reshape(-1)
    keep = present.reshape(-1)
    out = torch.zeros(B * K, dtype=u.dtype, device=u.device)
    if bool(keep.any()):
        x = u.reshape(-1)[keep]
        n, mean, std, _ = group_stats(x, cell[keep], with_std=by_std)
        z = (x - mean) / (std + epsilon) if by_std else x - mean
        out[keep] = torch.where(n > 1, z, torch.zeros_like(z))
    return out.reshape(B, K)


@dataclass
class MTGRPOConfig(JudgeCreditConfig):
    method: str = param("mt_grpo", help="credit-assignment method (registry name; MT-GRPO with hybrid turn rewards, Wei et al. 2025)")
    turn_coef: float = param(1.0, help="lambda: weight of the normalised turn-reward return beside the outcome advantage (Wei et al. 2025's MT-GRPO: 1)", ge=0)
    gamma: float = param(1.0, help="discount of the normalised turn rewards over later turns (1: a turn is credited with its own and every later turn reward, MT-GRPO; 0: its own only)", ge=0, le=1)
    judge_scale: float = param(1.0, help="turn reward of an unverifiable turn: judge_scale * the LLM judge's P(yes) (Wei et al. 2025's LLM-as-judge turn reward)", gt=0)
    norm_adv_by_std: bool = param(True, help="outcome and turn advantages divided by their group std (GRPO; false: Dr. GRPO)")
    epsilon: float = param(1e-6, help="added to the group stds (GRPO)", ge=0)


@register_method
class MTGRPO(_TurnJudgeMethod):
    """MT-GRPO with hybrid turn rewards: verifiable turns get the environment's exact turn reward, the
    others an LLM judge's score; group-normalised per turn and added to the outcome advantage (module
    docstring; Wei et al. 2025; survey §5.1).

    Simplified: the paper's MT-GRPO normalises turn k's rewards over rollouts that share the history
    up to turn k (a rollout tree, exponential in the turns); here turn k is normalised over the
    group's rows at turn index k (they share the prompt, not the earlier turns), as the reference
    code does for its two-turn search agent. Its PPO variant (MT-PPO: turn rewards at each turn's last
    token under a token-level critic) is not implemented. The judge is one yes/no query per
    unverifiable turn (a real model: the live policy by default, a local HF model or an endpoint), not
    the paper's task-specific rubric; which turns are verifiable is the family's declaration."""

    name = "mt_grpo"
    Config = MTGRPOConfig
    methodology = "Hybrid"
    reference = ("Wei et al. 2025 (Reinforcing multi-turn reasoning in LLM agents via turn-level reward design, "
                 "MT-GRPO, arXiv 2505.11821, NeurIPS 2025); survey §5.1")

    def checklist_note(self) -> str:
        return ("hybrid turn rewards: turns the task family declares verifiable (Turn.info['verifiable']) get the "
                "environment's exact turn reward, the others an LLM judge's score")

    def hybrid_turn_rewards(self, batch: Batch, K: int, judge: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(r, verifiable)`` (B, K): each turn's reward (nan where absent or the judge's answer did
        not parse) and the family's verifiable flags. Only the unverifiable turns are sent to the judge."""
        cfg: MTGRPOConfig = self.cfg  # type: ignore[assignment]
        trajs = batch.trajectories
        B = len(trajs)
        where = _positions(batch, K)
        ver = [bool(trajs[b].turns[k].info.get("verifiable", False)) for b, k in where]
        exact = torch.tensor([float(trajs[b].turns[k].reward) for b, k in where], dtype=torch.float32)
        ask = [(b, k) for (b, k), v in zip(where, ver) if not v]
        scores = _scores(self.name, judge, [turn_quality_prompt(trajs[b], k) for b, k in ask])
        verifiable = _to_grid(torch.tensor(ver, dtype=torch.float32), where, B, K) == 1
        r = torch.where(verifiable, _to_grid(exact, where, B, K), _to_grid(cfg.judge_scale * scores, ask, B, K))
        return r, verifiable

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: MTGRPOConfig = self.cfg  # type: ignore[assignment]
        mask = (tensors.response_mask != 0).float()
        outcome = tensors.episode_rewards.float().unsqueeze(1)  # the terminal reward only; turn rewards apart
        episode = F._grpo_scalars(outcome, torch.ones_like(outcome), tensors.index, cfg.epsilon, cfg.norm_adv_by_std)
        K = _num_turns(tensors)
        before = usage(ctx.judge)
        r, verifiable = self.hybrid_turn_rewards(batch, K, ctx.judge)
        rewarded = ~torch.isnan(r)
        z = per_turn_group_normalize(torch.nan_to_num(r), rewarded, tensors.index, cfg.epsilon, cfg.norm_adv_by_std)
        term = cfg.turn_coef * reverse_discounted_scan(z, cfg.gamma)
        judged = rewarded & ~verifiable
        n = len(_positions(batch, K))
        stats = {
            "verified_turns": float(verifiable.sum()),
            "judged_turns": float(judged.sum()),
            "unparsed_turns": float(n - int(rewarded.sum())),
            "verified_turn_fraction": float(verifiable.sum()) / max(n, 1),
            "verified_reward_mean": float(r[verifiable].mean()) if bool(verifiable.any()) else 0.0,
            "judge_score_mean": float(r[judged].mean() / cfg.judge_scale) if bool(judged.any()) else 0.0,
            "turn_term_abs_mean": float(term[rewarded].abs().mean()) if bool(rewarded.any()) else 0.0,
        }
        return self._finish(tensors, episode, mask, term, K, ctx.judge, before, stats)
