"""Learned agentic critics over turns (survey §5.4, §5.1): small networks on the policy's hidden
states, trained alongside the policy by temporal differences.

* :class:`ArCHer` (Zhou et al. 2024c, "ArCHer: Training Language Model Agents via Hierarchical
  Multi-Turn RL", ICML 2024; survey §5.4) — a turn-level Q and V critic trained **off-policy by
  TD** from a persisted replay buffer of past iterations' turns (:class:`ReplayBuffer`); the
  token-level actor is updated on-policy with the critic's turn advantage ``Q(s_k,a_k) - V(s_k)``.
* :class:`AgentPRM` (Xi et al. 2025, "AgentPRM: Process Reward Models for LLM Agents via Step-Wise
  Promise and Progress", arXiv 2511.08325; survey §5.1) — a step-level value model (promise
  ``Q(s_k, a_k)``, progress ``A(s_k, a_k)``) trained on-policy on **TD + GAE** labels from its own
  values instead of Monte Carlo step labels.

Shared pieces: :class:`TurnHead` (the MLP), :func:`turn_features` (the (B, K, H) action and state
features read from ``ctx.hidden_states``), :func:`soft_update`. Vectorized over rows, turns and
tokens; the only Python loops are optimizer steps.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from stages.benchmark.metrics import spearman
from stages.config_fields import param
from stages.credit.base import CreditConfig, CreditContext, CreditMethod, check_hidden
from stages.credit.group_stats import group_stats
from stages.credit.masked_stats import masked_whiten
from stages.credit.registry import register_method
from stages.credit.reverse_scan import reverse_discounted_scan
from stages.credit.segments import Segments, broadcast, policy_token_mask, segment_rewards, turn_segments, unit_ends
from stages.schema import Batch, BatchTensors, CreditResult

# --------------------------------------------------------------------------------------------
# shared pieces
# --------------------------------------------------------------------------------------------


class TurnHead(nn.Module):
    """``f(h) = W2 tanh(W1 h + b1) + b2``: a scalar from a turn feature ``h``. The output layer starts
    at zero, so a fresh head values every turn at 0."""

    def __init__(self, hidden_size: int, width: int, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.inp = nn.Linear(hidden_size, width)
        self.out = nn.Linear(width, 1)
        with torch.no_grad():
            bound = 1.0 / max(hidden_size, 1) ** 0.5
            self.inp.weight.copy_(torch.empty(width, hidden_size).uniform_(-bound, bound, generator=gen))
            self.inp.bias.zero_()
            self.out.weight.zero_()
            self.out.bias.zero_()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (...)."""
        return self.out(torch.tanh(self.inp(features.float()))).squeeze(-1)


def soft_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """Polyak averaging ``theta' <- (1 - tau) theta' + tau theta`` (ArCHer's target critic)."""
    with torch.no_grad():
        for pt, p in zip(target.parameters(), online.parameters()):
            pt.mul_(1.0 - tau).add_(p.detach(), alpha=tau)


def turn_features(hidden: torch.Tensor, seg: Segments) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The turn-level MDP's features from (B, R, H) hidden states (position j has read the response
    up to and including token j):

    * ``action`` (B, K, H): the hidden state at turn k's last policy token — it has read the state
      ``s_k`` and the whole action ``a_k``, nothing later (the feature of ``Q(s_k, a_k)``);
    * ``state`` (B, K, H): the hidden state at the position just before turn k's first policy token
      (the last observation token before the action) — it has read ``s_k`` and no token of ``a_k``
      (the feature of ``V(s_k)``); for turn 0 that position is the prompt's, not a response
      position, so ``state[:, 0]`` is 0 and ``has_state[:, 0]`` False;
    * ``has_state`` (B, K) bool.

    Absent turns are 0."""
    H = hidden.shape[-1]
    present = seg.present
    ends = unit_ends(seg).clamp(min=0)
    action = hidden.gather(1, ends.unsqueeze(-1).expand(-1, -1, H)) * present.unsqueeze(-1).float()
    before = seg.starts - 1
    has_state = present & (before >= 0)
    state = hidden.gather(1, before.clamp(min=0).unsqueeze(-1).expand(-1, -1, H)) * has_state.unsqueeze(-1).float()
    return action, state, has_state


# --------------------------------------------------------------------------------------------
# ArCHer
# --------------------------------------------------------------------------------------------


class ArcherCritic(nn.Module):
    """ArCHer's turn-level critic: ``Q(s_k, a_k)`` on the action feature, ``V(s_k)`` on the state
    feature, and their target copies (soft-updated, read by the TD targets)."""

    def __init__(self, hidden_size: int, width: int, seed: int):
        super().__init__()
        self.q = TurnHead(hidden_size, width, seed)
        self.v = TurnHead(hidden_size, width, seed + 1)
        self.q_target = copy.deepcopy(self.q)
        self.v_target = copy.deepcopy(self.v)


class ReplayBuffer(nn.Module):
    """A fixed-capacity FIFO of turn transitions ``(x_q, r, x_s', done)`` kept in registered
    buffers, so its whole state is a ``state_dict`` (saved in every policy checkpoint as
    ``helper.archer_buffer.safetensors``, loaded on resume).

    ``entry`` (C, 3) long: (iteration, row, turn) of each slot's transition (-1 = empty slot);
    ``size`` and ``ptr`` (the next slot to write); ``held_iteration`` the last iteration added
    (-1: empty). Slots are overwritten oldest first once ``size == capacity``."""

    def __init__(self, hidden_size: int, capacity: int):
        super().__init__()
        self.register_buffer("x_q", torch.zeros(capacity, hidden_size))
        self.register_buffer("x_next", torch.zeros(capacity, hidden_size))
        self.register_buffer("reward", torch.zeros(capacity))
        self.register_buffer("done", torch.zeros(capacity))
        self.register_buffer("entry", torch.full((capacity, 3), -1, dtype=torch.long))
        self.register_buffer("size", torch.zeros((), dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("held_iteration", torch.full((), -1, dtype=torch.long))

    @property
    def capacity(self) -> int:
        return int(self.reward.shape[0])

    def contents(self) -> dict[str, torch.Tensor]:
        """The stored transitions, oldest first."""
        n, C = int(self.size), self.capacity
        start = int(self.ptr) - n
        idx = (torch.arange(n) + start) % C
        return {"x_q": self.x_q[idx], "x_next": self.x_next[idx], "reward": self.reward[idx],
                "done": self.done[idx], "entry": self.entry[idx]}

    def add(self, tr: dict[str, torch.Tensor], iteration: int) -> None:
        """Append transitions (a dict of the :meth:`contents` keys, N rows); the newest ``capacity``
        are kept."""
        n, C = int(tr["reward"].shape[0]), self.capacity
        if n > C:
            tr = {k: v[n - C:] for k, v in tr.items()}
            n = C
        with torch.no_grad():
            idx = (torch.arange(n) + int(self.ptr)) % C
            for k in ("x_q", "x_next", "reward", "done", "entry"):
                getattr(self, k)[idx] = tr[k].to(getattr(self, k).dtype)
            self.ptr.fill_((int(self.ptr) + n) % C)
            self.size.fill_(min(int(self.size) + n, C))
            self.held_iteration.fill_(int(iteration))


def archer_transitions(action: torch.Tensor, state: torch.Tensor, has_state: torch.Tensor, reward: torch.Tensor,
                       present: torch.Tensor, iteration: int) -> dict[str, torch.Tensor]:
    """The (N,) turn transitions of a batch (present turns, row-major): ``x_q`` the action feature,
    ``reward`` the turn's reward, ``x_next`` the next turn's state feature (0 after the last turn),
    ``done`` 1 on a row's last turn, ``entry`` (iteration, row, turn)."""
    B, K, H = action.shape
    nxt = torch.cat([state[:, 1:], torch.zeros(B, 1, H)], 1)
    has_next = torch.cat([has_state[:, 1:], torch.zeros(B, 1, dtype=torch.bool)], 1)
    done = (~has_next).float()
    rows = torch.arange(B).unsqueeze(1).expand(B, K)
    turns = torch.arange(K).unsqueeze(0).expand(B, K)
    entry = torch.stack([torch.full((B, K), int(iteration)), rows, turns], -1)
    sel = present.bool()
    return {"x_q": action[sel], "x_next": nxt[sel], "reward": reward.float()[sel], "done": done[sel],
            "entry": entry[sel]}


def archer_losses(critic: ArcherCritic, replay: dict[str, torch.Tensor], v_states: torch.Tensor,
                  v_actions: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ArCHer's two regressions (its ``critic_loss``):

    * Q on every replayed transition toward the TD target ``r + gamma (1 - done) V'(s')`` (target V);
    * V on the current batch's states toward ``Q'(s, a)`` (target Q) of the action the *current*
      policy took there — ArCHer's ``V(s) <- Q'(s, a ~ pi(s))`` with the batch's own samples of pi.

    Returns (q_loss, v_loss), means of squared errors."""
    with torch.no_grad():
        y_q = replay["reward"] + gamma * (1.0 - replay["done"]) * critic.v_target(replay["x_next"])
        y_v = critic.q_target(v_actions)
    q_loss = ((critic.q(replay["x_q"]) - y_q) ** 2).mean()
    v_loss = ((critic.v(v_states) - y_v) ** 2).mean() if v_states.shape[0] else q_loss.new_zeros(())
    return q_loss, v_loss


def fit_archer(critic: ArcherCritic, replay: dict[str, torch.Tensor], v_states: torch.Tensor, v_actions: torch.Tensor,
               gamma: float, tau: float, steps: int, lr: float) -> dict[str, float]:
    """``steps`` full-batch Adam steps on :func:`archer_losses` (Q and V together), each followed by a
    soft update of both targets with ``tau`` (ArCHer: one target update per critic step). Returns
    the losses before and after."""
    if replay["reward"].numel() == 0:
        return {}
    with torch.no_grad():
        q0, v0 = archer_losses(critic, replay, v_states, v_actions, gamma)
    opt = torch.optim.Adam(list(critic.q.parameters()) + list(critic.v.parameters()), lr=lr)
    for _ in range(steps):  # optimizer steps, not a loop over tokens or rows
        opt.zero_grad(set_to_none=True)
        q_loss, v_loss = archer_losses(critic, replay, v_states, v_actions, gamma)
        (q_loss + v_loss).backward()
        opt.step()
        soft_update(critic.q_target, critic.q, tau)
        soft_update(critic.v_target, critic.v, tau)
    with torch.no_grad():
        q1, v1 = archer_losses(critic, replay, v_states, v_actions, gamma)
    return {"critic_q_loss_before": float(q0), "critic_v_loss_before": float(v0),
            "critic_q_loss_after": float(q1), "critic_v_loss_after": float(v1)}


@dataclass
class ArCHerConfig(CreditConfig):
    method: str = param("archer", help="credit-assignment method (registry name; ArCHer, Zhou et al. 2024c)")
    critic_width: int = param(64, help="hidden width of ArCHer's turn-level Q and V MLPs on the policy's hidden states (the paper: a RoBERTa critic with MLP heads)", ge=1)
    critic_lr: float = param(1e-3, help="Adam learning rate of the turn-level critic (ArCHer's critic_lr default 1e-3)", gt=0)
    critic_steps: int = param(50, help="full-batch critic steps per iteration on the replay buffer plus this batch, each followed by a soft target update (ArCHer: critic epochs per iteration)", ge=1)
    gamma: float = param(0.95, help="discount per turn of the TD target r + gamma * V'(s') (ArCHer uses 0.9-0.95)", ge=0, le=1)
    tau: float = param(0.1, help="soft (Polyak) update rate of the target critic after each critic step (ArCHer's tau default 0.1)", gt=0, le=1)
    buffer_capacity: int = param(2048, help="turn transitions kept in the off-policy replay buffer (oldest dropped first; persisted with every checkpoint)", ge=1)
    whiten: bool = param(False, help="whiten the turn advantages over the batch's policy tokens; false (ArCHer): the raw Q - V")


@register_method
class ArCHer(CreditMethod):
    """ArCHer (Zhou et al. 2024c, ICML 2024, arXiv 2402.19446; survey §5.4, Appendix B row 16).

    Two levels. The **high level** is the turn-level MDP (state ``s_k`` = everything before turn k's
    response, action ``a_k`` = the whole response of turn k, reward ``r_k`` the turn's reward, the
    outcome on the last turn) with an off-policy critic: ``Q(s_k, a_k)`` and ``V(s_k)``
    (:class:`ArcherCritic`, MLPs on the policy's hidden states, :func:`turn_features`) trained by TD
    from a **replay buffer** of past iterations' turns (:class:`ReplayBuffer`, FIFO of
    ``buffer_capacity`` transitions)::

        Q(s_k, a_k) <- r_k + gamma (1 - done_k) V'(s_{k+1})     on every replayed transition
        V(s_k)      <- Q'(s_k, a_k ~ pi)                          on the current batch's states

    (``'`` = target networks, soft-updated with ``tau`` after every step; ArCHer's ``critic_loss``).
    Because Q bootstraps from V of the *current* policy, stale transitions in the buffer still
    teach ``Q^pi`` of the current policy (a Monte Carlo regression on the buffer's returns would
    learn the mixture of the old policies instead). The **low level** is the token-level actor,
    updated on-policy: every token of turn k gets the turn advantage ``A_k = Q(s_k,a_k) - V(s_k)``
    (turn granularity; the run's loss, e.g. the default clipped surrogate or ``turn_ppo``).

    Order within an iteration, as in ArCHer's ``update``: the credit stage adds the batch to (a copy
    of) the buffer, fits (a copy of) the critic on it for ``critic_steps`` steps, and scores the
    batch with the fitted critic; it records the fitted critic's weights and the batch's
    transitions (``CreditResult.helper_inputs``), and the update stage installs them
    (:meth:`update_helpers`), so the critic and the buffer are saved in the iteration's checkpoint
    (``helper.archer_critic.safetensors``, ``helper.archer_buffer.safetensors``, written atomically
    with it). A resumed run continues with the buffer as it was after the last finished iteration:
    a re-run credit stage starts again from the checkpoint's buffer, so no transition is added twice
    or lost.

    ``V(s_0)``: the state before the first turn ends in the prompt, which the hidden states do not
    cover, so ``V(s_0)`` is the mean of ``Q(s_0, a_0)`` over the group's rollouts (all from the same
    initial state: ArCHer's ``V(s) = Q(s, a ~ pi(s))`` with the group's actions as the samples;
    hence ``needs_group``). One turn per row and a fitted critic: ``A_0 = R - mean_group(R)``, GRPO
    without the std division.

    Simplified: the critic is two MLPs on the policy's detached last-layer hidden states at the
    turn boundaries (the paper: a RoBERTa-base encoder fine-tuned with the heads); the buffer stores
    those features as they were when the turn was collected (the paper re-encodes the text with the
    current critic); one Q and one V (the paper: double Q and V, min of the two); V is regressed on
    the current batch's states only (the paper samples a fresh action of the current policy at every
    replayed state); full-batch Adam (fresh each iteration) instead of sampled minibatches; the
    actor is the run's policy-gradient loss on the turn advantage (the paper: REINFORCE on
    ``Q - V``). Overhead: the hidden-states forward over the batch (the provider counts it).
    """

    name = "archer"
    Config = ArCHerConfig
    granularity = "turn"
    methodology = "TD (hierarchical)"
    needs = frozenset({"hidden_states"})
    needs_group = True
    reference = "Zhou et al. 2024c (ArCHer: off-policy turn-level TD critic + on-policy token actor); survey §5.4"

    def __init__(self, cfg: CreditConfig):
        super().__init__(cfg)
        self.critic: Optional[ArcherCritic] = None
        self.buffer: Optional[ReplayBuffer] = None

    def build_helpers(self, hidden_size: int, seed: int) -> None:
        cfg: ArCHerConfig = self.cfg  # type: ignore[assignment]
        self.critic = ArcherCritic(hidden_size, cfg.critic_width, seed)
        self.buffer = ReplayBuffer(hidden_size, cfg.buffer_capacity)

    def helper_modules(self) -> dict[str, nn.Module]:
        if self.critic is None or self.buffer is None:
            return {}
        return {"archer_critic": self.critic, "archer_buffer": self.buffer}

    def update_helpers(self, credit: CreditResult, seed: int) -> dict[str, float]:
        x = credit.helper_inputs
        if self.critic is None or self.buffer is None or "critic_state" not in x:
            return {}
        self.critic.load_state_dict(x["critic_state"])
        self.buffer.add(x["transitions"], int(x["iteration"]))
        return {"archer_buffer_size": float(int(self.buffer.size)),
                "archer_buffer_held_iteration": float(int(self.buffer.held_iteration))}

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: ArCHerConfig = self.cfg  # type: ignore[assignment]
        hidden = check_hidden(self.name, ctx.hidden_states, tensors)
        if self.critic is None or self.buffer is None:
            self.build_helpers(int(hidden.shape[-1]), 0)
        assert self.critic is not None and self.buffer is not None
        mask = policy_token_mask(tensors)
        seg = turn_segments(tensors)
        p = seg.present
        action, state, has_state = turn_features(hidden, seg)
        r_k = segment_rewards(tensors, seg).float() * p
        iteration = int(getattr(batch, "iteration", 0))
        new = archer_transitions(action, state, has_state, r_k, p, iteration)
        old = self.buffer.contents()
        replay = {k: torch.cat([old[k].to(new[k].dtype), new[k]]) for k in new}
        # the fitted critic is a copy: the live one (and the buffer) change only in the update stage
        critic = copy.deepcopy(self.critic)
        # full-batch Adam on fixed tensors: deterministic, no draw from any generator
        fit = fit_archer(critic, replay, state[has_state], action[has_state], cfg.gamma, cfg.tau, cfg.critic_steps,
                         cfg.critic_lr)
        with torch.no_grad():
            q = critic.q(action) * p
            v = critic.v(state) * has_state
        # V(s_0): the group's mean of Q(s_0, a_0) (its rollouts share the initial state)
        n, mean0, _, _ = group_stats(q[:, 0], tensors.index, with_std=False)
        v0 = torch.where(n > 1, mean0, q[:, 0])
        v = torch.cat([v0.unsqueeze(1), v[:, 1:]], 1) * p
        adv_k = (q - v) * p
        adv = broadcast(adv_k, seg, mask)
        if cfg.whiten and int(mask.sum()) >= 2:
            adv = masked_whiten(adv, mask) * mask
        m = max(int(p.sum()), 1)
        n_old = int(old["reward"].shape[0])
        stats = {"q_mean": float(q.sum() / m), "v_mean": float(v.sum() / m), "turn_adv_abs_mean": float(adv_k.abs().sum() / m),
                 "turns_per_trajectory": float(p.sum(-1).float().mean()), "replay_transitions": float(n_old + int(p.sum())),
                 "replay_off_policy_fraction": n_old / max(n_old + int(p.sum()), 1), **fit}
        helper_inputs = {"critic_state": {k: v_.detach().clone() for k, v_ in critic.state_dict().items()},
                         "transitions": new, "iteration": iteration}
        return CreditResult(advantages=adv, granularity="turn", credit=adv_k, stats=stats, helper_inputs=helper_inputs)


# --------------------------------------------------------------------------------------------
# AgentPRM
# --------------------------------------------------------------------------------------------


def sarsa_gae_labels(q: torch.Tensor, r: torch.Tensor, present: torch.Tensor, gamma: float,
                     lam: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AgentPRM's TD + GAE step labels from the model's own step values ``q`` (B, K) (no grad):

        delta_k = r_k + gamma * q_{k+1} - q_k        (q_{K} = 0 after the last turn)
        A_k     = sum_l (gamma lam)^l delta_{k+l}    (GAE over the turns)
        Q_k     = A_k + q_k                          (the promise label)

    ``lam = 1``: the Monte Carlo return (no bootstrap); ``lam = 0``: the one-step TD target
    ``r_k + gamma q_{k+1}``. Returns (delta, A, Q), 0 on absent turns."""
    p = present.to(q.dtype)
    q = q * p
    nxt = torch.cat([q[:, 1:], torch.zeros_like(q[:, :1])], 1)
    delta = (r + gamma * nxt - q) * p
    adv = reverse_discounted_scan(delta, gamma * lam) * p
    return delta, adv, (adv + q) * p


def step_progress(m: torch.Tensor, r: torch.Tensor, present: torch.Tensor, index: torch.Tensor,
                  gamma: float) -> torch.Tensor:
    """(B, K) progress of each step from step values ``m`` (promises ``Q(s_k, a_k)``): the advantage
    ``m_k - V(s_k)`` with ``V(s_k) = (m_{k-1} - r_{k-1}) / gamma`` — the previous promise with the
    previous reward taken out (exact for a deterministic transition) — and ``V(s_0)`` the mean of
    the group's ``m_0`` (the rollouts of a task share its initial state; a singleton keeps 0 progress)."""
    p = present.to(m.dtype)
    prev = (m[:, :-1] - r[:, :-1]) / gamma
    n, mean0, _, _ = group_stats(m[:, 0], index, with_std=False)
    v0 = torch.where(n > 1, mean0, m[:, 0])
    v = torch.cat([v0.unsqueeze(1), prev], 1)
    return (m - v) * p


def agentprm_loss(model: TurnHead, features: torch.Tensor, present: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The promise regression ``L_Q``: mean over present steps of ``(M(s_k, a_k) - Q_k)^2``."""
    p = present.to(torch.float32)
    m = model(features) * p
    return (((m - labels) ** 2) * p).sum() / p.sum().clamp(min=1)


def fit_agentprm(model: TurnHead, x: dict[str, torch.Tensor], steps: int, lr: float) -> dict[str, float]:
    """``steps`` full-batch Adam steps on ``L_Q`` toward the fixed TD + GAE labels of ``x``."""
    present = x["present"].bool()
    if not bool(present.any()):
        return {}
    args = (x["features"].float(), present, x["labels"].float())
    with torch.no_grad():
        before = float(agentprm_loss(model, *args))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):  # optimizer steps, not a loop over tokens or rows
        opt.zero_grad(set_to_none=True)
        agentprm_loss(model, *args).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        after = float(agentprm_loss(model, *args))
    return {"prm_loss_before": before, "prm_loss_after": after}


def ground_truth_q(batch: Batch, present: torch.Tensor) -> Optional[torch.Tensor]:
    """(B, K) exact ``Q(s_k, a_k)`` of each turn (``Trajectory.ground_truth.q_value``, under the task's
    reference policy), nan where absent; None when no trajectory has ground truth or the batch does
    not match the rows. Reads the per-turn lists (O(B*K) Python, like ``BatchTensors.from_batch``)."""
    B, K = present.shape
    trajs = batch.trajectories
    if len(trajs) != B or not any(t.ground_truth is not None for t in trajs):
        return None
    out = torch.full((B, K), float("nan"))
    for i, t in enumerate(trajs):
        if t.ground_truth is not None and t.ground_truth.q_value:
            qv = torch.as_tensor(t.ground_truth.q_value[:K], dtype=torch.float32)
            out[i, : qv.numel()] = qv
    return torch.where(present, out, torch.full_like(out, float("nan")))


@dataclass
class AgentPRMConfig(CreditConfig):
    method: str = param("agentprm", help="credit-assignment method (registry name; AgentPRM, Xi et al. 2025)")
    prm_width: int = param(64, help="hidden width of the AgentPRM step-value MLP on the policy's turn-end hidden states (the paper: an LLM-sized PRM)", ge=1)
    prm_lr: float = param(1e-3, help="Adam learning rate of the AgentPRM model (fit each update stage on that iteration's TD+GAE labels)", gt=0)
    prm_steps: int = param(50, help="full-batch Adam steps of the AgentPRM model per iteration on the promise regression L_Q toward the TD+GAE labels", ge=1)
    gamma: float = param(1.0, help="discount per step of AgentPRM's TD errors delta_k = r_k + gamma M_{k+1} - M_k (> 0: the progress divides by it)", gt=0, le=1)
    lam: float = param(0.95, help="GAE lambda of AgentPRM's step labels (1 = Monte Carlo returns, 0 = one-step TD)", ge=0, le=1)
    whiten: bool = param(False, help="whiten the step advantages (the PRM's progress) over the batch's policy tokens")


@register_method
class AgentPRM(CreditMethod):
    """AgentPRM (Xi et al. 2025, "AgentPRM: Process Reward Models for LLM Agents via Step-Wise Promise
    and Progress", arXiv 2511.08325; survey §5.1, Appendix B row 21).

    A step-level process reward model ``M(s_k, a_k)`` (:class:`TurnHead` on the policy's hidden state
    at turn k's last policy token; a step = a turn) that scores each decision by its **promise** —
    ``Q^pi(s_k, a_k)``, the expected outcome from there — and its **progress** — the advantage
    ``A^pi(s_k, a_k) = Q(s_k, a_k) - V(s_k)`` (:func:`step_progress`). Its labels are not Monte Carlo
    step labels (continuations from every step: environment re-execution) but **TD + GAE** estimates
    from the model itself on the episodes already played (:func:`sarsa_gae_labels`)::

        delta_k = r_k + gamma M(s_{k+1}, a_{k+1}) - M(s_k, a_k),   A_k = GAE_lambda(delta)_k,   Q_k = A_k + M(s_k, a_k)

    and the model is trained on the promise regression ``L_Q`` toward ``Q_k`` (:func:`agentprm_loss`).

    Trained alongside the policy: the credit stage labels the batch with the model as it is
    (trained on the earlier iterations) and records features and labels
    (``CreditResult.helper_inputs``); the update stage fits the model on them
    (:meth:`update_helpers`); its weights are saved in every checkpoint
    (``helper.agentprm.safetensors``). The actor's turn advantage is the model's progress of the turn
    (the PRM's step reward in RL), broadcast to the turn's tokens. Where the family exposes exact
    per-turn values (bifurcation, frozenlake: ``Trajectory.ground_truth.q_value``), the Spearman
    agreement of the labels and of the model's promises with them is logged
    (``credit.method.agentprm_gt_spearman``, ``credit.method.agentprm_model_gt_spearman``).

    ``V(s_0)`` is the group's mean promise at the first step (the hidden states do not reach into the
    prompt; hence ``needs_group``). One turn per row with a fitted model: progress ``R - mean_group(R)``,
    GRPO without the std division.

    Simplified: the PRM is an MLP on the live policy's detached hidden states (the paper: a separate
    LLM PRM trained offline on the labelled rollouts of a fixed policy, then used for best-of-N /
    beam search and as PPO's process reward); it is refitted every iteration on that iteration's
    batch (fresh Adam, ``prm_steps`` steps); ``V(s_k)`` for the progress is the previous step's
    promise less its reward over gamma (exact for deterministic transitions); the paper's second
    loss term ``beta L_A`` (a regression of the progress) is left out: with one sampled action per
    step, a progress label made of consecutive promise labels contains the sampled action's own
    bootstrap value and is biased toward 0 (a test with a stochastic policy showed it pulling the
    promises off the exact Q), so the progress is read from the fitted promises instead; the actor
    takes the progress directly as its turn advantage instead of PPO with a separate critic.
    Overhead: the hidden-states forward over the batch (the provider counts it).
    """

    name = "agentprm"
    Config = AgentPRMConfig
    granularity = "turn"
    methodology = "TD+GAE"
    needs = frozenset({"hidden_states"})
    needs_group = True
    reference = "Xi et al. 2025 (AgentPRM: step-wise promise and progress, TD+GAE labels); survey §5.1"

    def __init__(self, cfg: CreditConfig):
        super().__init__(cfg)
        self.model: Optional[TurnHead] = None

    def build_helpers(self, hidden_size: int, seed: int) -> None:
        cfg: AgentPRMConfig = self.cfg  # type: ignore[assignment]
        self.model = TurnHead(hidden_size, cfg.prm_width, seed).eval()

    def helper_modules(self) -> dict[str, nn.Module]:
        return {"agentprm": self.model} if self.model is not None else {}

    def update_helpers(self, credit: CreditResult, seed: int) -> dict[str, float]:
        cfg: AgentPRMConfig = self.cfg  # type: ignore[assignment]
        x = credit.helper_inputs
        if self.model is None or "labels" not in x:
            return {}
        torch.manual_seed(seed)
        return fit_agentprm(self.model, x, cfg.prm_steps, cfg.prm_lr)

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: AgentPRMConfig = self.cfg  # type: ignore[assignment]
        hidden = check_hidden(self.name, ctx.hidden_states, tensors)
        if self.model is None:
            self.build_helpers(int(hidden.shape[-1]), 0)
        assert self.model is not None
        mask = policy_token_mask(tensors)
        seg = turn_segments(tensors)
        p = seg.present
        feats, _, _ = turn_features(hidden, seg)
        r_k = segment_rewards(tensors, seg).float() * p
        with torch.no_grad():
            m = self.model.eval()(feats) * p
        delta, _, labels = sarsa_gae_labels(m, r_k, p, cfg.gamma, cfg.lam)
        prog = step_progress(m, r_k, p, tensors.index, cfg.gamma)
        adv = broadcast(prog, seg, mask)
        if cfg.whiten and int(mask.sum()) >= 2:
            adv = masked_whiten(adv, mask) * mask
        n = max(int(p.sum()), 1)
        stats = {"promise_mean": float(m.sum() / n), "label_mean": float(labels.sum() / n),
                 "td_abs_mean": float(delta.abs().sum() / n), "progress_abs_mean": float(prog.abs().sum() / n),
                 "turns_per_trajectory": float(p.sum(-1).float().mean())}
        gt = ground_truth_q(batch, p)
        if gt is not None:
            ok = ~torch.isnan(gt)
            # nan where either side is constant (a fresh model's promises; a batch without reward), as gt_rank_corr
            stats["agentprm_gt_spearman"] = spearman(labels[ok], gt[ok])
            stats["agentprm_model_gt_spearman"] = spearman(m[ok], gt[ok])
        helper_inputs = {"features": feats, "present": p, "labels": labels}
        return CreditResult(advantages=adv, granularity="turn", credit=prog, stats=stats, helper_inputs=helper_inputs)
