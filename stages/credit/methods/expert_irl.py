"""StepAgent (Deng et al. 2024, "From Novice to Expert: LLM Agent Policy Optimization via Step-wise
Reinforcement Learning", arXiv 2411.03817; survey §5.6, Appendix B row 17): step rewards inferred
by inverse RL from expert actions, compared with the agent's step by step, plus the
novice-to-expert curriculum.

* :func:`expert_steps` — the expert's action at each of the agent's steps: the family's scripted
  optimal agent (the exact MDP's optimal policy, :func:`stages.benchmark.oracle.optimal_values`)
  or, where the family has none, the actions of the run's successful episodes at the same state;
* :func:`target_logprobs` — differentiable ``log p(target | context)`` of given action texts after
  given contexts under a causal LM (the reward model's and the reference's scores of expert and
  agent actions at the same state);
* :func:`step_dpo_loss` — the implicit-reward IRL objective over (expert, agent) action pairs;
* :func:`prefix_length` — the curriculum's expert-prefix length at an iteration;
* :class:`StepAgent` — the credit method.

Vectorized over rows, turns and tokens; the pair assembly (which (row, turn) has which expert
action, host-side lists of token ids) loops over the batch's turns once, as a data-preparation
step; the reward model's fit loops over optimizer steps only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from stages.benchmark.oracle import optimal_values, stack_mdps
from stages.config_fields import param
from stages.credit.base import CreditConfig, CreditContext, CreditMethod, encode_text
from stages.credit.functional import grpo
from stages.credit.policy_copy import PolicyCopyHelper
from stages.credit.registry import register_method
from stages.credit.segments import Segments, broadcast, policy_token_mask, segments_from_ids, unit_sums
from stages.rollout.policy import sequence_logprobs
from stages.schema import Batch, BatchTensors, CreditResult, Overhead

EXPERT_SOURCES = ("auto", "optimal", "successes")


@dataclass
class ExpertSteps:
    """The expert's verdict on each agent step: ``agrees`` (B, K) bool (the agent's action is an
    expert action at that state: optimal, or a success's action there), ``paired`` (B, K) bool
    (a non-expert step with an expert action to compare it with) and, per paired step in
    row-major order, the expert action's token ids (``expert_ids``)."""

    agrees: torch.Tensor
    paired: torch.Tensor
    expert_ids: list[list[int]]
    source: str


def _optimal_steps(batch: Batch, K: int, tokenizer: Any, tol: float = 1e-9) -> ExpertSteps:
    """The exact MDP's optimal agent at every state the agent visited: an agent step agrees when
    its action's ``Q*`` is the state's ``V*`` (ties count); the expert action of a disagreeing step
    is the first optimal valid action's canonical text (``TabularMDP.action_texts``)."""
    trajs = batch.trajectories
    mdps = [t.ground_truth.mdp for t in trajs]
    n_valid = sum(a is not None for a in mdps[0].actions)
    _, Q = optimal_values(stack_mdps(mdps), n_valid)  # (B, H, S, A)
    B, H = len(trajs), mdps[0].horizon
    states = torch.full((B, K), -1, dtype=torch.long)
    actions = torch.full((B, K), -1, dtype=torch.long)
    for b, (traj, mdp) in enumerate(zip(trajs, mdps)):  # per-turn labels (data preparation)
        n = min(len(mdp.states), len(traj.turns), K, H)
        states[b, :n] = torch.tensor(mdp.states[:n], dtype=torch.long)
        actions[b, :n] = torch.tensor([mdp.actions.index(t.action if t.action in mdp.actions else None)
                                       for t in traj.turns[:n]], dtype=torch.long)
    played = states >= 0
    Hk = min(H, K)
    bi = torch.arange(B)[:, None].expand(B, Hk)
    ti = torch.arange(Hk)[None, :].expand(B, Hk)
    q_s = Q[bi, ti, states[:, :Hk].clamp(min=0)]  # (B, Hk, A): Q* at the visited state
    best_q, best_a = q_s[..., :n_valid].max(-1)
    q_taken = q_s.gather(-1, actions[:, :Hk].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    agrees = torch.zeros((B, K), dtype=torch.bool)
    agrees[:, :Hk] = played[:, :Hk] & (q_taken >= best_q - tol)
    paired = played & ~agrees
    texts = {a: encode_text(tokenizer, mdps[0].action_texts[a]) for a in range(n_valid)}
    best = torch.zeros((B, K), dtype=torch.long)
    best[:, :Hk] = best_a
    ids = [texts[int(a)] for a in best[paired].tolist()]
    return ExpertSteps(agrees=agrees, paired=paired, expert_ids=ids, source="optimal")


def _success_steps(batch: Batch, K: int) -> ExpertSteps:
    """The run's successful episodes as the expert: at a state (task, ``Turn.state_key``) a success
    visited, its action (the first success's, in batch order) is the expert's; a step of a failed
    episode at that state with another action is paired with it, a step with that action agrees."""
    trajs = batch.trajectories
    expert: dict[tuple[str, str], tuple[Optional[str], list[int]]] = {}
    for traj in trajs:  # the expert's (state -> action) table (data preparation)
        if traj.success:
            for turn in traj.turns:
                a, e = turn.action_span
                expert.setdefault((traj.task_id, turn.state_key), (turn.action, list(traj.response_ids[a:e])))
    B = len(trajs)
    agrees = torch.zeros((B, K), dtype=torch.bool)
    paired = torch.zeros((B, K), dtype=torch.bool)
    ids: list[list[int]] = []
    for b, traj in enumerate(trajs):
        for k, turn in enumerate(traj.turns[:K]):
            hit = expert.get((traj.task_id, turn.state_key)) if turn.state_key else None
            if hit is None:
                continue
            if traj.success or (turn.action is not None and turn.action == hit[0]):
                agrees[b, k] = True
            elif hit[1]:
                paired[b, k] = True
                ids.append(hit[1])
    return ExpertSteps(agrees=agrees, paired=paired, expert_ids=ids, source="successes")


def expert_steps(batch: Batch, K: int, source: str, tokenizer: Any) -> ExpertSteps:
    """The expert's action at each agent step from ``source`` (see :data:`EXPERT_SOURCES`; ``auto``:
    the optimal agent where every trajectory carries its task's exact MDP, else the successes)."""
    has_mdp = all(t.ground_truth is not None and t.ground_truth.mdp is not None for t in batch.trajectories)
    if source == "optimal" and not has_mdp:
        raise ValueError("credit method 'stepagent' with credit.expert=optimal needs trajectories with the task's exact "
                         "MDP (ground_truth.mdp: a family with exact_mdp); use credit.expert=successes")
    if source == "optimal" or (source == "auto" and has_mdp):
        return _optimal_steps(batch, K, tokenizer)
    return _success_steps(batch, K)


def target_logprobs(model: torch.nn.Module, contexts: list[list[int]], targets: list[list[int]],
                    temperature: float, pad: int = 0) -> torch.Tensor:
    """(N,) ``sum_j log p(targets[i][j] | contexts[i] + targets[i][:j])`` under ``model`` (grad flows
    where enabled): contexts left-padded, targets right-padded, one forward over all N sequences
    (:func:`stages.rollout.policy.sequence_logprobs`, so the scores match behaviour log-probs)."""
    N = len(contexts)
    P = max(len(c) for c in contexts)
    T = max(max(len(t) for t in targets), 1)
    ids = torch.full((N, P + T), pad, dtype=torch.long)
    attn = torch.zeros((N, P + T), dtype=torch.long)
    for i, (c, t) in enumerate(zip(contexts, targets)):  # host-side assembly of the padded batch
        ids[i, P - len(c):P] = torch.as_tensor(c, dtype=torch.long)
        ids[i, P:P + len(t)] = torch.as_tensor(t, dtype=torch.long)
        attn[i, P - len(c):P + len(t)] = 1
    dev = next(model.parameters()).device
    ids, attn = ids.to(dev), attn.to(dev)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    lp, _ = sequence_logprobs(model, ids, attn, pos, P, temperature=temperature)
    return (lp * attn[:, P:].to(lp.dtype)).sum(-1).cpu()


def step_dpo_loss(expert_lr: torch.Tensor, agent_lr: torch.Tensor, beta: float) -> torch.Tensor:
    """Mean over paired steps of ``-log sigmoid(beta * (log pi_phi/pi_ref(a_E|s) - log pi_phi/pi_ref(a|s)))``:
    the implicit reward ``beta * log pi_phi/pi_ref`` of the expert's action above the agent's, at the
    same state (0 without pairs)."""
    if expert_lr.numel() == 0:
        return expert_lr.sum() * 0.0
    return -F.logsigmoid(beta * (expert_lr - agent_lr)).mean()


def prefix_length(iteration: int, start: int, iterations: int) -> int:
    """The novice-to-expert curriculum's expert-prefix length (turns) at ``iteration``: ``start`` at
    iteration 0, decreasing linearly to 0 at ``iterations`` (and 0 after); 0 with ``start=0``."""
    if start <= 0 or iterations <= 0:
        return 0
    return int(math.ceil(start * max(0.0, 1.0 - iteration / iterations)))


def turn_index_units(tensors: BatchTensors, mask: torch.Tensor) -> Segments:
    """The policy tokens of each response with unit k = turn k itself (not compacted as
    :func:`~stages.credit.segments.turn_segments` does: the expert pairs are indexed by turn)."""
    return segments_from_ids(torch.where(mask.bool(), tensors.turn_ids, torch.full_like(tensors.turn_ids, -1)))


@dataclass
class StepAgentConfig(CreditConfig):
    method: str = param("stepagent", help="credit-assignment method (registry name; StepAgent, Deng et al. 2024)")
    expert: str = param("auto", help="the expert of the inverse RL (StepAgent's expert trajectories): optimal (the "
                        "family's scripted optimal agent, from its exact MDP) | successes (the run's successful "
                        "episodes at the same state) | auto (optimal where the family has an exact MDP)",
                        choices=EXPERT_SOURCES)
    beta: float = param(0.1, help="beta of the implicit step reward beta * log(pi_phi / pi_ref) and of the step-wise "
                        "DPO objective on (expert, agent) action pairs (StepAgent's implicit-reward IRL)", gt=0)
    alpha: float = param(1.0, help="weight of the IRL step reward added to the episode-level GRPO advantage", ge=0)
    rm_lr: float = param(1e-3, help="AdamW learning rate of the reward model's step-wise DPO fit (a copy of the policy)",
                         gt=0)
    rm_steps: int = param(4, help="full-batch AdamW steps of the reward model per iteration on the batch's (expert, "
                          "agent) pairs before the step rewards are read (0 = no fit: every step reward 0, GRPO)", ge=0)
    curriculum_start: int = param(0, help="novice-to-expert curriculum: the expert-prefix length (turns) at iteration 0; "
                                  "steps inside the prefix get no IRL reward and no pair (0 = no curriculum)", ge=0)
    curriculum_iterations: int = param(10, help="iterations over which the expert prefix shrinks linearly from "
                                       "curriculum_start to 0", gt=0)
    epsilon: float = param(1e-6, help="added to the group std of the episode-level GRPO normalisation", ge=0)


@register_method
class StepAgent(PolicyCopyHelper, CreditMethod):
    """StepAgent: step-wise inverse RL from expert actions (Deng et al. 2024; survey §5.6, Appendix B row 17).

    **Inspection.** At every step k of an agent trajectory (state ``s_k``: the prompt and the
    response up to the turn's action) the agent's action ``a_k`` is compared with the expert's
    action ``a^E_k`` at the same state (:func:`expert_steps`): the family's scripted optimal agent
    (``credit.expert=optimal``: the optimal policy of the task's exact MDP, where ``Q*(s, a_k) <
    V*(s)`` marks a non-expert step) or the run's successful episodes (``successes``: a success's
    action at the same task state).

    **Reflection (implicit-reward inverse RL).** A reward model ``pi_phi`` (a copy of the policy,
    :meth:`bind_policy` / :meth:`build_helpers`, saved in every checkpoint as
    ``helper.stepagent_rm``) is fitted each iteration by ``rm_steps`` AdamW steps of the step-wise
    DPO objective over the non-expert steps, the expert's action preferred over the agent's at the
    same state (:func:`step_dpo_loss`; reference ``pi_ref`` = the behaviour policy: the agent
    action's behaviour log-probs, the bound policy's scores of the expert action)::

        L_IRL = -log sigmoid( beta * log pi_phi/pi_ref (a^E_k | s_k) - beta * log pi_phi/pi_ref (a_k | s_k) )

    Its implicit reward ``r(s, a) = beta * log pi_phi(a|s)/pi_ref(a|s)`` is the inferred step
    reward: it rises on expert actions, falls on the agent's deviations (and on the steps that
    already act like the expert it rises through the shared parameters). Each agent step gets
    ``r_k = r(s_k, a_k)`` (the sum over the turn's tokens) and the advantage fuses it with the
    outcome::

        A_k = GRPO(R)_i + alpha * r_k        (every token of turn k)

    **Novice-to-expert curriculum.** With ``curriculum_start = L0 > 0`` the expert prefix at
    iteration i is ``L_i = ceil(L0 * (1 - i / curriculum_iterations))`` turns (:func:`prefix_length`,
    decreasing to 0): steps k < L_i count as the expert's prefix (no pair, no step reward), the
    agent is inspected from step L_i on, so it is first held to the expert on the late steps and
    on ever more of the episode as training goes on.

    Limits: no non-expert step (an agent that acts like the expert everywhere) or ``rm_steps=0``:
    ``pi_phi = pi_ref``, every ``r_k = 0``, exactly GRPO (on on-policy behaviour log-probs).

    Simplified: (1) the paper inspects the agent at the states of *expert* trajectories; here the
    expert (the MDP's optimal agent, or a success) is asked at the states the *agent* visited
    (DAgger-style relabelling: one step-by-step comparison on the batch, no extra generation).
    (2) The curriculum's prefix is not played by the expert: the rollout stage has no forced-prefix
    mode, so the steps inside the prefix are the agent's own and are only exempt from the IRL
    reward. (3) The paper's two reflection strategies are implicit-reward RL (DPO on the policy)
    and inverse RL (a reward model + PPO); here one implicit-reward model (a policy copy trained by
    step DPO) supplies PPO/GRPO-style step rewards, no separate discriminator network and no critic:
    the step reward is the step's own advantage term (no return-to-go). (4) ``successes`` uses the
    current batch's successes only (no persisted expert buffer; what the reward model learned
    persists). (5) Fresh AdamW state each iteration, full-batch steps. Overhead: the reference's
    score of the expert actions (one pass over the pairs), (rm_steps + 1) passes of the reward model
    over the pairs' expert and agent actions (+ rm_steps backward), one over the batch.
    """

    name = "stepagent"
    Config = StepAgentConfig
    granularity = "turn"
    methodology = "Implicit+IRL"
    needs_group = True
    needs = frozenset({"rollout_temperature", "tokenizer"})
    reference = ("Deng et al. 2024 (StepAgent: step-wise inverse RL from expert actions, implicit step reward, "
                 "novice-to-expert curriculum); survey §5.6")

    helper_name, helper_state_key, adopted_stat, helper_what = "stepagent_rm", "rm_state", "rm_adopted", "its reward model"

    @property
    def rm(self) -> Optional[torch.nn.Module]:
        """The kept implicit reward model (None until built)."""
        return self.helper_copy

    def checklist_note(self) -> str:
        cfg: StepAgentConfig = self.cfg  # type: ignore[assignment]
        return (f"expert actions at training time (credit.expert={cfg.expert}: the task's optimal agent from its exact "
                "MDP, or the run's successful episodes)")

    def step_rewards(self, model: torch.nn.Module, tensors: BatchTensors, temperature: float) -> tuple[torch.Tensor, Any]:
        """(B, K) ``beta * sum_{turn k} (log pi_model - log pi_old)`` of the batch's own actions (unit k =
        turn k), and the turn segments."""
        cfg: StepAgentConfig = self.cfg  # type: ignore[assignment]
        mask = policy_token_mask(tensors)
        with torch.no_grad():
            lp, _ = sequence_logprobs(model, tensors.input_ids, tensors.attention_mask, tensors.position_ids,
                                      tensors.prompt_len, temperature=temperature)
        seg = turn_index_units(tensors, mask)
        return cfg.beta * unit_sums((lp.cpu() - tensors.old_logprobs.float()) * mask, seg), seg

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: StepAgentConfig = self.cfg  # type: ignore[assignment]
        rm = self.copy_to_fit()
        assert self._policy is not None
        temperature = float(ctx.rollout_temperature)
        mask = policy_token_mask(tensors)
        B = int(mask.shape[0])
        K = max(int(tensors.num_turns.max()), 1)
        L = prefix_length(int(batch.iteration), cfg.curriculum_start, cfg.curriculum_iterations)
        ex = expert_steps(batch, K, cfg.expert, ctx.tokenizer)
        in_prefix = torch.arange(K)[None, :] < L
        keep = ~in_prefix.expand(B, K)[ex.paired]  # per paired step (row-major): outside the expert prefix
        paired = ex.paired & ~in_prefix
        expert_ids = [ids for ids, k in zip(ex.expert_ids, keep.tolist()) if k]
        # contexts and the agent's action tokens of the paired steps (host-side lists, data preparation)
        trajs = batch.trajectories
        rows, turns = paired.nonzero(as_tuple=True)
        contexts, agent_ids = [], []
        for b, k in zip(rows.tolist(), turns.tolist()):
            traj = trajs[b]
            a, e = traj.turns[k].action_span
            contexts.append(list(traj.prompt_ids) + list(traj.response_ids[:a]))
            agent_ids.append(list(traj.response_ids[a:e]))
        n_pairs = len(contexts)
        stats: dict[str, float] = {"pairs": float(n_pairs), "prefix_length": float(L),
                                   "expert_agreement": float(ex.agrees.sum()) / max(float((ex.agrees | ex.paired).sum()), 1.0)}
        fwd_passes = fwd_tokens = 0
        if n_pairs:
            mask_old = tensors.old_logprobs.float() * mask
            seg_agent_old = unit_sums(mask_old, turn_index_units(tensors, mask))[rows, turns]
            with torch.no_grad():
                ref_expert = target_logprobs(self._policy, contexts, expert_ids, temperature)
            seq_tokens = sum(len(c) + len(t) for c, t in zip(contexts, expert_ids))
            both = sum(len(c) + len(t) for c, t in zip(contexts, agent_ids)) + seq_tokens
            fwd_passes += n_pairs
            fwd_tokens += seq_tokens

            def loss_acc() -> tuple[torch.Tensor, float]:
                e = target_logprobs(rm, contexts, expert_ids, temperature) - ref_expert
                g = target_logprobs(rm, contexts, agent_ids, temperature) - seg_agent_old
                return step_dpo_loss(e, g, cfg.beta), float((e > g).float().mean())

            with torch.no_grad():
                before, acc0 = loss_acc()
            stats.update(rm_loss_before=float(before), rm_accuracy_before=acc0)
            if cfg.rm_steps:
                opt = torch.optim.AdamW(rm.parameters(), lr=cfg.rm_lr, weight_decay=0.0)
                rm.train()
                for _ in range(cfg.rm_steps):  # optimizer steps, not a loop over tokens or rows
                    opt.zero_grad(set_to_none=True)
                    loss_acc()[0].backward()
                    opt.step()
                rm.eval()
            with torch.no_grad():
                after, acc1 = loss_acc()
            stats.update(rm_loss_after=float(after), rm_accuracy_after=acc1)
            fwd_passes += (cfg.rm_steps + 2) * 2 * n_pairs
            fwd_tokens += (cfg.rm_steps + 2) * both
        r, seg = self.step_rewards(rm, tensors, temperature)
        present = seg.present & ~in_prefix[:, : seg.K]
        r = r * present
        fwd_passes += B
        fwd_tokens += int(tensors.attention_mask.sum())
        a_e, _ = grpo(tensors.token_level_rewards, tensors.response_mask, tensors.index, cfg.epsilon)
        adv = (a_e + cfg.alpha * broadcast(r, seg, mask)) * mask
        n = present.sum().clamp(min=1)
        on_agree = ex.agrees[:, : seg.K] & present
        on_pair = ex.paired[:, : seg.K] & present
        stats.update(step_reward_mean=float(r.sum() / n), step_reward_abs_mean=float(r.abs().sum() / n),
                     expert_step_reward_mean=float(r[on_agree].mean()) if bool(on_agree.any()) else 0.0,
                     nonexpert_step_reward_mean=float(r[on_pair].mean()) if bool(on_pair.any()) else 0.0,
                     turns_per_trajectory=float(seg.present.sum(-1).float().mean()))
        overhead = Overhead(extra_forward_passes=fwd_passes, forward_tokens=fwd_tokens)
        state = {k: v.detach().clone() for k, v in rm.state_dict().items()}
        return CreditResult(advantages=adv, granularity="turn", credit=r, overhead=overhead, stats=stats,
                            helper_inputs={"rm_state": state})
