"""Agentic group methods: GiGPO's step groups over anchor states, CARL's critical actions and
StarPO-S's uncertainty filtering of groups (survey §5.3, §5.4, §5.7; Appendix B rows 19, 28
and 38). None needs a critic, an extra forward pass or an extra rollout: they read what the
rollout already recorded (the state each action was taken in, the sampling distribution's
entropy, the group's rewards).

GiGPO (Feng et al. 2025, "Group-in-Group Policy Optimization for LLM Agent Training",
arXiv 2505.10978, §3; verl-agent's ``gigpo`` estimator)
----------------------------------------------------------------------------------------------

Two levels of group-relative advantage, ``A = A_E + omega · A_S`` (paper Eq. 8):

* **Episode level** ``A_E`` (Eq. 3): GRPO's group-normalized outcome advantage of each
  trajectory among the rollouts of its task instance (``mode=mean_std_norm``:
  ``(R_i - mean) / (std + eps)``; ``mode=mean_norm``: ``R_i - mean``), broadcast to all its
  action tokens. It is :func:`stages.credit.functional._grpo_scalars`, GRPO's own code.
* **Step level** ``A_S`` (Eqs. 5-7): inside one episode group, the steps whose *anchor state*
  (``Turn.state_key``: the environment state before the action) is identical form a step group
  (Eq. 6) — across the group's trajectories and within one trajectory when it revisits a
  state. Each step's discounted return ``G_t = r_t + gamma · G_{t+1}`` over the trajectory's
  later turn rewards (Eq. 5; the terminal reward counts as the last turn's reward) is
  normalized within its step group, with the same ``mode`` (Eq. 7). A singleton step group
  gives 0 (as verl-agent: its mean is its own return). Each step's ``A_S`` is broadcast to the
  tokens of its action.

Edge cases. Turns without a state key (``""``: a family that does not expose its state) are
never grouped: their ``A_S`` is 0. Turns with no policy tokens (an empty action) are not steps.
When every anchor is distinct, ``A_S = 0`` everywhere and GiGPO is GRPO exactly.

Similarity anchors. verl-agent's ``enable_similarity`` variant groups anchors whose text is
similar rather than identical: an anchor joins the first existing cluster (in order of
appearance, within its episode group) whose representative's ``difflib.SequenceMatcher`` ratio
is at least the threshold, else starts a new cluster. ``similarity_thresh < 1`` selects it here,
applied to the state keys (the family's text of the state); ``1.0`` (default) is exact match.
The clustering compares strings once per distinct key (data preparation, O(keys x clusters) per
group); the advantage arithmetic is segment reductions over integer ids (``index_add_``).

Departures from verl-agent, on purpose: the episode level normalizes over the group's
*trajectories* (the paper's Eq. 3; verl-agent's default computes it over step rows), and the
discounted return runs over the turns of our multi-turn rows instead of verl-agent's one row per
step.

CARL (Shen et al. 2025, "CARL: Focusing Agentic Reinforcement Learning on Critical Actions",
arXiv 2512.04949, §3)
----------------------------------------------------------------------------------------------

Only a small fraction of actions decide the outcome, and the policy's uncertainty at the state
marks them. CARL's criticality of an action is the entropy of the policy at the state it was
taken in, length-normalized over the action's tokens, ``H(s) = E_Y[-(1/T) sum_t log pi(y_t|...)]``.
It is estimated here from what the rollout recorded, per *action* (one turn's policy tokens):

* ``entropy=token_entropy`` (default): the mean over the action's tokens of the exact entropy of
  the sampling distribution at each token (``Trajectory.entropies``) — the per-token expectation
  along the sampled action (lower variance than one sample of ``-log pi``);
* ``entropy=neg_logprob``: the paper's Monte Carlo estimate with N = 1, the sampled action's
  length-normalized ``-log pi`` (behaviour log-probs).

The ``ceil(rho · N)`` actions of highest criticality among the batch's N actions keep their base
advantage (GRPO's group-normalized outcome advantage, on all their tokens); every other action's
tokens get advantage 0, so they contribute no policy gradient. Ties are broken by batch order
(row, then turn: the earlier action is kept; a stable sort). ``rho = 1`` is GRPO exactly. The
skipped share ``1 - ceil(rho N) / N`` is logged (``credit.method.skipped_action_fraction``; the
paper reports ~72% fewer updates).

Departures from the paper, on purpose: CARL's entropy-guided progressive rollout (new rollouts
branched from the critical states, giving those actions their own group-relative, action-level
advantages) is not run — the kept actions carry their episode's GRPO advantage, so the method
costs no extra rollout; and the skipped tokens stay in the update's batch with advantage 0 (no
policy gradient, but the loss normalizer and any KL term still see them) rather than being left
out of the forward pass.

StarPO-S (Wang et al. 2025d, "RAGEN: Understanding Self-Evolution in LLM Agents via Multi-Turn
Reinforcement Learning", arXiv 2504.20073, §4: uncertainty-based trajectory filtering)
----------------------------------------------------------------------------------------------

Groups whose rollouts all score alike carry little signal and feed the "Echo Trap" collapse.
StarPO-S keeps the ``ceil(keep_fraction · G)`` groups (task instances) of highest reward
standard deviation among the batch's G groups and drops the rest: here a dropped group's
trajectories get advantage 0 (they stay in the batch; no gradient from them). The kept groups
get GRPO's advantage unchanged; ``keep_fraction = 1`` is GRPO exactly. Ties keep the earlier
group (ascending group id). Logged: the kept group share and the collapse diagnostics the paper
tracks per batch — mean in-group reward std and mean policy entropy over the policy tokens.
Departures: the base estimator is GRPO (the paper also runs PPO with a critic), and StarPO-S's
other two changes (no KL term, asymmetric "clip-higher" clipping) are update settings, not part
of this credit method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from difflib import SequenceMatcher

import torch

from stages.credit import functional as F
from stages.credit.base import CreditConfig, CreditContext, CreditMethod
from stages.credit.group_stats import group_ids, group_stats
from stages.credit.registry import register_method
from stages.credit.reverse_scan import reverse_discounted_scan
from stages.credit.segments import steps_to_tokens
from stages.config_fields import param
from stages.schema import Batch, BatchTensors, CreditResult, turn_credit, turn_key_ids

#: criticality estimates of CARL
CARL_ENTROPY = ("token_entropy", "neg_logprob")
#: normalization modes of GiGPO (verl-agent ``algorithm.gigpo.mode``)
GIGPO_MODES = ("mean_std_norm", "mean_norm")


def _inputs(tensors: BatchTensors) -> tuple[torch.Tensor, torch.Tensor]:
    rewards = tensors.token_level_rewards
    rewards = rewards if rewards.is_floating_point() else rewards.float()
    return rewards, (tensors.response_mask != 0).to(rewards.dtype)


def turn_rewards(rewards: torch.Tensor, turn_ids: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """((B, K) reward collected on each turn's policy tokens, (B, K) bool: the turn has policy tokens)."""
    valid = turn_ids >= 0
    idx = turn_ids.clamp(min=0, max=K - 1)
    r = torch.zeros((rewards.shape[0], K), dtype=rewards.dtype, device=rewards.device)
    r.scatter_add_(1, idx, rewards * valid.to(rewards.dtype))
    n = torch.zeros_like(r).scatter_add_(1, idx, valid.to(rewards.dtype))
    return r, n > 0


def similarity_clusters(keys: list[str], groups: list[int], thresh: float) -> list[int]:
    """Cluster id per key: within each episode group, a key joins the first cluster whose
    representative is at least ``thresh`` similar (``difflib`` ratio), else founds a new one
    (verl-agent's similarity-based step groups, Feng et al. 2025). Keys are clustered once per
    distinct (group, key) pair."""
    reps: dict[int, list[tuple[str, int]]] = {}
    memo: dict[tuple[int, str], int] = {}
    out: list[int] = []
    n = 0
    for k, g in zip(keys, groups):
        if (g, k) not in memo:
            cid = next((c for rep, c in reps.get(g, []) if SequenceMatcher(None, k, rep).ratio() >= thresh), None)
            if cid is None:
                cid, n = n, n + 1
                reps.setdefault(g, []).append((k, cid))
            memo[(g, k)] = cid
        out.append(memo[(g, k)])
    return out


def anchor_ids(batch: Batch, K: int, similarity_thresh: float = 1.0) -> torch.Tensor:
    """(B, K) long anchor-state id of each turn (-1: no turn, or an empty state key); with
    ``similarity_thresh < 1`` similar keys of one episode group share an id (:func:`similarity_clusters`)."""
    no_key = lambda turn: turn.state_key == ""  # noqa: E731
    sid = turn_key_ids(batch, K, absent=no_key)
    if similarity_thresh < 1.0:
        keyed = [(turn.state_key, int(traj.group_id)) for traj in batch.trajectories
                 for turn in traj.turns[:K] if not no_key(turn)]  # row-major, as sid[sid >= 0]
        if keyed:
            keys, grp = zip(*keyed)
            sid = sid.clone()
            sid[sid >= 0] = torch.tensor(similarity_clusters(list(keys), list(grp), similarity_thresh), dtype=torch.long)
    return sid


# --------------------------------------------------------------------------------------------
# GiGPO
# --------------------------------------------------------------------------------------------


@dataclass
class GiGPOConfig(CreditConfig):
    method: str = param("gigpo", help="credit-assignment method (registry name; GiGPO, Feng et al. 2025)")
    step_advantage_w: float = param(1.0, help="omega: weight of the step-level advantage, A = A_E + omega*A_S (Feng et al. 2025 Eq. 8; 0 = GRPO)", ge=0, finite=True)
    gamma: float = param(0.95, help="discount of the step return G_t = r_t + gamma*G_{t+1} over later turns (Feng et al. 2025 Eq. 5; verl-agent's 0.95)", ge=0, le=1)
    mode: str = param("mean_std_norm", help="group normalization of both levels: mean_std_norm (R-mean)/(std+eps), mean_norm R-mean (Feng et al. 2025 Eqs. 3, 7)", choices=GIGPO_MODES)
    epsilon: float = param(1e-6, help="added to the group std before dividing (Feng et al. 2025; verl's epsilon)", ge=0)
    similarity_thresh: float = param(1.0, help="anchor states match when their difflib ratio >= this (verl-agent's similarity-based GiGPO); 1.0 = identical states (Feng et al. 2025 Eq. 6)", gt=0, le=1)


@register_method
class GiGPO(CreditMethod):
    """GiGPO: GRPO's episode advantage plus omega times the step advantage of each action among
    the group's steps from the same anchor state (module docstring; Feng et al. 2025 §3; survey §5.3)."""

    name = "gigpo"
    needs_group = True  # both levels are group baselines: rollout.group_size=1 gives zero advantages
    Config = GiGPOConfig
    granularity = "step"
    methodology = "MC (group)"
    reference = "Feng et al. 2025 (GiGPO: Group-in-Group Policy Optimization for LLM Agent Training, §3); survey §5.3"

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: GiGPOConfig = self.cfg  # type: ignore[assignment]
        rewards, mask = _inputs(tensors)
        B = rewards.shape[0]
        by_std = cfg.mode == "mean_std_norm"
        a_ep = F._grpo_scalars(rewards, mask, tensors.index, cfg.epsilon, by_std)  # (B,) Eq. 3
        if len(batch) != B:
            raise ValueError(f"credit method 'gigpo' reads each turn's state_key from the batch: it has "
                             f"{len(batch)} trajectories but the tensors have {B} rows")
        K = max(tensors.max_turns, 1)
        r_turn, is_step = turn_rewards(rewards, tensors.turn_ids, K)
        ret = reverse_discounted_scan(r_turn, cfg.gamma)  # (B, K) Eq. 5
        sid = anchor_ids(batch, K, cfg.similarity_thresh).to(rewards.device)
        anchored = is_step & (sid >= 0)
        gid, _ = group_ids(tensors.index, B, device=rewards.device)
        step_group = (gid[:, None] * (int(sid.max()) + 1) + sid)[anchored]  # Eq. 6: (episode group, anchor)
        a_step = torch.zeros((B, K), dtype=rewards.dtype, device=rewards.device)
        stats: dict[str, float] = {"steps": float(is_step.sum()), "anchored_step_fraction": 0.0,
                                   "grouped_step_fraction": 0.0, "step_groups": 0.0, "step_group_size_mean": 0.0}
        if step_group.numel():
            g = ret[anchored]
            count, mean, std, sg = group_stats(g, step_group, with_std=by_std)  # Eq. 7
            a = g - mean
            if by_std:
                a = a / (std + cfg.epsilon)  # type: ignore[operator]
            a_step[anchored] = torch.where(count > 1, a, torch.zeros_like(a))
            n_groups = int(sg.max()) + 1
            multi = count > 1
            stats.update(anchored_step_fraction=float(anchored.sum()) / max(float(is_step.sum()), 1.0),
                         grouped_step_fraction=float(multi.sum()) / max(float(is_step.sum()), 1.0),
                         step_groups=float(torch.unique(sg[multi]).numel()),
                         step_group_size_mean=float(g.numel()) / n_groups)
        adv = (a_ep[:, None] + cfg.step_advantage_w * steps_to_tokens(a_step, tensors.turn_ids)) * mask  # Eq. 8
        credit = torch.where(is_step, a_ep[:, None] + cfg.step_advantage_w * a_step, torch.full_like(a_step, float("nan")))
        n_steps = max(float(is_step.sum()), 1.0)
        stats.update(episode_adv_abs_mean=float(a_ep.abs().mean()) if B else 0.0,
                     step_adv_abs_mean=float(a_step.abs().sum()) / n_steps,
                     step_return_mean=float((ret * is_step).sum()) / n_steps)
        return CreditResult(advantages=adv, granularity="step", credit=credit, returns=None, stats=stats)


# --------------------------------------------------------------------------------------------
# CARL
# --------------------------------------------------------------------------------------------


@dataclass
class CARLConfig(CreditConfig):
    method: str = param("carl", help="credit-assignment method (registry name; CARL, Shen et al. 2025)")
    rho: float = param(0.3, help="fraction of the batch's actions, highest entropy first, that keep their advantage (Shen et al. 2025 critical actions; 1 = GRPO)", gt=0, le=1)
    entropy: str = param("token_entropy", help="action criticality: mean token entropy of the sampling distribution, or the paper's -mean log-prob of the sampled action (Shen et al. 2025 §3)", choices=CARL_ENTROPY)
    norm_adv_by_std: bool = param(True, help="base GRPO advantage divided by the group std (Shen et al. 2025 build on GRPO)")
    epsilon: float = param(1e-6, help="added to the group std (GRPO, verl's epsilon)", ge=0)


def top_fraction(score: torch.Tensor, present: torch.Tensor, frac: float) -> torch.Tensor:
    """Bool mask like ``present``: the ``ceil(frac * N)`` present entries of highest ``score``
    (N = present entries); ties keep the earlier entry in row-major order (stable sort).
    CARL's critical actions, StarPO-S's kept groups."""
    n = int(present.sum())
    k = min(n, int(math.ceil(frac * n - 1e-9)))
    order = torch.sort(score[present], descending=True, stable=True).indices
    keep = torch.zeros(n, dtype=torch.bool, device=score.device)
    keep[order[:k]] = True
    out = torch.zeros_like(present)
    out[present] = keep
    return out


@register_method
class CARL(CreditMethod):
    """CARL: GRPO's advantage on the top-rho fraction of actions by policy entropy, 0 on the
    rest (module docstring; Shen et al. 2025 §3; survey §5.4)."""

    name = "carl"
    needs_group = True  # the base advantage is GRPO's group baseline
    Config = CARLConfig
    granularity = "step"
    methodology = "Entropy-based"
    reference = "Shen et al. 2025 (CARL: Focusing Agentic Reinforcement Learning on Critical Actions, §3); survey §5.4"

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: CARLConfig = self.cfg  # type: ignore[assignment]
        rewards, mask = _inputs(tensors)
        base = F._grpo_scalars(rewards, mask, tensors.index, cfg.epsilon, cfg.norm_adv_by_std)  # (B,)
        K = max(tensors.max_turns, 1)
        _, present = turn_rewards(rewards, tensors.turn_ids, K)
        tok = tensors.entropies if cfg.entropy == "token_entropy" else -tensors.old_logprobs
        crit = turn_credit(tok.to(rewards.dtype), tensors.turn_ids, K)  # (B, K) length-normalized (nan: no action)
        keep = top_fraction(crit, present, cfg.rho)
        keep_tok = steps_to_tokens(keep.to(rewards.dtype), tensors.turn_ids)
        adv = base[:, None] * keep_tok * mask
        n = max(int(present.sum()), 1)
        n_tok = max(float(mask.sum()), 1.0)
        stats = {"actions": float(present.sum()), "critical_actions": float(keep.sum()),
                 "skipped_action_fraction": 1.0 - float(keep.sum()) / n if present.any() else 0.0,
                 "skipped_token_fraction": 1.0 - float((keep_tok * mask).sum()) / n_tok,
                 "entropy_mean": float(crit[present].mean()) if present.any() else 0.0,
                 "critical_entropy_mean": float(crit[keep].mean()) if keep.any() else 0.0,
                 "critical_entropy_min": float(crit[keep].min()) if keep.any() else 0.0}
        credit = torch.where(present, base[:, None] * keep.to(rewards.dtype), torch.full_like(crit, float("nan")))
        return CreditResult(advantages=adv, granularity="step", credit=credit, stats=stats)


# --------------------------------------------------------------------------------------------
# StarPO-S (RAGEN) variance filtering
# --------------------------------------------------------------------------------------------


@dataclass
class StarPOConfig(CreditConfig):
    method: str = param("starpo", help="credit-assignment method (registry name; StarPO-S uncertainty filtering, RAGEN, Wang et al. 2025d)")
    keep_fraction: float = param(0.25, help="fraction of the batch's groups, highest reward std first, that keep their advantage (Wang et al. 2025d StarPO-S, top 25%; 1 = GRPO)", gt=0, le=1)
    norm_adv_by_std: bool = param(True, help="base GRPO advantage divided by the group std (Wang et al. 2025d, GRPO variant of StarPO)")
    epsilon: float = param(1e-6, help="added to the group std (GRPO, verl's epsilon)", ge=0)


@register_method
class StarPO(CreditMethod):
    """StarPO-S filtering: GRPO's advantage on the top keep_fraction of groups by in-group reward
    std, 0 on the others (module docstring; Wang et al. 2025d §4; survey §5.7)."""

    name = "starpo"
    needs_group = True  # a group's reward std needs several rollouts
    Config = StarPOConfig
    granularity = "episode"
    methodology = "Uncertainty"
    reference = "Wang et al. 2025d (RAGEN / StarPO-S: uncertainty-based trajectory filtering, §4); survey §5.7"

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: StarPOConfig = self.cfg  # type: ignore[assignment]
        rewards, mask = _inputs(tensors)
        B = rewards.shape[0]
        base = F._grpo_scalars(rewards, mask, tensors.index, cfg.epsilon, cfg.norm_adv_by_std)  # (B,)
        scores = rewards.sum(-1)
        count, _, std, gid = group_stats(scores, tensors.index, with_std=True)
        G = int(gid.max()) + 1 if B else 0
        g_std = torch.zeros(G, dtype=rewards.dtype, device=rewards.device).scatter_(0, gid, torch.where(count > 1, std, torch.zeros_like(std)))  # type: ignore[arg-type]
        kept = top_fraction(g_std, torch.ones(G, dtype=torch.bool, device=rewards.device), cfg.keep_fraction)
        row_kept = kept[gid]
        scalars = base * row_kept.to(base.dtype)
        n_tok = max(float(mask.sum()), 1.0)
        stats = {"groups": float(G), "kept_groups": float(kept.sum()),
                 "kept_group_fraction": float(kept.sum()) / G if G else 0.0,
                 "kept_row_fraction": float(row_kept.sum()) / B if B else 0.0,
                 "reward_std_mean": float(g_std.mean()) if G else 0.0,
                 "kept_reward_std_mean": float(g_std[kept].mean()) if bool(kept.any()) else 0.0,
                 "policy_entropy_mean": float((tensors.entropies.to(mask.dtype) * mask).sum()) / n_tok}
        return CreditResult(advantages=scalars[:, None] * mask, granularity="episode", credit=scalars, stats=stats)
