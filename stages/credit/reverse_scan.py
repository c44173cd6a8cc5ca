"""Reverse discounted recurrences without a token loop: the chunked scan and left-packing.

GAE's advantages and REINFORCE++'s discounted return (survey §2.3, §2.5) are reverse-time
recurrences ``y_t = x_t + coef * y_{t+1}``. :func:`reverse_discounted_scan` solves them in
chunks of ``C`` tokens: within a chunk one ``(C x C)`` matmul, between chunks a second,
``(T/C x T/C)``, matmul (or, for ``|coef| > 1`` and gated recurrences, a loop over the ``T / C``
chunks, never over tokens). Multi-turn responses skip observation tokens: :func:`pack_slots` and
:func:`pack_left` move each row's policy tokens to the left first, so the recurrence runs over
policy tokens only, and a gather puts the results back.
"""

from __future__ import annotations

from typing import Optional

import torch

#: tokens per chunk of the chunked reverse scan (the (C x C) discount matrix)
DEFAULT_CHUNK = 64


def discount_matrix(coef: float, C: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Upper-triangular ``D[i, j] = coef ** (j - i)`` for ``j >= i`` (built in float64)."""
    ar = torch.arange(C, dtype=torch.float64, device=device)
    diff = ar[None, :] - ar[:, None]
    D = torch.where(diff >= 0, torch.tensor(float(coef), dtype=torch.float64, device=device) ** diff.clamp(min=0), 0.0)
    return D.to(dtype)


def reverse_discounted_scan(
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
    D = discount_matrix(coef, C + 1, dtype, device)  # column C: coef ** (C - i), the carry weight
    out = torch.empty_like(xp)
    nxt = torch.zeros(B, dtype=dtype, device=device)
    if keep is None:
        local = torch.matmul(xp, D[:C, :C].transpose(0, 1))  # (B, nC, C): sum_j D[i, j] x[j]
        carry_w = D[:C, C]
        if abs(coef) <= 1.0:
            # the chunk heads obey the same recurrence with coefficient coef**C, solved by one
            # (nC x nC) matmul instead of the loop (powers only shrink, so nothing overflows)
            D2 = discount_matrix(float(coef) ** C, nC, dtype, device)
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


def pack_slots(response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


def pack_left(x: torch.Tensor, slot: torch.Tensor, width: int) -> torch.Tensor:
    """(B, T) -> (B, width) with the policy tokens of each row moved to the front (zeros after).

    ``width >= T + 1``; column ``T`` is the dump column masked positions were scattered to and
    is zeroed.
    """
    B, T = x.shape
    out = torch.zeros(B, width, dtype=x.dtype, device=x.device).scatter_(1, slot, x)
    out[:, T] = 0.0
    return out
