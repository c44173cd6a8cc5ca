"""LightningRL: the credit module of Agent Lightning (Luo et al. 2025, "Agent Lightning: Train ANY
AI Agents with Reinforcement Learning", arXiv 2508.03680, §3.2; survey §5.7, Appendix B row 37).

Agent Lightning decomposes an agent's execution into *transitions* — one per LLM call, (prompt,
completion) — and trains them with a single-turn RL algorithm after a credit-assignment module
has given each transition its return. LightningRL's module, as published, gives every transition
of an episode the episode's final reward; then the single-turn algorithm (GRPO here) turns it
into token-level advantages within each call, the same value on every completion token::

    A_e     = (R_e - mean_{e' in g(e)} R_e') / (std_{e' in g(e)} R_e' + eps)     (episodes e of task group g)
    A_{e,c,t} = A_e   for every call c of episode e and every completion token t of c

The group statistics run over **episodes**, each counted once however many transitions (calls,
trajectory rows) it has: ``credit.baseline=episodes`` (default). A per-transition GRPO — where an
episode with more calls weighs more in its group's mean and std — is ``credit.baseline=transitions``
(GRPO on the rows exactly). The two coincide when every episode is one row, which is what the
endpoint (:mod:`stages.rollout.lightning`) produces for an agent that extends its chat history;
an agent that rewrites its context makes an episode several rows (``Trajectory.meta["episode"]``
names the episode of each row).

The decoupled execution itself (the served endpoint, the agent program, calls -> transitions) is
the rollout side, ``env=lightning``; this method composes with it as any method does, and any
method that needs no replay of episodes (GRPO, GiGPO, CARL, ...) runs on ``env=lightning`` too.
On an ordinary family each trajectory is one episode and the method is GRPO.

Simplifications: the single-turn algorithm is fixed to GRPO's group normalisation (the paper
plugs in GRPO, PPO or REINFORCE++); no hierarchical/learned credit module (the paper leaves
non-uniform per-transition credit as future work, as do we); the episode's reward is the agent's
own report, with turn rewards 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stages.config_fields import param
from stages.credit.base import CreditConfig, CreditContext, CreditMethod
from stages.credit.group_stats import group_stats
from stages.credit.registry import register_method
from stages.schema import Batch, BatchTensors, CreditResult, Overhead, turn_credit


@dataclass
class LightningConfig(CreditConfig):
    method: str = param("lightning", help="credit-assignment method (registry name; LightningRL, Luo et al. 2025)")
    baseline: str = param("episodes", help="group statistics over episodes, each once (LightningRL's episode return "
                                           "to every transition), or over transitions (per-row GRPO; Luo et al. 2025 §3.2)",
                          choices=("episodes", "transitions"))
    norm_adv_by_std: bool = param(True, help="divide by the group std (GRPO as LightningRL's single-turn algorithm, "
                                             "Luo et al. 2025 §3.2); false: mean-centred only")
    epsilon: float = param(1e-6, help="added to the group std before dividing (GRPO's epsilon)", ge=0)


def episode_ids(batch: Batch) -> torch.Tensor:
    """(B,) long: dense id of each row's episode (``meta["episode"]``, else the row's own uid).
    One dictionary pass over the rows (data preparation); everything after it is tensor work."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(str(t.meta.get("episode", t.uid)), len(ids)) for t in batch.trajectories],
                        dtype=torch.long)


def episode_group_advantage(scores: torch.Tensor, index: torch.Tensor, episode: torch.Tensor, per_episode: bool,
                            epsilon: float, norm_by_std: bool) -> torch.Tensor:
    """(B,) group-normalised advantage of each row's score. ``per_episode``: the group's mean and
    std are over its episodes, each once (rows of one episode share their score); else over rows."""
    if not per_episode:
        _, mean, std, _ = group_stats(scores, index, with_std=norm_by_std)
        return (scores - mean) / (std + epsilon) if norm_by_std else scores - mean
    E = int(episode.max().item()) + 1 if episode.numel() else 0
    ep_score = torch.full((E,), -float("inf"), dtype=scores.dtype).scatter_reduce_(0, episode, scores, "amax")
    ep_group = torch.zeros(E, dtype=torch.long).scatter_reduce_(0, episode, index.long(), "amax", include_self=False)
    _, mean, std, _ = group_stats(ep_score, ep_group, with_std=norm_by_std)
    adv = (ep_score - mean) / (std + epsilon) if norm_by_std else ep_score - mean
    return adv[episode]


@register_method
class LightningRL(CreditMethod):
    """Each episode's group-normalised final reward to every call (transition) of it, then to
    every completion token of each call (Luo et al. 2025 §3.2; see the module docstring)."""

    name = "lightning"
    Config = LightningConfig
    needs_group = True  # GRPO's group baseline: rollout.group_size=1 gives zero advantages
    granularity = "turn"
    methodology = "Decoupled Arch. (LightningRL: episode return to every transition)"
    reference = "Luo et al. 2025 (Agent Lightning / LightningRL, arXiv 2508.03680) §3.2; survey §5.7"

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: LightningConfig = self.cfg  # type: ignore[assignment]
        mask = (tensors.response_mask != 0).to(torch.float32)
        scores = tensors.token_level_rewards.float().sum(-1)
        episode = episode_ids(batch)
        adv = episode_group_advantage(scores, tensors.index, episode, cfg.baseline == "episodes", cfg.epsilon,
                                      cfg.norm_adv_by_std)
        advantages = adv.unsqueeze(-1) * mask
        E = int(episode.max().item()) + 1
        rows = torch.zeros(E).index_add_(0, episode, torch.ones_like(scores))
        calls = tensors.num_turns.float()
        stats = {
            "episodes": float(E),
            "rows_per_episode_mean": float(rows.mean()),
            "split_episode_fraction": float((rows > 1).float().mean()),
            "calls_per_episode_mean": float(calls.sum() / E),
            "episode_credit_abs_mean": float(adv.abs().mean()),
        }
        return CreditResult(advantages=advantages, granularity="turn",
                            credit=turn_credit(advantages, tensors.turn_ids, tensors.max_turns),
                            overhead=Overhead(), stats=stats)
