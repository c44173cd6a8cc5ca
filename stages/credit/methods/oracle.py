"""Oracle credit: the exact per-turn advantage from the task's ground truth (survey §9.3).

Not a method of the survey's inventory but the upper bound every comparison needs (§9.2: "a
unified CA benchmark with computable ground truth"). On a task that exports its MDP
(:class:`stages.schema.TabularMDP`; the bifurcation family), the credit of played turn t is

    A_t = Q^pi(s_t, a_t) - V^pi(s_t)

computed exactly by dynamic programming (:mod:`stages.benchmark.oracle`) and given to every
policy token of the turn (observation tokens get 0).

``credit.policy`` chooses ``pi``:

* ``current`` (default) — the policy being trained: at every played turn the scorer gives the
  policy's probability of each valid action's canonical text after the turn's actual context
  (``TabularMDP.action_texts``); the rest of the probability mass is the *invalid* action.
  **Simplified**: the DP uses, at a later turn t', the probabilities measured in the
  trajectory's own context at t', i.e. it assumes the policy's action distribution at t' does
  not depend on which action was taken before (exact for a policy that conditions on the current
  observation only; the scored text is the canonical one, other spellings of the same action
  count as invalid); a turn after a trajectory's early end uses the batch's mean probabilities
  at that turn index.
* ``reference`` — the task's own reference policy (``env.reference_policy``: uniform or
  optimal): the ground truth's stored advantages, no scorer calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stages.benchmark.oracle import played_advantages, policy_values, stack_mdps
from stages.config_fields import param
from stages.credit.base import CreditConfig, CreditContext, CreditMethod, encode_text
from stages.credit.registry import register_method
from stages.reward.judge import judge_overhead, usage
from stages.schema import Batch, BatchTensors, CreditResult, Overhead

ORACLE_POLICIES = ("current", "reference")


@dataclass
class OracleConfig(CreditConfig):
    method: str = param("oracle", help="credit-assignment method (registry name; exact advantages from the task's MDP)")
    policy: str = param("current", help="policy of the exact advantages: current (the trained policy, scored) | "
                        "reference (the task's reference policy)", choices=ORACLE_POLICIES)


def _uniform(A: int, n_valid: int) -> torch.Tensor:
    u = torch.zeros(A, dtype=torch.float64)
    u[:n_valid] = 1.0 / n_valid
    return u


@register_method
class Oracle(CreditMethod):
    """Exact per-turn advantages under the current (or the task's reference) policy; see module doc."""

    name = "oracle"
    Config = OracleConfig
    #: the upper bound: scoring the policy at every state of the MDP is ground truth, not a method's cost,
    #: so a budget does not charge it (reported in budget.uncharged["ground_truth"])
    charged = False
    granularity = "turn"
    methodology = "exact DP on the task's MDP (ground truth)"
    needs = frozenset({"scorer", "tokenizer"})
    #: only tasks whose trajectories carry ``ground_truth.mdp`` (the loader refuses others)
    needs_exact_mdp = True
    reference = "survey §9.3 (ground-truth credit); the benchmark's upper bound"

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: OracleConfig = self.cfg  # type: ignore[assignment]
        trajs = batch.trajectories
        missing = [t.uid for t in trajs if t.ground_truth is None or t.ground_truth.mdp is None]
        if missing:
            raise ValueError(f"credit method 'oracle' needs trajectories with an exact MDP (ground_truth.mdp); "
                             f"{len(missing)} of {len(trajs)} have none (env {trajs[0].env_name!r})")
        mdps = [t.ground_truth.mdp for t in trajs]
        H = mdps[0].horizon
        B = len(trajs)
        states = torch.full((B, H), -1, dtype=torch.long)
        actions = torch.full((B, H), -1, dtype=torch.long)
        overhead = Overhead()
        for b, (traj, mdp) in enumerate(zip(trajs, mdps)):  # per-turn labels (data preparation)
            n = len(mdp.states)
            states[b, :n] = torch.tensor(mdp.states, dtype=torch.long)
            actions[b, :n] = torch.tensor([mdp.actions.index(turn.action if turn.action in mdp.actions else None)
                                           for turn in traj.turns[:n]], dtype=torch.long)
        if cfg.policy == "reference":
            adv = torch.full((B, H), float("nan"), dtype=torch.float64)
            for b, traj in enumerate(trajs):
                n = len(traj.ground_truth.advantage)
                adv[b, :n] = torch.tensor(traj.ground_truth.advantage, dtype=torch.float64)
            probs_used = None
        else:
            before = usage(ctx.scorer)
            probs_used = self._policy_probs(batch, mdps, ctx)
            spent = judge_overhead(ctx.scorer, before)
            overhead.extra_forward_passes += max(spent.extra_forward_passes, 1)
            overhead.forward_tokens += spent.forward_tokens  # every scored context + action, per row
            V, Q = policy_values(stack_mdps(mdps), probs_used)
            adv = played_advantages(V, Q, states, actions)
        K = tensors.turn_ids.max().item() + 1 if tensors.turn_ids.numel() else 0
        turn_adv = torch.nan_to_num(adv, nan=0.0)
        if turn_adv.shape[1] < K:
            turn_adv = torch.cat([turn_adv, turn_adv.new_zeros(B, K - turn_adv.shape[1])], 1)
        idx = tensors.turn_ids.clamp(min=0)
        on_turn = (tensors.turn_ids >= 0) & (tensors.response_mask != 0)
        token_adv = torch.where(on_turn, torch.gather(turn_adv, 1, idx), torch.zeros((), dtype=torch.float64))
        played = ~torch.isnan(adv)
        stats = {"oracle_abs_mean": float(adv[played].abs().mean()) if bool(played.any()) else 0.0,
                 "oracle_current_policy": float(cfg.policy == "current")}
        if probs_used is not None:
            p_played = probs_used[played]
            stats["oracle_invalid_mass"] = float(p_played[:, -1].mean()) if p_played.numel() else 0.0
        return CreditResult(advantages=token_adv.to(tensors.token_level_rewards.dtype), granularity="turn",
                            credit=adv, overhead=overhead, stats=stats)

    def _policy_probs(self, batch: Batch, mdps: list, ctx: CreditContext) -> torch.Tensor:
        """(B, H, A) current-policy probabilities of each action at each turn (one scorer pass
        over every played turn x valid action). A turn a trajectory did not play (its episode
        ended early) gets the batch's mean probabilities at that turn index (uniform over valid
        actions if no trajectory played it): the counterfactual Q of earlier turns needs it."""
        assert ctx.scorer is not None and ctx.tokenizer is not None
        mdp0 = mdps[0]
        texts = [encode_text(ctx.tokenizer, t) for t in mdp0.action_texts]
        n_valid = len(texts)
        A = len(mdp0.actions)
        B, H = len(batch.trajectories), mdp0.horizon
        contexts, targets, where = [], [], []
        for b, traj in enumerate(batch.trajectories):
            for t, turn in enumerate(traj.turns[:H]):
                context = list(traj.prompt_ids) + list(traj.response_ids[: turn.action_span[0]])
                for a, tgt in enumerate(texts):
                    contexts.append(context)
                    targets.append(tgt)
                    where.append((b, t, a))
        probs = torch.zeros(B, H, A, dtype=torch.float64)
        probs[..., :n_valid] = 1.0 / n_valid
        if contexts:
            lps = ctx.scorer(contexts, targets)
            lp = torch.stack([x.double().sum() for x in lps])
            w = torch.tensor(where, dtype=torch.long)
            played = torch.zeros(B, H, dtype=torch.bool)
            played[w[:, 0], w[:, 1]] = True
            probs[played] = 0.0
            probs[w[:, 0], w[:, 1], w[:, 2]] = lp.exp()
            valid_mass = probs[..., :n_valid].sum(-1)
            if A > n_valid:  # the rest of the mass: any other text, i.e. an invalid action
                probs[..., n_valid] = torch.where(played, (1.0 - valid_mass).clamp(min=0.0), probs[..., n_valid])
            probs = probs / probs.sum(-1, keepdim=True)
            # turns a trajectory did not play (it ended early) still matter to the counterfactual
            # Q of its earlier turns: there, the batch's mean policy at that turn index
            count = played.sum(0)
            mean = (probs * played[..., None]).sum(0) / count.clamp(min=1)[:, None]
            fill = torch.where((count > 0)[:, None], mean, _uniform(A, n_valid).expand(H, A))
            probs = torch.where(played[..., None], probs, fill[None].expand(B, H, A))
        return probs
