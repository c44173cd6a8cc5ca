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
segment reductions (``index_add_``), and the two reverse-time recurrences (GAE and REINFORCE++'s
discounted return) are solved by a chunked scan after packing each row's policy tokens to the
left: within chunks of ``C`` tokens the reverse discounted sum is one ``(C x C)`` matmul, and the
carry between chunks is a second, ``(T/C x T/C)``, matmul (or, for ``|gamma * lam| > 1`` and
the legacy REINFORCE++ reset mode, a loop over the ``T / C`` chunks; see
:func:`_reverse_discounted_scan`).

The only deliberate numerical difference from verl: for singleton groups verl's GRPO divides by
``torch.tensor(1.0) + epsilon`` computed in float32, so with float64 rewards its singleton
advantages differ from ours (exact ``1 + epsilon``) by ~1e-7 relative.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

__all__ = [
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "group_ids",
    "gae",
    "grpo",
    "rloo",
    "reinforce_pp",
    "reinforce_pp_baseline",
    "remax",
]

IndexLike = Union[np.ndarray, Sequence[Any], torch.Tensor]

#: tokens per chunk of the chunked reverse scan (the (C x C) discount matrix)
DEFAULT_CHUNK = 64


# --------------------------------------------------------------------------------------------
# masked statistics (verl/utils/torch_functional.py)
# --------------------------------------------------------------------------------------------


def masked_sum(values: torch.Tensor, mask: torch.Tensor, axis: Optional[int] = None) -> torch.Tensor:
    """Sum of ``values`` where ``mask`` is non-zero (verl ``masked_sum``).

    NaNs outside the mask do not contaminate the sum. ``axis=None`` sums everything.
    """
    valid = torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))
    prod = valid * mask
    return prod.sum() if axis is None else prod.sum(dim=axis)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, axis: Optional[int] = None) -> torch.Tensor:
    """Mean of ``values`` over the mask: ``masked_sum / (mask.sum() + 1e-8)`` (verl ``masked_mean``)."""
    denom = mask.sum() if axis is None else mask.sum(dim=axis)
    return masked_sum(values, mask, axis) / (denom + 1e-8)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``values`` over the whole mask (verl ``masked_var``).

    With ``unbiased`` the biased masked variance is multiplied by the Bessel correction
    ``n / (n - 1)``, ``n = mask.sum()``; like verl this raises ``ValueError`` when ``n`` is 0 or 1.
    """
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n == 0:
            raise ValueError("masked_var: at least one element in the mask has to be 1 (mask.sum() == 0)")
        if n == 1:
            raise ValueError(
                "masked_var: the sum of the mask is one, the unbiased variance would divide by zero; "
                "use a larger batch"
            )
        variance = variance * (n / (n - 1))
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """``(values - mean) * rsqrt(var + 1e-8)`` with mean/unbiased var over the mask (verl ``masked_whiten``).

    The statistics are batch-global (over every masked entry); the transform is applied to every
    entry, masked or not. With ``shift_mean=False`` the mean is added back after scaling.
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


def _whiten_stats_binary(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, rsqrt(var + 1e-8))`` of :func:`masked_whiten` for a 0/1 float ``mask`` and values
    finite on the mask.

    Same numbers as verl's (``where(mask, x, 0) * mask == x * mask`` for such inputs and the
    reductions run in the same order) with multiplications instead of ``torch.where``, which is
    several times slower on CPU; used inside the estimators, whose whitened tensors are finite.
    """
    n = mask.sum()
    if n == 0:
        raise ValueError("masked_var: at least one element in the mask has to be 1 (mask.sum() == 0)")
    if n == 1:
        raise ValueError(
            "masked_var: the sum of the mask is one, the unbiased variance would divide by zero; "
            "use a larger batch"
        )
    mean = (values * mask).sum() / (n + 1e-8)
    var = (((values - mean) ** 2) * mask).sum() / (n + 1e-8) * (n / (n - 1))
    return mean, torch.rsqrt(var + 1e-8)


def _whiten_binary(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``masked_whiten(values, mask)`` for a 0/1 float mask (see :func:`_whiten_stats_binary`)."""
    mean, rstd = _whiten_stats_binary(values, mask)
    return (values - mean) * rstd


# --------------------------------------------------------------------------------------------
# validation and group ids
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


def group_ids(index: IndexLike, bs: int, device: Optional[torch.device] = None) -> tuple[torch.Tensor, int]:
    """Factorize per-row group labels to contiguous ids ``0..G-1``: ``((bs,) long, G)``.

    Accepts what verl passes as ``index``: a numpy array (often of uid strings), a list, or a
    torch tensor of integer ids. Raises ``ValueError`` if the length is not ``bs``.
    """
    if isinstance(index, torch.Tensor):
        flat = index.reshape(-1)
        if flat.numel() != bs:
            raise ValueError(f"index has {flat.numel()} entries but the batch has {bs} rows")
        if flat.is_floating_point() or flat.is_complex():
            raise ValueError(f"index must hold integer group ids, got dtype {flat.dtype}")
        _, inv = torch.unique(flat, return_inverse=True)
        inv = inv.to(dtype=torch.long, device=device)
    else:
        arr = np.asarray(index)
        if arr.ndim != 1:
            arr = arr.reshape(-1)
        if arr.shape[0] != bs:
            raise ValueError(f"index has {arr.shape[0]} entries but the batch has {bs} rows")
        try:
            _, inv_np = np.unique(arr, return_inverse=True)
        except TypeError:  # mixed, unorderable labels: group by their string form
            _, inv_np = np.unique(np.array([str(x) for x in arr], dtype=object), return_inverse=True)
        inv = torch.as_tensor(np.asarray(inv_np).reshape(-1).astype(np.int64), device=device)
    G = int(inv.max().item()) + 1 if inv.numel() else 0
    return inv, G


def _group_stats(
    scores: torch.Tensor, index: IndexLike, with_std: bool
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Per-row group statistics with verl's singleton rule, as segment reductions.

    Returns ``(count, mean, std, gid)`` gathered back to rows (each ``(bs,)``): ``count`` the
    group size, ``mean`` the group mean (0 for singleton groups), ``std`` the unbiased group
    standard deviation as ``torch.std`` computes it (two-pass, centred; 1 for singletons) or None.
    """
    bs = scores.shape[0]
    gid, G = group_ids(index, bs, device=scores.device)
    count = torch.zeros(G, dtype=scores.dtype, device=scores.device).index_add_(0, gid, torch.ones_like(scores))
    total = torch.zeros(G, dtype=scores.dtype, device=scores.device).index_add_(0, gid, scores)
    single = count <= 1
    mean = torch.where(single, torch.zeros_like(total), total / count.clamp(min=1))
    std = None
    if with_std:
        centred = scores - mean[gid]
        ss = torch.zeros(G, dtype=scores.dtype, device=scores.device).index_add_(0, gid, centred * centred)
        std = torch.where(single, torch.ones_like(ss), torch.sqrt(ss / (count - 1).clamp(min=1)))
        std = std[gid]
    return count[gid], mean[gid], std, gid


# --------------------------------------------------------------------------------------------
# chunked reverse scan
# --------------------------------------------------------------------------------------------


def _discount_matrix(coef: float, C: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Upper-triangular ``D[i, j] = coef ** (j - i)`` for ``j >= i`` (built in float64)."""
    ar = torch.arange(C, dtype=torch.float64, device=device)
    diff = ar[None, :] - ar[:, None]
    D = torch.where(diff >= 0, torch.tensor(float(coef), dtype=torch.float64, device=device) ** diff.clamp(min=0), 0.0)
    return D.to(dtype)


def _reverse_discounted_scan(
    x: torch.Tensor, coef: float, keep: Optional[torch.Tensor] = None, chunk: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """Solve ``y[:, t] = x[:, t] + coef * keep[:, t] * y[:, t+1]`` (``y[:, T] = 0``) without a token loop.

    ``x``: (B, T); ``keep``: optional (B, T) 0/1 gate (None means all ones, the plain discounted
    reverse cumulative sum). The sequence is cut into ``nC = ceil(T / C)`` chunks. Inside a chunk
    ``y_local = M @ x_chunk`` with ``M[i, j] = coef**(j-i) * prod_{i<=k<j} keep[k]``: one fixed
    (C x C) matrix for all chunks when there is no gate, else that matrix masked per chunk by
    "no reset between i and j" (equal exclusive cumulative count of resets). The tail of each
    chunk is then carried from the chunk after it: ``y[i] = y_local[i] + M[i, C] * y_next[0]``.
    Without a gate and with ``|coef| <= 1`` the chunk heads ``y_next[0]`` are themselves a
    discounted reverse sum (coefficient ``coef**C``) solved by one (nC x nC) matmul; otherwise
    a loop over the chunks (never over tokens) carries them.
    """
    B, T = x.shape
    if T == 0:
        return x.clone()
    C = max(1, min(int(chunk), T))
    nC = -(-T // C)
    pad = nC * C - T
    dtype, device = x.dtype, x.device
    xp = torch.nn.functional.pad(x, (0, pad)).view(B, nC, C)
    D = _discount_matrix(coef, C + 1, dtype, device)  # column C: coef ** (C - i), the carry weight
    out = torch.empty_like(xp)
    nxt = torch.zeros(B, dtype=dtype, device=device)
    if keep is None:
        local = torch.matmul(xp, D[:C, :C].transpose(0, 1))  # (B, nC, C): sum_j D[i, j] x[j]
        carry_w = D[:C, C]
        if abs(coef) <= 1.0:
            # the chunk heads obey the same recurrence with coefficient coef**C, solved by one
            # (nC x nC) matmul instead of the loop (powers only shrink, so nothing overflows)
            D2 = _discount_matrix(float(coef) ** C, nC, dtype, device)
            heads = torch.matmul(local[..., 0], D2.transpose(0, 1))  # (B, nC): y at each chunk start
            nxt_heads = torch.nn.functional.pad(heads[:, 1:], (0, 1))
            out = local + carry_w * nxt_heads.unsqueeze(-1)
        else:
            for c in range(nC - 1, -1, -1):  # loop over chunks only
                out[:, c] = local[:, c] + carry_w * nxt[:, None]
                nxt = out[:, c, 0]
    else:
        kp = torch.nn.functional.pad(keep.to(dtype), (0, pad)).view(B, nC, C)
        # exclusive count of resets before position i inside each chunk; index C holds the total
        excl = torch.cumsum(torch.nn.functional.pad(1 - kp, (1, 0)), dim=-1)  # (B, nC, C+1)
        Dc = D[:C]  # (C, C+1)
        for c in range(nC - 1, -1, -1):  # loop over chunks only; (B, C, C+1) work per chunk
            e = excl[:, c]
            M = Dc * (e[:, :C, None] == e[:, None, :]).to(dtype)  # no reset in [i, j)
            local = torch.bmm(M[:, :, :C], xp[:, c].unsqueeze(-1)).squeeze(-1)
            out[:, c] = local + M[:, :, C] * nxt[:, None]
            nxt = out[:, c, 0]
    return out.reshape(B, nC * C)[:, :T]


# --------------------------------------------------------------------------------------------
# packing policy tokens to the left (observation tokens skipped)
# --------------------------------------------------------------------------------------------


def _pack_slots(response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each position goes when a row's policy tokens are packed to the left.

    Returns ``(m, excl, slot)``: ``m`` the bool mask, ``excl[b, t]`` the number of policy tokens
    strictly before ``t`` (the packed slot of a policy token, and for a masked position the slot
    of the *next* policy token), ``slot`` = ``excl`` on policy tokens and the dump column ``T``
    elsewhere.
    """
    m = response_mask != 0
    ml = m.to(torch.long)
    excl = torch.cumsum(ml, dim=-1) - ml
    slot = excl * ml + response_mask.shape[-1] * (1 - ml)  # arithmetic select (where is slow on CPU)
    return m, excl, slot


def _pack_left(x: torch.Tensor, slot: torch.Tensor, width: int) -> torch.Tensor:
    """(B, T) -> (B, width) with the policy tokens of each row moved to the front (zeros after).

    ``width >= T + 1``; column ``T`` is the dump column masked positions were scattered to and
    is zeroed.
    """
    B, T = x.shape
    out = torch.zeros(B, width, dtype=x.dtype, device=x.device).scatter_(1, slot, x)
    out[:, T] = 0.0
    return out


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
    whitened over ``response_mask`` (batch mean/unbiased var, :func:`masked_whiten`), so, like
    verl's, they are not zero outside the mask (the policy loss masks them).

    Vectorized: the policy tokens of each row are packed to the left (a scatter by their exclusive
    cumulative count), the fixed-coefficient recurrence is solved on the packed rows by
    :func:`_reverse_discounted_scan`, and one gather puts every position's advantage back.

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
    m, excl, slot = _pack_slots(response_mask.to(rewards.device))
    mf = m.to(rewards.dtype)
    r_p = _pack_left(rewards, slot, T + 1)[:, :T]
    v_p = _pack_left(values, slot, T + 1)  # v_p[:, k + 1] is the value of the next policy token
    v_next = v_p[:, 1 : T + 1]
    delta = r_p + gamma * v_next - v_p[:, :T]
    adv_p = _reverse_discounted_scan(delta, gamma * lam, chunk=chunk)
    adv_p = torch.nn.functional.pad(adv_p, (0, 1))  # slot T: nothing after the last policy token
    advantages = torch.gather(adv_p, 1, excl)
    returns = advantages + values
    advantages = _whiten_binary(advantages, mf)  # == masked_whiten(advantages, response_mask)
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
    adv = scalars.unsqueeze(-1) * _float_mask(response_mask, scalars)
    return adv, adv


def _grpo_scalars(token_level_rewards, response_mask, index, epsilon, norm_adv_by_std) -> torch.Tensor:
    """(bs,) per-episode GRPO advantage (see :func:`grpo`)."""
    _check_2d("token_level_rewards", token_level_rewards)
    _check_same("response_mask", response_mask, "token_level_rewards", token_level_rewards)
    scores = _as_float(token_level_rewards).sum(dim=-1)
    _, mean, std, _ = _group_stats(scores, index, with_std=norm_adv_by_std)
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
    adv = scalars.unsqueeze(-1) * _float_mask(response_mask, scalars)
    return adv, adv


def _rloo_scalars(token_level_rewards, response_mask, index) -> torch.Tensor:
    """(bs,) per-episode RLOO advantage (see :func:`rloo`)."""
    _check_2d("token_level_rewards", token_level_rewards)
    _check_same("response_mask", response_mask, "token_level_rewards", token_level_rewards)
    scores = _as_float(token_level_rewards).sum(dim=-1)
    n, mean, _, _ = _group_stats(scores, index, with_std=False)
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
        returns = _reverse_discounted_scan(rewards, gamma, keep=keep, chunk=chunk)
    else:
        _, excl, slot = _pack_slots(response_mask.to(rewards.device))
        g_p = _reverse_discounted_scan(_pack_left(rewards, slot, T + 1)[:, :T], gamma, chunk=chunk)
        returns = torch.gather(g_p, 1, excl) * mf  # excl[t] <= t < T
    advantages = _whiten_binary(returns, mf) * mf  # == masked_whiten(returns, response_mask) * mask
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
    _, mean, _, _ = _group_stats(scores, index, with_std=False)
    centred = scores - mean
    mf = _float_mask(response_mask, centred)
    tiled = centred.unsqueeze(-1) * mf
    mu, rstd = _whiten_stats_binary(tiled, mf)  # masked_whiten(tiled, mask), stats kept for the scalars
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
