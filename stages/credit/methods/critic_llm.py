"""LLM-as-critic step credit for reasoning RL: CAPO and InT (survey §3.3.3 and §3.3.1).

Both methods start from the GRPO outcome advantage ``Â_i`` of each response (Shao et al. 2024;
survey §2.3 eq. 2) and let an LLM judge (``needs={"judge"}``: the live policy by default, a local
Hugging Face model, or an OpenAI-compatible endpoint; :mod:`stages.reward.judge`) mark reasoning
steps as correct or incorrect. A *step* is one policy turn (``Trajectory.turns[k]``; for the math
family one reasoning line such as ``"3+4=7"``), so a token's step is ``BatchTensors.turn_ids``.

* **CAPO** (Xie et al. 2025, arXiv 2508.02298; survey §3.3.3, Appendix B row 10): the judge
  critiques every step (a generative PRM); tokens of steps judged incorrect are penalised:

      A_{i,t} = Â_i - (W_process / W_whole) · 1[step(t) judged incorrect]

  The asymmetric weighting ``W_whole > W_process > 0`` is CAPO's balance of outcome and process:
  the penalty is strictly smaller than one unit of outcome advantage, so with binary outcome
  rewards (where the GRPO gap between a correct and an incorrect response of a group is
  ``1/(std+eps) >= 1``, and exactly 1 for Dr. GRPO) every token of a correct response, even one
  of a flawed step, keeps more credit than every token of an incorrect response of the same group.
  With ``votes > 1`` the judge is queried several times and the critiques aggregated (majority,
  intersection = flagged by every vote, union = flagged by any), the paper's voting mechanism;
  useful only with a sampling judge (a local judge's log-odds verdicts are deterministic).

* **InT** (Yang et al. 2026, "InT: Self-Proposed Interventions Enable Credit Assignment in LLM
  Reasoning", arXiv 2601.14209; survey §3.3.1, Appendix B row 14): for each (by default failed)
  response the judge locates the *first* wrong step ``k*`` (``candidates=flagged``: every flagged
  step) and proposes a single-step *intervention*, a rewrite of that step (``Judge.propose``; the
  policy itself by default; with ``use_reference`` the proposer also sees the task's reference
  solution, ``Trajectory.privileged["reference_steps"]``/``["answer"]``, as in the paper). The
  episode is then **really continued** from the rewritten prefix (``mc_rollouts`` with
  ``replacements``): the environment is restored to the state before step ``k``, the rewrite is
  taken as the action, the policy generates the rest (``k`` continuations) and the family's
  verifier scores it. The intervention's *effect* is the outcome change it causes,

      Δ_{i,k} = mean_j G(intervened_j) - G_i(from step k on)

  (1 when a failed trace is rescued every time, 0 when the rewrite is inconsequential), and the
  step's tokens lose credit in proportion to it; every other token keeps the outcome advantage:

      A_{i,t} = Â_i - penalty · Δ_{i,step(t)}   on intervened steps,   Â_i elsewhere.

  A step whose rewrite changes nothing is not blamed; one whose rewrite rescues the trace carries
  the failure. Simplified from the paper: the paper fine-tunes (SFT) on prefix + intervention and
  then runs RL; here the rolled-out interventions are used as counterfactual step credit inside
  the RL advantage (no SFT phase). Every intervention (prompt, proposal, returns, effect, the
  continuations' steps) is returned in ``CreditResult.records["interventions"]`` and logged by
  the flow as an MLflow artifact.

Both record the judge's work as overhead (``judge_calls``, forward passes, generated tokens);
InT adds the continuations' (environment resets and steps, generated tokens, forward passes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from stages.credit import functional as F
from stages.credit.base import CreditContext, CreditMethod
from stages.credit.judge_config import JudgeCreditConfig
from stages.credit.registry import register_method
from stages.credit.segments import steps_to_tokens
from stages.reward.judge import check_judge_config, judge_overhead, usage
from stages.reward.judge_prompts import correction_prompt
from stages.schema import Batch, BatchTensors, CreditResult, turn_credit
from stages.config_fields import param

# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------


def _outcome_advantage(tensors: BatchTensors, epsilon: float, norm_adv_by_std: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Â (B,), binary response mask (B, R))``: GRPO's group-normalized episode advantage."""
    rewards = tensors.token_level_rewards
    if not rewards.is_floating_point():
        rewards = rewards.float()
    mask = (tensors.response_mask != 0).to(rewards.dtype)
    return F._grpo_scalars(rewards, mask, tensors.index, epsilon, norm_adv_by_std), mask


def _check_verdicts(name: str, v: Any, B: int, K: int) -> torch.Tensor:
    if not isinstance(v, torch.Tensor) or v.dim() != 2 or v.shape[0] != B or v.shape[1] < 1:
        got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"credit method {name!r}: judge.step_verdicts() must return a (B, K) = ({B}, {K}) tensor, got {got}")
    v = v.detach().float().cpu()
    bad = ~(torch.isnan(v) | (v == 0) | (v == 1))
    if bool(bad.any()):
        b, k = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"credit method {name!r}: judge verdict[{b}, {k}] must be 1.0, 0.0 or nan, got {float(v[b, k])}")
    if v.shape[1] < K:  # fewer columns than the tensors' turns: the missing steps are absent
        v = torch.cat([v, torch.full((B, K - v.shape[1]), float("nan"))], dim=1)
    return v[:, :K]


def _num_steps(tensors: BatchTensors) -> int:
    return max(int(tensors.num_turns.max().item()) if tensors.num_turns.numel() else 0, 1)


# --------------------------------------------------------------------------------------------
# CAPO
# --------------------------------------------------------------------------------------------


@dataclass
class CAPOConfig(JudgeCreditConfig):
    method: str = param("capo", help="credit-assignment method (registry name; CAPO, Xie et al. 2025)")
    outcome_weight: float = param(2.0, help="W_whole: weight of the outcome advantage (Xie et al. 2025, asymmetric reward)")
    process_weight: float = param(1.0, help="W_process: weight of the wrong-step penalty; must be < W_whole (Xie et al. 2025)", gt=0)
    votes: int = param(1, help="critiques per step, aggregated by `vote` (Xie et al. 2025 voting; >1 only helps a sampling judge)", ge=1)
    vote: str = param("majority", help="vote aggregation: majority | intersection (all votes flag) | union (any vote flags)", choices=("majority", "intersection", "union"))
    norm_adv_by_std: bool = param(True, help="outcome advantage divided by the group std (GRPO; false: Dr. GRPO)")
    epsilon: float = param(1e-6, help="added to the group std (GRPO, verl's epsilon)", ge=0)

    def config_rules(self):
        """CAPO's asymmetric weighting keeps the outcome dominant (Xie et al. 2025)."""
        if not self.outcome_weight > self.process_weight:
            yield "outcome_weight", f"must be > credit.process_weight={self.process_weight} (CAPO's asymmetric weighting keeps the outcome dominant)"


@register_method
class CAPO(CreditMethod):
    """CAPO: an LLM critic flags incorrect steps; their tokens get the outcome advantage minus
    ``W_process / W_whole`` (module docstring; Xie et al. 2025; survey §3.3.3)."""

    name = "capo"
    Config = CAPOConfig
    granularity = "step"
    methodology = "LLM-as-Critic"
    needs = frozenset({"judge"})
    reference = "Xie et al. 2025 (CAPO: generative credit assignment, arXiv 2508.02298); survey §3.3.3"

    def __init__(self, cfg: CAPOConfig):
        super().__init__(cfg)
        check_judge_config(cfg)

    def wrong_steps(self, batch: Batch, judge: Any, B: int, K: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(wrong (B, K) bool, judged (B, K) bool)`` after voting."""
        cfg: CAPOConfig = self.cfg  # type: ignore[assignment]
        votes = torch.stack([_check_verdicts(self.name, judge.step_verdicts(batch), B, K) for _ in range(cfg.votes)])
        judged = ~torch.isnan(votes)
        flags = (votes == 0).sum(0)
        n = judged.sum(0)
        if cfg.vote == "majority":
            wrong = 2 * flags > n
        elif cfg.vote == "intersection":
            wrong = (flags == n) & (n > 0)
        else:
            wrong = flags > 0
        return wrong, n > 0

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: CAPOConfig = self.cfg  # type: ignore[assignment]
        assert ctx.judge is not None  # CreditMethod.__call__ checked ``needs``
        adv_out, mask = _outcome_advantage(tensors, cfg.epsilon, cfg.norm_adv_by_std)
        B, K = mask.shape[0], _num_steps(tensors)
        before = usage(ctx.judge)
        wrong, judged = self.wrong_steps(batch, ctx.judge, B, K)
        penalty = cfg.process_weight / cfg.outcome_weight
        wrong_tok = steps_to_tokens(wrong.to(device=tensors.turn_ids.device, dtype=mask.dtype), tensors.turn_ids)
        adv = (adv_out.unsqueeze(-1) - penalty * wrong_tok) * mask
        credit = turn_credit(adv, tensors.turn_ids, K)
        n_judged = int(judged.sum())
        stats = {
            "judged_steps": float(n_judged),
            "wrong_step_fraction": float(wrong.sum()) / n_judged if n_judged else 0.0,
            "wrong_token_fraction": float((wrong_tok * mask).sum() / mask.sum().clamp(min=1)),
            "responses_with_wrong_step": float(wrong.any(-1).float().mean()),
            "penalty": penalty,
        }
        return CreditResult(advantages=adv, granularity="step", credit=credit,
                            overhead=judge_overhead(ctx.judge, before), stats=stats)


# --------------------------------------------------------------------------------------------
# InT
# --------------------------------------------------------------------------------------------


@dataclass
class InTConfig(JudgeCreditConfig):
    method: str = param("int", help="credit-assignment method (registry name; InT, Yang et al. 2026)")
    penalty: float = param(1.0, help="advantage removed from an intervened step's tokens per unit of outcome change its rewrite causes", ge=0)
    only_failed: bool = param(True, help="intervene only on responses whose outcome is not a success (Yang et al. 2026: failed traces)")
    candidates: str = param("first", help="steps to intervene on: first (the judge's first flagged step, Yang et al. 2026) | flagged (every flagged step)", choices=("first", "flagged"))
    k: int = param(2, help="continuations rolled out from each rewritten prefix (the intervention's outcome is their mean return)", ge=1)
    use_reference: bool = param(True, help="the proposer sees the task's reference solution where the family has one (Yang et al. 2026; privileged, training only)")
    propose_max_new_tokens: int = param(32, help="length cap of the self-proposed rewritten step (Yang et al. 2026)", ge=1)
    norm_adv_by_std: bool = param(True, help="outcome advantage divided by the group std (GRPO; false: Dr. GRPO)")
    epsilon: float = param(1e-6, help="added to the group std (GRPO, verl's epsilon)", ge=0)


def reference_solution(privileged: dict[str, Any]) -> list[str]:
    """The reference solution steps a family puts in ``Trajectory.privileged`` (math:
    ``reference_steps`` + ``answer``), as step lines; empty when it has none."""
    steps = [str(x) for x in (privileged or {}).get("reference_steps") or []]
    answer = (privileged or {}).get("answer")
    return steps + ([f"answer {answer}"] if answer not in (None, "") else [])


def as_step(proposal: str, original: str) -> str:
    """A proposal as one step action: its first non-empty line, ending like the original action
    (e.g. with the math family's ``"\\n"`` stop text); empty if the proposal has no text."""
    line = next((x.strip() for x in str(proposal).splitlines() if x.strip()), "")
    return line + original[len(original.rstrip()):] if line else ""


@register_method
class InT(CreditMethod):
    """InT: the judge finds each response's first wrong step and proposes a rewrite; the episode
    is continued from the rewritten prefix and the step is blamed by the outcome change its
    rewrite causes (module docstring; Yang et al. 2026; survey §3.3.1)."""

    name = "int"
    Config = InTConfig
    granularity = "step"
    methodology = "Intervention"
    needs = frozenset({"judge", "mc_rollouts"})
    reference = "Yang et al. 2026 (InT: self-proposed interventions for credit assignment, arXiv 2601.14209); survey §3.3.1"

    def __init__(self, cfg: InTConfig):
        super().__init__(cfg)
        check_judge_config(cfg)

    def checklist_note(self) -> str:
        cfg: InTConfig = self.cfg  # type: ignore[assignment]
        return ("intervention proposer sees the task's reference solution where the family has one (privileged, "
                "training time only; Yang et al. 2026)" if cfg.use_reference else
                "intervention proposer does not see reference solutions")

    def candidate_steps(self, verdicts: torch.Tensor) -> torch.Tensor:
        """(N, K) bool: the steps to intervene on from (N, K) judge verdicts (0 = wrong)."""
        wrong = verdicts == 0
        if self.cfg.candidates == "flagged":  # type: ignore[attr-defined]
            return wrong
        first = wrong & (wrong.long().cumsum(-1) == 1)  # the first flagged step of each row
        return first

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: InTConfig = self.cfg  # type: ignore[assignment]
        assert ctx.judge is not None and ctx.mc_rollouts is not None  # CreditMethod.__call__ checked ``needs``
        adv_out, mask = _outcome_advantage(tensors, cfg.epsilon, cfg.norm_adv_by_std)
        B, K = mask.shape[0], _num_steps(tensors)
        trajs = batch.trajectories
        if len(trajs) != B:
            raise ValueError(f"credit method 'int': batch has {len(trajs)} trajectories, tensors have {B} rows")
        rows = [b for b, t in enumerate(trajs) if not (cfg.only_failed and t.success)]
        before = usage(ctx.judge)
        cand = torch.zeros((B, K), dtype=torch.bool)
        if rows:
            sub = Batch([trajs[b] for b in rows], iteration=batch.iteration)
            v = _check_verdicts(self.name, ctx.judge.step_verdicts(sub), len(rows), K)
            cand[torch.tensor(rows)] = self.candidate_steps(v)
        todo = [(int(b), int(k)) for b, k in cand.nonzero().tolist() if int(k) < len(trajs[int(b)].turns)]
        prompts, refs = [], 0
        for b, k in todo:
            steps = [turn.action_text for turn in trajs[b].turns]
            reference = reference_solution(trajs[b].privileged) if cfg.use_reference else []
            refs += bool(reference)
            prompts.append(correction_prompt(trajs[b].prompt_text, steps[:k], steps[k], reference))
        proposals = ctx.judge.propose(prompts, cfg.propose_max_new_tokens) if prompts else []
        if len(proposals) != len(prompts):
            raise ValueError(f"credit method 'int': judge.propose returned {len(proposals)} texts for {len(prompts)} prompts")
        overhead = judge_overhead(ctx.judge, before)
        texts = [as_step(p, trajs[b].turns[k].action_text) for (b, k), p in zip(todo, proposals)]
        live = [n for n, t in enumerate(texts) if t]  # an empty proposal is no intervention
        returns = torch.zeros((len(todo), cfg.k))
        conts: list[list[list[str]]] = [[] for _ in todo]
        if live:
            starts = [(todo[n][0], int(trajs[todo[n][0]].turns[todo[n][1]].action_span[0])) for n in live]
            got, mc_overhead = ctx.mc_rollouts(starts, cfg.k, replacements=[texts[n] for n in live])
            got = torch.as_tensor(got, dtype=torch.float32)
            if got.shape != (len(live), cfg.k):
                raise ValueError(f"credit method 'int': mc_rollouts returned shape {tuple(got.shape)}, expected {(len(live), cfg.k)}")
            returns[torch.tensor(live)] = got
            overhead = overhead + mc_overhead
            last = getattr(ctx.mc_rollouts, "last_continuations", None) or []
            for n, c in zip(live, last):
                conts[n] = c
        # the original trace's return from step k on (terminal reward + turn rewards of k and later)
        original = torch.tensor([trajs[b].reward + sum(t.reward for t in trajs[b].turns[k:]) for b, k in todo],
                                dtype=torch.float32)
        ok = torch.zeros(len(todo), dtype=torch.bool)
        if live:
            ok[torch.tensor(live)] = True
        effect_list = torch.where(ok, returns.mean(-1) - original, torch.zeros_like(original))
        effect = torch.zeros((B, K), dtype=mask.dtype)
        if todo:
            idx = torch.tensor(todo, dtype=torch.long)
            effect[idx[:, 0], idx[:, 1]] = effect_list.to(mask.dtype)
        valid = tensors.turn_ids >= 0
        tok_effect = effect.gather(1, tensors.turn_ids.clamp(min=0, max=K - 1)) * valid
        adv = (adv_out.unsqueeze(-1) - cfg.penalty * tok_effect) * mask
        credit = turn_credit(adv, tensors.turn_ids, K)
        records = [{
            "uid": trajs[b].uid, "row": b, "step": k, "wrong_step": trajs[b].turns[k].action_text,
            "prompt": prompt, "proposal": proposal, "replacement": text,
            "reference_shown": bool(cfg.use_reference and reference_solution(trajs[b].privileged)),
            "original_return": float(original[n]),
            "intervened_returns": [float(x) for x in returns[n]] if ok[n] else [],
            "effect": float(effect_list[n]), "continuations": conts[n],
        } for n, ((b, k), prompt, proposal, text) in enumerate(zip(todo, prompts, proposals, texts))]
        hit = cand.any(-1)
        first = cand.float().argmax(-1)  # argmax returns the first maximum
        stats = {
            "judged_responses": float(len(rows)),
            "interventions": float(len(live)),
            "interventions_empty": float(len(todo) - len(live)),
            "interventions_outcome_changed": float((effect_list.abs() > 1e-6).sum()),
            "intervention_effect_mean": float(effect_list[ok].mean()) if live else 0.0,
            "interventions_with_reference": float(refs),
            "first_wrong_step_mean": float(first[hit].float().mean()) if bool(hit.any()) else -1.0,
            "proposal_chars_mean": (sum(len(p) for p in proposals) / len(proposals)) if proposals else 0.0,
        }
        return CreditResult(advantages=adv, granularity="step", credit=credit, overhead=overhead, stats=stats,
                            records={"interventions": records})
