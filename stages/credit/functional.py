"""Episode-level baseline estimators as plain, vectorized torch functions (survey §2.3, §2.5).

Every function here mirrors an advantage estimator of verl's ``verl/trainer/ppo/core_algos.py``
(and the masked statistics of ``verl/utils/torch_functional.py``): same argument names, same
shapes, same numerics, so a recipe tuned on verl behaves the same here. The registry methods in
:mod:`stages.credit.methods.episode` are thin wrappers around these.

Conventions (verl's):

* ``token_level_rewards``, ``values``, ``response_mask``: ``(bs, response_length)`` tensors;
  column ``t`` is response token ``t``. ``response_mask`` is 1 on policy tokens and 0 on padding
  and on environment-observation tokens between turns (multi-turn gaps); it is treated as binary
  (non-zero means 1).
* ``index``: one group id per row (numpy array, list or torch tensor; any hashable labels), the
  rollouts of one prompt / task instance sharing an id.
* Every estimator returns ``(advantages, returns)``, both ``(bs, response_length)``.

Unlike verl's reference code, nothing here loops over batch rows or tokens: group statistics are
segment reductions (:mod:`stages.credit.group_stats`), and the two reverse-time recurrences (GAE
and REINFORCE++'s discounted return) are solved by a chunked scan after packing each row's policy
tokens to the left (:mod:`stages.credit.reverse_scan`). The masked statistics and whitening are
in :mod:`stages.credit.masked_stats`.

The only deliberate numerical difference from verl: for singleton groups verl's GRPO divides by
``torch.tensor(1.0) + epsilon`` computed in float32, so with float64 rewards its singleton
advantages differ from ours (exact ``1 + epsilon``) by ~1e-7 relative.
"""

from __future__ import annotations

import torch

from stages.credit.group_stats import IndexLike, group_stats
from stages.credit.masked_stats import whiten_binary, whiten_stats_binary
from stages.credit.reverse_scan import DEFAULT_CHUNK, pack_left, pack_slots, reverse_discounted_scan

__all__ = [
    "gae",
    "grpo",
    "rloo",
    "reinforce_pp",
    "reinforce_pp_baseline",
    "remax",
]


# --------------------------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------------------------


def _check_2d(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (bs, response_length), got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape (bs, response_length), got shape {tuple(x.shape)}")


def _check_same(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    _check_2d(name, x)
    if x.shape != ref.shape:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)} but {ref_name} has shape {tuple(ref.shape)}; they must match"
        )


def _as_float(x: torch.Tensor) -> torch.Tensor:
    """Integer/bool rewards are promoted to the default float dtype; float tensors pass through."""
    return x if x.is_floating_point() else x.to(torch.get_default_dtype())


def _float_mask(response_mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Binary mask (non-zero -> 1) in the dtype/device of ``like``."""
    return (response_mask != 0).to(dtype=like.dtype, device=like.device)


def _broadcast_masked(scalars: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """``scalars[:, None] * (response_mask != 0)`` with one (bs, T) allocation: the comparison is
    written straight into the float output and scaled in place (about 5x faster on CPU at
    B=256, T=2048 than building a float mask first; benchmarks/credit_kernels.py)."""
    out = torch.empty(response_mask.shape, dtype=scalars.dtype, device=scalars.device)
    torch.ne(response_mask.to(scalars.device), 0, out=out)
    return out.mul_(scalars.unsqueeze(-1))


# --------------------------------------------------------------------------------------------
# estimators (verl/trainer/ppo/core_algos.py)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def gae(
    token_level_rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float,
    lam: float,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation with a learned critic (Schulman et al. 2016; PPO, survey §2.5).

    verl: ``compute_gae_advantage_return`` (the masked multi-turn variant). Positions where
    ``response_mask == 0`` (environment observations, padding) are *skipped*: their TD error is
    dropped and both the next value and the running GAE carry over them, so each policy token
    bootstraps from the value of the *next policy token*::

        delta_t = r_t + gamma * V_next(t) - V_t
        A_t     = delta_t + gamma * lam * A_next(t)

    A masked position holds the advantage of the next policy token (0 after the last one), as in
    verl. ``returns = advantages + values`` (before whitening) and the advantages are then
    whitened over ``response_mask`` (batch mean/unbiased var,
    :func:`~stages.credit.masked_stats.masked_whiten`), so, like verl's, they are not zero outside
    the mask (the policy loss masks them).

    Vectorized: the policy tokens of each row are packed to the left (a scatter by their exclusive
    cumulative count), the fixed-coefficient recurrence is solved on the packed rows by
    :func:`~stages.credit.reverse_scan.reverse_discounted_scan`, and one gather puts every position's advantage back.

    Args:
        token_level_rewards: (bs, response_length)
        values: (bs, response_length) critic values V(s) before each response token
        response_mask: (bs, response_length) 1 on policy tokens
        gamma: discount factor
        lam: GAE lambda
        chunk: tokens per chunk of the scan

    Returns:
        ``(advantages, returns)``, each (bs, response_length).
    """
    _check_2d("token_level_rewards", token_level_rewards)
    _check_same("values", values, "token_level_rewards", token_level_rewards)
    _check_same("response_mask", response_mask, "token_level_rewards", token_level_rewards)
    rewards = _as_float(token_level_rewards)
    values = values.to(dtype=rewards.dtype, device=rewards.device)
    B, T = rewards.shape
    m, excl, slot = pack_slots(response_mask.to(rewards.device))
    mf = m.to(rewards.dtype)
    r_p = pack_left(rewards, slot, T + 1)[:, :T]
    v_p = pack_left(values, slot, T + 1)  # v_p[:, k + 1] is the value of the next policy token
    v_next = v_p[:, 1 : T + 1]
    delta = r_p + gamma * v_next - v_p[:, :T]
    adv_p = reverse_discounted_scan(delta, gamma * lam, chunk=chunk)
    adv_p = torch.nn.functional.pad(adv_p, (0, 1))  # slot T: nothing after the last policy token
    advantages = torch.gather(adv_p, 1, excl)
    returns = advantages + values
    advantages = whiten_binary(advantages, mf)  # == masked_whiten(advantages, response_mask)
    return advantages, returns


@torch.no_grad()
def grpo(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: IndexLike,
    epsilon: float = 1e-6,
    norm_adv_by_std: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO group-normalized outcome advantage (Shao et al. 2024; survey §2.3, eq. 2).

    verl: ``compute_grpo_outcome_advantage`` (``norm_adv_by_std_in_grpo`` is ``norm_adv_by_std``
    here). With ``s_i = sum_t r_{i,t}`` and ``mu_g``, ``sigma_g`` the mean and unbiased standard
    deviation (``torch.std``) of the scores in row i's group g::

        A_i = (s_i - mu_g) / (sigma_g + epsilon)     # norm_adv_by_std=True (GRPO)
        A_i =  s_i - mu_g                            # norm_adv_by_std=False (Dr. GRPO)

    A group of one row gets ``mu = 0, sigma = 1`` (verl's rule), i.e. its advantage is its score
    scaled by ``1 / (1 + epsilon)``. The scalar is broadcast to every token and multiplied by
    ``response_mask``. Group statistics are segment reductions (``index_add_``), no loop.

    Args:
        token_level_rewards: (bs, response_length)
        response_mask: (bs, response_length)
        index: (bs,) group id per row
        epsilon: added to the group std
        norm_adv_by_std: divide by the group std (GRPO) or not (Dr. GRPO)

    Returns:
        ``(advantages, returns)``, each (bs, response_length); the same tensor.
    """
    scalars = _grpo_scalars(token_level_rewards, response_mask, index, epsilon, norm_adv_by_std)
    adv = _broadcast_masked(scalars, response_mask)
    return adv, adv


def _grpo_scalars(token_level_rewards, response_mask, index, epsilon, norm_adv_by_std) -> torch.Tensor:
    """(bs,) per-episode GRPO advantage (see :func:`grpo`)."""
    _check_2d("token_level_rewards", token_level_rewards)
    _check_same("response_mask", response_mask, "token_level_rewards", token_level_rewards)
    scores = _as_float(token_level_rewards).sum(dim=-1)
    _, mean, std, _ = group_stats(scores, index, with_std=norm_adv_by_std)
    if norm_adv_by_std:
        return (scores - mean) / (std + epsilon)
    return scores - mean


@torch.no_grad()
def rloo(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: IndexLike,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE leave-one-out baseline (Ahmadian et al. 2024; group baselines, survey §2.3).

    verl: ``compute_rloo_outcome_advantage``. For a group of ``n > 1`` rows with scores ``s`` and
    mean ``mu``::

        A_i = s_i * n / (n - 1) - mu * n / (n - 1)  =  s_i - mean_{j != i} s_j

    Rows of a singleton group keep their raw score ``s_i`` (verl's loop version; note that verl's
    ``rloo_vectorized`` gives them 0 instead). Broadcast to tokens, times ``response_mask``.

    Args:
        token_level_rewards: (bs, response_length)
        response_mask: (bs, response_length)
        index: (bs,) group id per row

    Returns:
        ``(advantages, returns)``, each (bs, response_length); the same tensor.
    """
    scalars = _rloo_scalars(token_level_rewards, response_mask, index)
    adv = _broadcast_masked(scalars, response_mask)
    return adv, adv


def _rloo_scalars(token_level_rewards, response_mask, index) -> torch.Tensor:
    """(bs,) per-episode RLOO advantage (see :func:`rloo`)."""
    _check_2d("token_level_rewards", token_level_rewards)
    _check_same("response_mask", response_mask, "token_level_rewards", token_level_rewards)
    scores = _as_float(token_level_rewards).sum(dim=-1)
    n, mean, _, _ = group_stats(scores, index, with_std=False)
    denom = (n - 1).clamp(min=1)
    loo = scores * n / denom - mean * n / denom
    return torch.where(n > 1, loo, scores)


@torch.no_grad()
def reinforce_pp(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float,
    chunk: int = DEFAULT_CHUNK,
    reset_at_observations: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++: discounted return-to-go, whitened over the batch (Hu 2025; survey §2.3).

    verl: ``compute_reinforce_plus_plus_outcome_advantage`` (``gamma`` is ``config.gamma`` there).
    As in current verl (0.9.x), positions where ``response_mask == 0`` are *skipped*: their reward
    is dropped, their return is 0, and the running return carries over them unchanged, so the
    reward at the end of a multi-turn episode reaches the policy tokens of every earlier turn::

        G_t = r_t + gamma * G_next(t)     on policy tokens (next(t): the next policy token)
        G_t = 0                           elsewhere

    ``reset_at_observations=True`` reproduces older verl instead (up to early 2026, e.g. commit
    b178a3c), which reset the running return after every masked position:
    ``G_t = r_t + gamma * mask_{t+1} * G_{t+1}`` on every position (masked ones included), so
    rewards never cross an observation gap.

    ``returns = G``; ``advantages = masked_whiten(G, response_mask) * response_mask``.
    Vectorized like :func:`gae` (pack policy tokens left, chunked scan, gather back); the legacy
    variant uses the gated chunked scan.

    Args:
        token_level_rewards: (bs, response_length)
        response_mask: (bs, response_length)
        gamma: discount factor
        chunk: tokens per chunk of the scan
        reset_at_observations: legacy verl semantics (see above)

    Returns:
        ``(advantages, returns)``, each (bs, response_length).
    """
    _check_2d("token_level_rewards", token_level_rewards)
    _check_same("response_mask", response_mask, "token_level_rewards", token_level_rewards)
    rewards = _as_float(token_level_rewards)
    B, T = rewards.shape
    mf = _float_mask(response_mask, rewards)
    if reset_at_observations:
        keep = torch.nn.functional.pad(mf[:, 1:], (0, 1))  # keep[t] = mask[t+1]
        returns = reverse_discounted_scan(rewards, gamma, keep=keep, chunk=chunk)
    else:
        _, excl, slot = pack_slots(response_mask.to(rewards.device))
        g_p = reverse_discounted_scan(pack_left(rewards, slot, T + 1)[:, :T], gamma, chunk=chunk)
        returns = torch.gather(g_p, 1, excl) * mf  # excl[t] <= t < T
    advantages = whiten_binary(returns, mf) * mf  # == masked_whiten(returns, response_mask) * mask
    return advantages, returns


@torch.no_grad()
def reinforce_pp_baseline(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: IndexLike,
    epsilon: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ with a group-mean baseline (Hu 2025; group baselines, survey §2.3).

    verl: ``compute_reinforce_plus_plus_baseline_outcome_advantage``. ``s_i - mu_g`` (singleton
    groups: ``mu = 0``) is broadcast over the row times ``response_mask``, then whitened over
    ``response_mask`` across the whole batch and masked again. ``epsilon`` is accepted for
    verl's signature and, as there, unused.

    Args:
        token_level_rewards: (bs, response_length)
        response_mask: (bs, response_length)
        index: (bs,) group id per row
        epsilon: unused (verl parity)

    Returns:
        ``(advantages, returns)``, each (bs, response_length); the same tensor.
    """
    adv, _ = _reinforce_pp_baseline_impl(token_level_rewards, response_mask, index)
    return adv, adv


def _reinforce_pp_baseline_impl(token_level_rewards, response_mask, index) -> tuple[torch.Tensor, torch.Tensor]:
    """``((bs, R) advantages, (bs,) per-episode whitened scalar)`` of :func:`reinforce_pp_baseline`."""
    _check_2d("token_level_rewards", token_level_rewards)
    _check_same("response_mask", response_mask, "token_level_rewards", token_level_rewards)
    scores = _as_float(token_level_rewards).sum(dim=-1)
    _, mean, _, _ = group_stats(scores, index, with_std=False)
    centred = scores - mean
    mf = _float_mask(response_mask, centred)
    tiled = centred.unsqueeze(-1) * mf
    mu, rstd = whiten_stats_binary(tiled, mf)  # masked_whiten(tiled, mask), stats kept for the scalars
    adv = (tiled - mu) * rstd * mf
    return adv, (centred - mu) * rstd


@torch.no_grad()
def remax(
    token_level_rewards: torch.Tensor,
    reward_baselines: torch.Tensor,
    response_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ReMax: return-to-go minus the reward of a greedy rollout (Li et al. 2023; survey §2.3).

    verl: ``compute_remax_outcome_advantage``. ``returns`` is the undiscounted reverse cumulative
    sum of ``token_level_rewards * response_mask``; ``advantages = returns - b * response_mask``
    with ``b = reward_baselines`` the reward of the greedy (argmax) response to the same prompt.

    The registry method ``remax`` (:mod:`stages.credit.methods.episode`) gets ``b`` from the
    greedy rollouts the credit stage provides (``needs={"greedy_rollout"}``).

    Args:
        token_level_rewards: (bs, response_length)
        reward_baselines: (bs,) reward of the greedy response
        response_mask: (bs, response_length)

    Returns:
        ``(advantages, returns)``, each (bs, response_length).
    """
    _check_2d("token_level_rewards", token_level_rewards)
    _check_same("response_mask", response_mask, "token_level_rewards", token_level_rewards)
    if reward_baselines.dim() != 1 or reward_baselines.shape[0] != token_level_rewards.shape[0]:
        raise ValueError(
            f"reward_baselines must have shape ({token_level_rewards.shape[0]},), got {tuple(reward_baselines.shape)}"
        )
    mask = response_mask.to(token_level_rewards.dtype)
    returns = (token_level_rewards * mask).flip(dims=[-1]).cumsum(dim=-1).flip(dims=[-1])
    advantages = returns - reward_baselines.to(returns.dtype).unsqueeze(-1) * mask
    return advantages, returns
