"""SWEET-RL (Zhou et al. 2025, "SWEET-RL: Training Multi-Turn LLM Agents on Collaborative Reasoning
Tasks", arXiv 2503.15478; survey §5.1, Appendix B row 20): a turn-level critic that reads
**privileged training-time information** the actor never sees, trained with a Bradley–Terry
objective on trajectory pairs; its turn advantages rank the actor's turns for a DPO update.

* :class:`PrivilegedCritic` — ``A_phi(h_k, c)``: a small MLP over the policy's (detached) hidden
  state at turn k's last policy token and an embedding of the tokenized privileged information
  ``c`` of the episode's task (``Trajectory.privileged``, the family's ``privileged()``);
* :func:`privileged_token_ids` — ``c`` as the policy tokenizer's ids of its canonical JSON text
  (the critic's input only: the actor's prompt and observations never contain it);
* :func:`bt_pairs` / :func:`bradley_terry_loss` / :func:`fit_critic` — the paper's trajectory-level
  Bradley–Terry objective ``-log sigmoid(sum_k A(w_k) - sum_k A(l_k))`` over the group's pairs
  with different returns;
* :class:`SWEETRL` — the credit method: turn advantages ``A_phi`` broadcast to the turn's tokens,
  composed by default with ``update.loss=turn_dpo`` (turn pairs at the same anchor state, best vs
  worst advantage).

Vectorized over rows, turns and tokens; the only Python loop tokenizes each row's privileged
JSON (data preparation, O(B), like :meth:`stages.schema.BatchTensors.from_batch`).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from stages.config_fields import param
from stages.credit.base import CreditConfig, CreditContext, CreditMethod, encode_text
from stages.credit.registry import register_method
from stages.credit.segments import Segments, broadcast, policy_token_mask, turn_segments, unit_ends
from stages.schema import Batch, BatchTensors, CreditResult, Overhead


def privileged_text(privileged: dict[str, Any]) -> str:
    """The canonical text of a trajectory's privileged information (sorted-key JSON; "" if none)."""
    return json.dumps(privileged, sort_keys=True, default=str) if privileged else ""


def privileged_token_ids(batch: Batch, tokenizer: Any, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) long token ids of each trajectory's :func:`privileged_text` (its first ``max_tokens``)
    and (B, L) bool mask; a row without privileged information has no tokens."""
    rows = [encode_text(tokenizer, privileged_text(t.privileged))[:max_tokens] for t in batch.trajectories]
    L = max((len(r) for r in rows), default=0) or 1
    ids = torch.zeros((len(rows), L), dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.bool)
    for i, r in enumerate(rows):  # rows of the batch: tokenized text to a padded tensor (data preparation)
        ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    return ids, mask


class PrivilegedCritic(nn.Module):
    """``A(h, c) = w . tanh(W_h LN(h) + e(c) + b) + b_out``: the advantage of the turn whose
    feature is ``h`` (layer-normalised without parameters, so the tanh layer does not saturate on
    the policy's unnormalised hidden states) (the policy's hidden state at the turn's last token: it has read the context
    and the turn's action) given the privileged information ``c``. ``e(c)`` is the mean of hashed
    (token, position) embeddings of ``c``'s token ids (order-aware; position hashing keeps it small).
    The output layer starts at zero: a fresh critic gives every turn advantage 0."""

    def __init__(self, hidden_size: int, width: int, buckets: int, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.buckets = int(buckets)
        self.feat = nn.Linear(hidden_size, width)
        self.priv = nn.Embedding(self.buckets, width)
        self.out = nn.Linear(width, 1)
        with torch.no_grad():
            bound = 1.0 / max(hidden_size, 1) ** 0.5
            self.feat.weight.copy_(torch.empty(width, hidden_size).uniform_(-bound, bound, generator=gen))
            self.feat.bias.zero_()
            self.priv.weight.copy_(torch.randn(self.buckets, width, generator=gen) / width ** 0.5)
            self.out.weight.zero_()
            self.out.bias.zero_()

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids, (B, L) bool -> (B, width) mean embedding (0 for rows without tokens)."""
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        h = (ids.long() * 1_000_003 + pos * 7_919) % self.buckets
        m = mask.to(torch.float32).unsqueeze(-1)
        return (self.priv(h) * m).sum(1) / m.sum(1).clamp(min=1)

    def forward(self, features: torch.Tensor, priv: torch.Tensor) -> torch.Tensor:
        """(B, K, H) turn features, (B, width) privileged embedding -> (B, K) turn advantages."""
        h = F.layer_norm(features.float(), features.shape[-1:])
        z = torch.tanh(self.feat(h) + priv.unsqueeze(1))
        return self.out(z).squeeze(-1)


def turn_features(hidden: torch.Tensor, seg: Segments) -> torch.Tensor:
    """(B, R, H) hidden states -> (B, K, H) at each turn's last policy token (0 for absent turns)."""
    idx = unit_ends(seg).clamp(min=0).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return hidden.float().gather(1, idx) * seg.present.unsqueeze(-1).to(torch.float32)


def bt_pairs(returns: torch.Tensor, index: torch.Tensor, margin: float) -> torch.Tensor:
    """(B, B) bool: ``[i, j]`` where i and j are rollouts of the same task and i's return exceeds
    j's by more than ``margin`` (i is the chosen, j the rejected trajectory of a pair)."""
    same = index.unsqueeze(0) == index.unsqueeze(1)
    return same & (returns.unsqueeze(1) - returns.unsqueeze(0) > margin)


def bradley_terry_loss(adv: torch.Tensor, present: torch.Tensor, pairs: torch.Tensor, l2: float = 0.0) -> torch.Tensor:
    """Mean over pairs (i chosen, j rejected) of ``-log sigmoid(S_i - S_j)``, ``S = sum_k A_k`` over
    the trajectory's turns: the paper's trajectory-level Bradley–Terry objective (0 without pairs),
    plus ``l2`` times the mean squared turn advantage (the objective only fixes differences of
    sums: the penalty keeps advantages that no pair asks for at 0 and the scale bounded)."""
    p = present.to(adv.dtype)
    s = (adv * p).sum(-1)
    diff = s.unsqueeze(1) - s.unsqueeze(0)
    n = pairs.sum()
    if int(n) == 0:
        return adv.sum() * 0.0
    reg = l2 * (adv.pow(2) * p).sum() / p.sum().clamp(min=1)
    return (-F.logsigmoid(diff) * pairs.to(diff.dtype)).sum() / n + reg


def fit_critic(critic: PrivilegedCritic, inputs: dict[str, torch.Tensor], steps: int, lr: float) -> dict[str, float]:
    """``steps`` full-batch Adam steps of the Bradley–Terry objective on the recorded inputs
    (features and privileged ids are fixed tensors: the policy is not trained through the critic).
    Returns the loss and the pair accuracy before and after."""
    feats, present = inputs["features"].detach().float(), inputs["present"].bool()
    pairs = bt_pairs(inputs["returns"].float(), inputs["index"], float(inputs["margin"]))
    ids, mask = inputs["privileged_ids"], inputs["privileged_mask"]
    use = bool(inputs["use_privileged"])

    def loss_acc() -> tuple[torch.Tensor, float]:
        e = critic.encode(ids, mask) if use else torch.zeros((feats.shape[0], critic.out.in_features))
        a = critic(feats, e)
        s = (a * present).sum(-1)
        acc = float(((s.unsqueeze(1) > s.unsqueeze(0)) & pairs).sum() / pairs.sum().clamp(min=1))
        return bradley_terry_loss(a, present, pairs, float(inputs.get("l2", 0.0))), acc

    with torch.no_grad():
        before, acc0 = loss_acc()
    stats = {"bt_pairs": float(pairs.sum()), "bt_loss_before": float(before), "bt_accuracy_before": acc0}
    if int(pairs.sum()) == 0 or steps == 0:
        return {**stats, "bt_loss_after": float(before), "bt_accuracy_after": acc0}
    opt = torch.optim.Adam(critic.parameters(), lr=lr)
    critic.train()
    for _ in range(steps):  # optimizer steps, not a loop over tokens or rows
        opt.zero_grad(set_to_none=True)
        loss_acc()[0].backward()
        opt.step()
    critic.eval()
    with torch.no_grad():
        after, acc1 = loss_acc()
    return {**stats, "bt_loss_after": float(after), "bt_accuracy_after": acc1}


@dataclass
class SWEETRLConfig(CreditConfig):
    method: str = param("sweet_rl", help="credit-assignment method (registry name; SWEET-RL, Zhou et al. 2025)")
    critic_width: int = param(64, help="hidden width of the privileged critic MLP over the turn's hidden state and the privileged-information embedding (simplified from SWEET-RL's LLM critic)", ge=1)
    critic_buckets: int = param(1024, help="hashed (token, position) embedding buckets of the privileged-information encoder", ge=1)
    critic_lr: float = param(3e-3, help="Adam learning rate of the critic's Bradley–Terry fit (SWEET-RL §4.1)", gt=0)
    critic_steps: int = param(100, help="full-batch Adam steps of the critic's Bradley–Terry objective on each iteration's trajectory pairs (warm-started from the previous iteration's critic)", ge=0)
    critic_l2: float = param(1e-2, help="weight of the mean squared turn advantage added to the Bradley–Terry loss (the objective fixes only differences of trajectory sums; keeps the rest at 0, the scale bounded)", ge=0)
    pair_margin: float = param(0.0, help="a trajectory pair needs returns differing by more than this (SWEET-RL pairs rollouts of one task with different outcomes)", ge=0)
    max_privileged_tokens: int = param(256, help="privileged-information tokens the critic reads per trajectory (its JSON text, truncated)", ge=1)
    use_privileged: bool = param(True, help="the critic reads the privileged information (SWEET-RL); false = ablation: the same critic without it (the paper's 'no training-time information' baseline)")


@register_method
class SWEETRL(CreditMethod):
    """SWEET-RL: Step-WisE Evaluation from Training-time information (Zhou et al. 2025; survey §5.1,
    Appendix B row 20).

    Asymmetric actor–critic. The *critic* conditions on information available only at training
    time — ``c`` = the task's privileged information (``Trajectory.privileged``; bifurcation: the
    hidden rule's answers, math: the gold answer and reference steps, textgame: the gold path,
    gym/minigrid: the true state) — which the actor never sees (it is never in the prompt or the
    observations). It models the *advantage* of a turn directly, ``A_phi(o_k, a_k, c)``, and is
    trained with the paper's trajectory-level Bradley–Terry objective on pairs (w, l) of rollouts
    of the same task whose returns differ::

        L_critic = -log sigmoid( sum_k A_phi(o^w_k, a^w_k, c) - sum_k A_phi(o^l_k, a^l_k, c) )

    so the turns where the chosen and the rejected trajectories differ take the credit. The
    actor's turn advantage is ``A_phi`` of the turn, broadcast to the turn's tokens (turn
    granularity); the default update is ``update=turn_dpo``: per group and anchor state
    (``Turn.state_key``), the turn with the highest critic advantage is chosen, the lowest
    rejected, and the actor takes a DPO step on those turn pairs (the paper's actor loss).

    Per iteration: the credit stage warm-starts a copy of the critic kept from earlier iterations,
    fits it on this batch's pairs (``critic_steps`` full-batch Adam steps; the paper trains the
    critic on the collected trajectories before the actor) and scores the turns with it; the
    fitted weights are recorded (``CreditResult.helper_inputs``), the update stage adopts them
    (:meth:`update_helpers`) and every policy checkpoint saves them (``helper.sweet_critic``), so a
    resumed run continues with the same critic and a re-run update stage adopts exactly the
    weights that scored its batch. A fresh critic's output layer is 0 (no pairs at iteration 0
    before the fit).

    Limits: a group whose rollouts have equal returns gives no pair, and the critic is not moved
    by it; one turn per trajectory: ``A`` orders the group's turns as their returns (the fitted
    BT critic) and ``turn_dpo`` picks the same pairs as with GRPO credit.

    Simplified: the paper's critic is an LLM (the actor's base model) whose advantage is
    ``beta`` times the mean per-token log-ratio of the turn's action under the critic given the
    reference solution, vs the reference model; here it is a small MLP over the policy's detached
    turn-end hidden state and a hashed (token, position) embedding of the tokenized privileged
    JSON (a full LM critic per turn is not affordable on CPU), refitted each iteration on that
    iteration's pairs (warm start), not once on an offline data set. The actor's pairs are turns
    at the same anchor state from the group's own rollouts, not 16 fresh candidate actions
    resampled at every turn's prefix. Overhead: one forward pass over the batch for the hidden
    states (counted by the provider); the critic's fit is a few ms of MLP steps (in wall_seconds).
    """

    name = "sweet_rl"
    Config = SWEETRLConfig
    granularity = "turn"
    methodology = "Privileged Critic"
    needs = frozenset({"hidden_states", "tokenizer"})
    needs_group = True
    default_update = "turn_dpo"
    reference = "Zhou et al. 2025 (SWEET-RL: privileged critic, Bradley–Terry on trajectory pairs, DPO actor); survey §5.1"

    def __init__(self, cfg: CreditConfig):
        super().__init__(cfg)
        self.critic: Optional[PrivilegedCritic] = None

    def build_helpers(self, hidden_size: int, seed: int) -> None:
        cfg: SWEETRLConfig = self.cfg  # type: ignore[assignment]
        self.critic = PrivilegedCritic(hidden_size, cfg.critic_width, cfg.critic_buckets, seed).eval()

    def helper_modules(self) -> dict[str, nn.Module]:
        return {"sweet_critic": self.critic} if self.critic is not None else {}

    def checklist_note(self) -> str:
        return "critic reads the task's privileged training-time information (Trajectory.privileged); the actor never does"

    def update_helpers(self, credit: CreditResult, seed: int) -> dict[str, float]:
        state = credit.helper_inputs.get("critic_state")
        if self.critic is None or state is None:
            return {}
        self.critic.load_state_dict(state)
        return {"critic_adopted": 1.0}

    def critic_inputs(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> tuple[dict[str, Any], Segments]:
        """What the critic reads and is fitted on: turn features, privileged ids, returns, groups."""
        cfg: SWEETRLConfig = self.cfg  # type: ignore[assignment]
        hidden = ctx.hidden_states
        B, R = tensors.response_mask.shape
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or tuple(hidden.shape[:2]) != (B, R):
            got = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            raise ValueError(f"credit method 'sweet_rl': ctx.hidden_states must be a (B, R, H) tensor with (B, R) = {(B, R)}, got {got}")
        if len(batch.trajectories) != B:
            raise ValueError(f"credit method 'sweet_rl': the privileged information needs the batch's trajectories, "
                             f"got {len(batch.trajectories)} for {B} rows")
        seg = turn_segments(tensors)
        ids, mask = privileged_token_ids(batch, ctx.tokenizer, cfg.max_privileged_tokens)
        inputs = {"features": turn_features(hidden, seg), "present": seg.present,
                  "returns": tensors.token_level_rewards.float().sum(-1), "index": tensors.index,
                  "privileged_ids": ids, "privileged_mask": mask, "margin": float(cfg.pair_margin),
                  "use_privileged": bool(cfg.use_privileged), "l2": float(cfg.critic_l2)}
        return inputs, seg

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: SWEETRLConfig = self.cfg  # type: ignore[assignment]
        inputs, seg = self.critic_inputs(tensors, batch, ctx)
        if self.critic is None:
            self.build_helpers(int(inputs["features"].shape[-1]), 0)
        assert self.critic is not None
        critic = copy.deepcopy(self.critic)  # the kept critic moves only when the update stage adopts the fit
        stats = fit_critic(critic, inputs, cfg.critic_steps, cfg.critic_lr)
        p = seg.present
        with torch.no_grad():
            e = critic.encode(inputs["privileged_ids"], inputs["privileged_mask"]) if cfg.use_privileged else \
                torch.zeros((p.shape[0], cfg.critic_width))
            a = critic.eval()(inputs["features"], e) * p
        mask = policy_token_mask(tensors)
        adv = broadcast(a, seg, mask)
        n = p.sum().clamp(min=1)
        stats.update({"turn_adv_mean": float(a.sum() / n), "turn_adv_abs_mean": float(a.abs().sum() / n),
                      "privileged_tokens_mean": float(inputs["privileged_mask"].sum(-1).float().mean()),
                      "turns_per_trajectory": float(p.sum(-1).float().mean())})
        inputs["critic_state"] = {k: v.detach().clone() for k, v in critic.state_dict().items()}
        return CreditResult(advantages=adv, granularity="turn", credit=a, overhead=Overhead(), stats=stats,
                            helper_inputs=inputs)
