"""Turn credit from the policy's own beliefs, read by teacher-forced forward passes (``needs={"scorer"}``):
IGPO (survey §5.5) and HCAPO (survey §5.2).

Both score given tokens after given contexts with the *current* policy (the ``scorer`` need:
:class:`stages.rollout.scorer.HFScorer`, one batched no-grad forward per call), so their credit
costs forward passes, not rollouts or judge calls; both start from a group of rollouts per task.
The scorer's inputs (contexts cut at turn boundaries) are assembled on the host, one entry per
(row, turn) — a loop over the batch's turns to build token lists, like ``BatchTensors.from_batch``;
the credit arithmetic itself is vectorized over (B, K).

* :class:`IGPO` (Wang et al. 2025, "Information Gain-based Policy Optimization: A Simple and
  Effective Approach for Multi-Turn LLM Agents", arXiv 2510.14967; survey §5.5, Appendix B row 27):
  the policy's belief in the ground-truth answer ``a`` after the history up to turn ``t``,

      p_t = exp( (1/L) sum_j log pi(a_j | q, o_{<=t}, a_{<j}) )          (length-normalised, L = |a|)

  and the turn reward is its *information gain* ``r_t = p_t - p_{t-1}`` (``p_0``: the prompt
  alone); the last turn gets the outcome reward instead. The turn rewards of a group's
  trajectories are normalised together (turn-level group normalisation) and each turn's advantage
  is their discounted cumulative sum ``A_t = sum_{t' >= t} gamma^{t'-t} r^_{t'}``.
* :class:`HCAPO` (Tan et al. 2026, "Hindsight Credit Assignment for Long-Horizon LLM Agents",
  arXiv 2603.08754; survey §5.2, Appendix B row 32; after Harutyunyan et al. 2019's HCA): the
  policy itself is the hindsight model. The *hindsight ratio* of turn t's action,

      rho_t = pi(a_t | s_t, outcome) / pi(a_t | s_t)

  compares the action's likelihood when the prompt also states the episode's outcome ("this
  episode succeeded / failed") with its plain likelihood. Return-conditioned HCA's advantage
  ``(1 - pi/h) Z = (1 - 1/rho) Z`` weights the outcome: actions the outcome makes *more* likely
  are credited with it, actions it makes less likely are not. HCAPO's multi-scale advantage adds
  this step term to the episode-level GRPO advantage, with its do-no-harm mask (no negative step
  signal inside a successful trajectory).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stages.config_fields import param
from stages.credit import functional as F
from stages.credit.base import CreditConfig, CreditContext, CreditMethod, encode_text
from stages.credit.group_stats import pooled_turn_normalize
from stages.credit.registry import register_method
from stages.credit.reverse_scan import reverse_discounted_scan
from stages.credit.segments import steps_to_tokens
from stages.reward.judge import judge_overhead, usage
from stages.schema import Batch, BatchTensors, CreditResult, turn_credit


def _num_turns(tensors: BatchTensors) -> int:
    return max(int(tensors.num_turns.max().item()) if tensors.num_turns.numel() else 0, 1)


def _turn_present(batch: Batch, K: int) -> torch.Tensor:
    """(B, K) bool: turn k exists in trajectory b."""
    n = torch.tensor([len(t.turns) for t in batch.trajectories], dtype=torch.long)
    return torch.arange(K).unsqueeze(0) < n.unsqueeze(1)


def _sum_logprobs(scores: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``((N,) sum of each target's token log-probs, (N,) its length)``: the scorer's ragged output padded
    into one (N, L) tensor and reduced (0 for an empty target)."""
    if not scores:
        return torch.zeros(0), torch.zeros(0)
    lens = torch.tensor([int(s.numel()) for s in scores], dtype=torch.float32)
    padded = torch.nn.utils.rnn.pad_sequence([s.detach().float().cpu().reshape(-1) for s in scores], batch_first=True)
    return padded.sum(-1), lens


def _mean_logprobs(scores: list[torch.Tensor]) -> torch.Tensor:
    """(N,) mean over each target's token log-probs (0 for an empty target)."""
    total, lens = _sum_logprobs(scores)
    return total / lens.clamp(min=1)


def _check_scores(name: str, scores, targets: list[list[int]]) -> None:
    if len(scores) != len(targets) or any(int(s.numel()) != len(t) for s, t in zip(scores, targets)):
        raise ValueError(f"credit method {name!r}: the scorer must return one log-prob per target token "
                         f"({len(targets)} targets)")


# --------------------------------------------------------------------------------------------
# IGPO
# --------------------------------------------------------------------------------------------


@dataclass
class IGPOConfig(CreditConfig):
    method: str = param("igpo", help="credit-assignment method (registry name; IGPO, Wang et al. 2025)")
    answer_template: str = param("answer {answer}", help="text of the gold answer whose probability the policy is scored on, {answer} = Trajectory.privileged['answer'] (IGPO's ground-truth answer tokens; the families' answer action is 'answer <text>')")
    gamma: float = param(1.0, help="discount of IGPO's cumulative turn advantage A_t = sum_{t'>=t} gamma^(t'-t) r^_t' (Wang et al. 2025)", ge=0, le=1)
    ig_coef: float = param(1.0, help="weight of the information-gain turn rewards beside the outcome reward of the last turn (1 = IGPO)", ge=0)
    epsilon: float = param(1e-6, help="added to the pooled turn-reward std (turn-level group normalisation)", ge=0)

    def config_rules(self):
        """The template must name the answer."""
        if "{answer}" not in self.answer_template:
            yield "answer_template", f"must contain '{{answer}}' (where the gold answer goes), got {self.answer_template!r}"


@register_method
class IGPO(CreditMethod):
    """IGPO: a turn's reward is the increase in the policy's probability of the gold answer it
    causes; the last turn's is the outcome; turn-level group normalisation, discounted cumulative
    advantage (module docstring; Wang et al. 2025; survey §5.5)."""

    name = "igpo"
    Config = IGPOConfig
    granularity = "turn"
    methodology = "Info-theoretic"
    needs = frozenset({"scorer", "tokenizer"})
    needs_group = True
    needs_privileged = ("answer",)
    reference = ("Wang et al. 2025 (IGPO: Information Gain-based Policy Optimization for multi-turn LLM agents, "
                 "arXiv 2510.14967); survey §5.5")

    def checklist_note(self) -> str:
        return "the gold answer (privileged, training time only) is teacher-forced to score each turn's information gain"

    def beliefs(self, batch: Batch, ctx: CreditContext, K: int) -> tuple[torch.Tensor, int]:
        """((B, K+1) p_t, scored entries): p[:, 0] after the prompt, p[:, t] after turn t's observation
        (nan where turn t does not exist); the gold answer teacher-forced after each context."""
        cfg: IGPOConfig = self.cfg  # type: ignore[assignment]
        trajs = batch.trajectories
        contexts: list[list[int]] = []
        targets: list[list[int]] = []
        where: list[tuple[int, int]] = []
        for b, t in enumerate(trajs):  # host-side assembly of the scorer inputs, one per (row, turn boundary)
            gold = (t.privileged or {}).get("answer")
            if gold in (None, ""):
                raise ValueError(f"credit method 'igpo': trajectory {t.uid} (env {t.env_name!r}) has no gold answer "
                                 "(Trajectory.privileged['answer']); IGPO needs a family with one (math, tooluse)")
            target = encode_text(ctx.tokenizer, cfg.answer_template.format(answer=gold))
            cuts = [t.turns[0].action_span[0] if t.turns else 0] + [turn.obs_span[1] for turn in t.turns]
            for j, cut in enumerate(cuts[: len(t.turns)]):  # the last turn's reward is the outcome: no p_T needed
                contexts.append(list(t.prompt_ids) + list(t.response_ids[:cut]))
                targets.append(target)
                where.append((b, j))
        p = torch.full((len(trajs), K + 1), float("nan"))
        if contexts:
            scores = ctx.scorer(contexts, targets)
            _check_scores(self.name, scores, targets)
            idx = torch.tensor(where, dtype=torch.long)
            p[idx[:, 0], idx[:, 1]] = _mean_logprobs(scores).exp()
        return p, len(contexts)

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: IGPOConfig = self.cfg  # type: ignore[assignment]
        assert ctx.scorer is not None and ctx.tokenizer is not None
        mask = (tensors.response_mask != 0).float()
        B, K = mask.shape[0], _num_turns(tensors)
        if len(batch.trajectories) != B:
            raise ValueError(f"credit method 'igpo': batch has {len(batch.trajectories)} trajectories, tensors have {B} rows")
        present = _turn_present(batch, K)
        n = present.sum(-1)
        before = usage(ctx.scorer)
        p, scored = self.beliefs(batch, ctx, K)
        gain = torch.nan_to_num(p[:, 1:] - p[:, :-1], nan=0.0)  # r_t = p_t - p_{t-1}, turn t = column t-1
        outcome = (tensors.token_level_rewards.float() * mask).sum(-1)
        last = present & (torch.arange(K).unsqueeze(0) == (n - 1).clamp(min=0).unsqueeze(1))
        u = torch.where(last, outcome.unsqueeze(1), cfg.ig_coef * gain) * present
        u_hat = pooled_turn_normalize(u, present, tensors.index, cfg.epsilon)
        turn_adv = reverse_discounted_scan(u_hat, cfg.gamma) * present
        adv = steps_to_tokens(turn_adv, tensors.turn_ids) * mask
        ig = gain[present & ~last]
        stats = {
            "scored_contexts": float(scored),
            "belief_start_mean": float(torch.nan_to_num(p[:, 0]).mean()) if B else 0.0,
            "belief_gain_mean": float(ig.mean()) if ig.numel() else 0.0,
            "belief_gain_abs_mean": float(ig.abs().mean()) if ig.numel() else 0.0,
            "positive_gain_fraction": float((ig > 0).float().mean()) if ig.numel() else 0.0,
            "turns_per_trajectory": float(n.float().mean()) if B else 0.0,
        }
        return CreditResult(advantages=adv, granularity="turn", credit=turn_credit(adv, tensors.turn_ids, K),
                            overhead=judge_overhead(ctx.scorer, before), stats=stats)


# --------------------------------------------------------------------------------------------
# HCAPO
# --------------------------------------------------------------------------------------------

OUTCOME_TEXT = {True: "This episode ended in success.\n", False: "This episode ended in failure.\n"}


@dataclass
class HCAPOConfig(CreditConfig):
    method: str = param("hcapo", help="credit-assignment method (registry name; HCAPO, Tan et al. 2026)")
    step_coef: float = param(1.0, help="omega: weight of the hindsight step term beside the episode-level GRPO advantage (HCAPO's multi-scale advantage, Tan et al. 2026)", ge=0)
    ratio_clip: float = param(2.0, help="the hindsight ratio rho is clipped to [1/c, c] (importance ratios of HCA are unbounded; Tan et al. 2026 clip them)", gt=1)
    length_normalize: bool = param(True, help="log rho is the mean over the action's tokens (true) or their sum (false: the full action likelihood ratio)")
    do_no_harm: bool = param(True, help="zero negative hindsight step signals inside successful trajectories (HCAPO's do-no-harm mask, Tan et al. 2026)")
    success_text: str = param(OUTCOME_TEXT[True].strip(), help="outcome statement put before the prompt of a successful episode for the hindsight likelihood pi(a | s, outcome)")
    failure_text: str = param(OUTCOME_TEXT[False].strip(), help="outcome statement put before the prompt of a failed episode")
    norm_adv_by_std: bool = param(True, help="episode advantage divided by the group std (GRPO; false: Dr. GRPO)")
    epsilon: float = param(1e-6, help="added to the group std (GRPO)", ge=0)


@register_method
class HCAPO(CreditMethod):
    """HCAPO: hindsight ratio rho = pi(a | s, outcome) / pi(a | s) from the policy itself, the HCA step
    term (1 - 1/rho) * A_episode added to GRPO's episode advantage, do-no-harm on successes (module
    docstring; Tan et al. 2026; survey §5.2)."""

    name = "hcapo"
    Config = HCAPOConfig
    granularity = "turn"
    methodology = "Hindsight"
    needs = frozenset({"scorer", "tokenizer"})
    needs_group = True
    reference = ("Tan et al. 2026 (HCAPO: Hindsight Credit Assignment for Long-Horizon LLM Agents, arXiv 2603.08754); "
                 "survey §5.2")

    def log_ratios(self, batch: Batch, ctx: CreditContext, K: int) -> tuple[torch.Tensor, int]:
        """((B, K) log rho per turn (0 where absent), scored entries): each action scored after its
        context with and without the outcome statement, in one scorer call."""
        cfg: HCAPOConfig = self.cfg  # type: ignore[assignment]
        trajs = batch.trajectories
        texts = {True: encode_text(ctx.tokenizer, cfg.success_text + "\n"),
                 False: encode_text(ctx.tokenizer, cfg.failure_text + "\n")}
        contexts: list[list[int]] = []
        targets: list[list[int]] = []
        where: list[tuple[int, int]] = []
        for b, t in enumerate(trajs):  # host-side assembly: two scorer entries per (row, turn)
            hint = texts[bool(t.success)]
            for k, turn in enumerate(t.turns[:K]):
                a0, a1 = turn.action_span
                if a1 <= a0:
                    continue
                prefix = list(t.prompt_ids) + list(t.response_ids[:a0])
                action = list(t.response_ids[a0:a1])
                contexts += [prefix, hint + prefix]
                targets += [action, action]
                where.append((b, k))
        lr = torch.zeros((len(trajs), K))
        if contexts:
            scores = ctx.scorer(contexts, targets)
            _check_scores(self.name, scores, targets)
            total, lens = _sum_logprobs(scores)
            diff = total[1::2] - total[0::2]  # log pi(a | s, outcome) - log pi(a | s)
            if cfg.length_normalize:
                diff = diff / lens[0::2].clamp(min=1)
            idx = torch.tensor(where, dtype=torch.long)
            lr[idx[:, 0], idx[:, 1]] = diff
        return lr, len(contexts)

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: HCAPOConfig = self.cfg  # type: ignore[assignment]
        assert ctx.scorer is not None and ctx.tokenizer is not None
        rewards = tensors.token_level_rewards.float()
        mask = (tensors.response_mask != 0).float()
        B, K = mask.shape[0], _num_turns(tensors)
        if len(batch.trajectories) != B:
            raise ValueError(f"credit method 'hcapo': batch has {len(batch.trajectories)} trajectories, tensors have {B} rows")
        episode = F._grpo_scalars(rewards, mask, tensors.index, cfg.epsilon, cfg.norm_adv_by_std)  # (B,)
        present = _turn_present(batch, K)
        before = usage(ctx.scorer)
        log_rho, scored = self.log_ratios(batch, ctx, K)
        c = torch.log(torch.tensor(cfg.ratio_clip))
        rho = log_rho.clamp(-c, c).exp()
        step = (1.0 - 1.0 / rho) * episode.unsqueeze(1) * present  # return-conditioned HCA: (1 - pi/h) * Z
        success = torch.tensor([bool(t.success) for t in batch.trajectories]).unsqueeze(1)
        masked = cfg.do_no_harm & success & (step < 0)
        if cfg.do_no_harm:
            step = torch.where(success, step.clamp(min=0), step)
        turn_adv = (episode.unsqueeze(1) + cfg.step_coef * step) * present
        adv = steps_to_tokens(turn_adv, tensors.turn_ids) * mask
        r = rho[present]
        stats = {
            "scored_actions": float(scored // 2),
            "hindsight_ratio_mean": float(r.mean()) if r.numel() else 1.0,
            "hindsight_ratio_above_one_fraction": float((r > 1).float().mean()) if r.numel() else 0.0,
            "hindsight_ratio_clipped_fraction": float((log_rho[present].abs() >= c).float().mean()) if r.numel() else 0.0,
            "step_term_abs_mean": float(step[present].abs().mean()) if r.numel() else 0.0,
            "do_no_harm_masked": float(masked.sum()),
        }
        return CreditResult(advantages=adv, granularity="turn", credit=turn_credit(adv, tensors.turn_ids, K),
                            overhead=judge_overhead(ctx.scorer, before), stats=stats)
