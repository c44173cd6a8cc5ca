"""Deliberately slow, loop-based reference of the episode-level baseline estimators.

This is the *independent reference computation* that :mod:`stages.credit.functional` is tested
against: plain Python floats (float64), an explicit loop over rows and over tokens, group
statistics from per-group Python lists, written from the formulas (GRPO Shao et al. 2024,
survey §2.3 eq. 2; RLOO Ahmadian et al. 2024; REINFORCE++ Hu 2025; ReMax Li et al. 2023;
GAE Schulman et al. 2016) and verl's documented semantics, not from the vectorized code.
It shares no helper with ``functional.py``.

Inputs may be torch tensors, numpy arrays or nested lists; outputs are ``(advantages, returns)``
as float64 torch tensors of shape (B, T).
"""

from __future__ import annotations

import math
from typing import Any

import torch


def _rows(x: Any) -> list[list[float]]:
    if isinstance(x, torch.Tensor):
        return [[float(v) for v in row] for row in x.detach().double().cpu().tolist()]
    return [[float(v) for v in row] for row in x]


def _labels(index: Any) -> list[Any]:
    if isinstance(index, torch.Tensor):
        return [int(v) for v in index.reshape(-1).tolist()]
    return [v.item() if hasattr(v, "item") else v for v in list(index)]


def _tensor(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def ref_whiten(rows: list[list[float]], mask: list[list[float]]) -> list[list[float]]:
    """Whiten every entry with the batch mean and unbiased (Bessel) variance of the masked entries."""
    picked = [v for row, mrow in zip(rows, mask) for v, m in zip(row, mrow) if m != 0]
    n = len(picked)
    if n < 2:
        raise ValueError("need at least two masked entries to whiten")
    mean = sum(picked) / n
    var = sum((v - mean) ** 2 for v in picked) / (n - 1)
    scale = 1.0 / math.sqrt(var + 1e-8)
    return [[(v - mean) * scale for v in row] for row in rows]


def _groups(labels: list[Any]) -> dict[Any, list[int]]:
    out: dict[Any, list[int]] = {}
    for i, g in enumerate(labels):
        out.setdefault(g, []).append(i)
    return out


def ref_gae(token_level_rewards, values, response_mask, gamma: float, lam: float):
    """GAE where masked (observation/padding) tokens are skipped; whitened over the mask."""
    R, V, M = _rows(token_level_rewards), _rows(values), _rows(response_mask)
    adv_rows, ret_rows = [], []
    for r, v, m in zip(R, V, M):
        T = len(r)
        adv = [0.0] * T
        next_value = 0.0  # value of the next policy token (0 past the end)
        running = 0.0  # advantage of the next policy token
        for t in range(T - 1, -1, -1):
            if m[t] != 0:
                delta = r[t] + gamma * next_value - v[t]
                running = delta + gamma * lam * running
                next_value = v[t]
            adv[t] = running  # masked positions hold the next policy token's advantage
        adv_rows.append(adv)
        ret_rows.append([a + b for a, b in zip(adv, v)])
    return _tensor(ref_whiten(adv_rows, M)), _tensor(ret_rows)


def _group_mean_std(scores: list[float], labels: list[Any]) -> tuple[list[float], list[float], list[int]]:
    means, stds, sizes = [0.0] * len(scores), [1.0] * len(scores), [1] * len(scores)
    for members in _groups(labels).values():
        n = len(members)
        vals = [scores[i] for i in members]
        if n == 1:
            mu, sd = 0.0, 1.0
        else:
            mu = sum(vals) / n
            sd = math.sqrt(sum((x - mu) ** 2 for x in vals) / (n - 1))
        for i in members:
            means[i], stds[i], sizes[i] = mu, sd, n
    return means, stds, sizes


def ref_grpo(token_level_rewards, response_mask, index, epsilon: float = 1e-6, norm_adv_by_std: bool = True):
    R, M = _rows(token_level_rewards), _rows(response_mask)
    scores = [sum(r) for r in R]
    means, stds, _ = _group_mean_std(scores, _labels(index))
    out = []
    for i, m in enumerate(M):
        a = (scores[i] - means[i]) / (stds[i] + epsilon) if norm_adv_by_std else scores[i] - means[i]
        out.append([a * mt for mt in m])
    adv = _tensor(out)
    return adv, adv.clone()


def ref_rloo(token_level_rewards, response_mask, index):
    """Leave-one-out: s_i minus the mean of the other members; singletons keep s_i."""
    R, M = _rows(token_level_rewards), _rows(response_mask)
    scores = [sum(r) for r in R]
    groups = _groups(_labels(index))
    labels = _labels(index)
    out = []
    for i, m in enumerate(M):
        members = groups[labels[i]]
        if len(members) > 1:
            others = [scores[j] for j in members if j != i]
            a = scores[i] - sum(others) / len(others)
        else:
            a = scores[i]
        out.append([a * mt for mt in m])
    adv = _tensor(out)
    return adv, adv.clone()


def ref_reinforce_pp(token_level_rewards, response_mask, gamma: float, reset_at_observations: bool = False):
    """Discounted return-to-go over policy tokens, whitened over the mask.

    Default (current verl): masked tokens are skipped (their reward ignored, their return 0, the
    running return passes over them). ``reset_at_observations``: older verl, the return is
    computed at every position but does not flow back across a masked token.
    """
    R, M = _rows(token_level_rewards), _rows(response_mask)
    ret_rows = []
    for r, m in zip(R, M):
        T = len(r)
        G = [0.0] * T
        if reset_at_observations:
            for t in range(T - 1, -1, -1):
                nxt = G[t + 1] if (t + 1 < T and m[t + 1] != 0) else 0.0
                G[t] = r[t] + gamma * nxt
        else:
            running = 0.0
            for t in range(T - 1, -1, -1):
                if m[t] != 0:
                    running = r[t] + gamma * running
                    G[t] = running
        ret_rows.append(G)
    white = ref_whiten(ret_rows, M)
    adv = [[w * mt for w, mt in zip(wr, mr)] for wr, mr in zip(white, M)]
    return _tensor(adv), _tensor(ret_rows)


def ref_reinforce_pp_baseline(token_level_rewards, response_mask, index, epsilon: float = 1e-6):
    R, M = _rows(token_level_rewards), _rows(response_mask)
    scores = [sum(r) for r in R]
    means, _, _ = _group_mean_std(scores, _labels(index))
    tiled = [[(scores[i] - means[i]) * mt for mt in m] for i, m in enumerate(M)]
    white = ref_whiten(tiled, M)
    adv = _tensor([[w * mt for w, mt in zip(wr, mr)] for wr, mr in zip(white, M)])
    return adv, adv.clone()


def ref_remax(token_level_rewards, reward_baselines, response_mask):
    R, M = _rows(token_level_rewards), _rows(response_mask)
    b = [float(x) for x in (reward_baselines.tolist() if hasattr(reward_baselines, "tolist") else reward_baselines)]
    adv_rows, ret_rows = [], []
    for i, (r, m) in enumerate(zip(R, M)):
        T = len(r)
        G = [0.0] * T
        acc = 0.0
        for t in range(T - 1, -1, -1):
            acc += r[t] * m[t]
            G[t] = acc
        ret_rows.append(G)
        adv_rows.append([G[t] - b[i] * m[t] for t in range(T)])
    return _tensor(adv_rows), _tensor(ret_rows)
