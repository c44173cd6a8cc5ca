"""Credit accuracy against exact ground truth: identification and gradient validity (survey §9.3).

A credit method's output can be judged two ways, and the two can disagree:

* **Identification** — *is the output an advantage?* Per turn, the method's credit ``c_t`` (its
  per-token advantages averaged over the turn's policy tokens, :func:`stages.schema.turn_credit`)
  against the exact advantage ``A_t = Q(s_t, a_t) - V(s_t)`` of the task's ground truth:
  RMSE, Spearman rank correlation, sign accuracy on turns with ``A_t != 0``, the share of the
  credit mass ``sum |c_t|`` that lands on turns whose true advantage is 0, and the share that
  lands on decisive turns.
* **Gradient validity** — *does it push the policy the right way?* A policy-gradient estimator is
  unchanged in expectation by any per-state baseline ``b(s)``, so an output may be far from the
  advantage and still a good gradient. Two baseline-invariant scores: the **shift-invariant error**
  (RMSE of ``c - A`` after removing, state by state, the best constant: the per-state mean of the
  residual) and the **cosine** between the policy gradients that ``c`` and ``A`` induce in the
  logit space of a tabular softmax policy over (state, action):
  ``g[s, a] = sum_{t: s_t = s} c_t (1[a_t = a] - pi(a | s))``. With ``pi`` the batch's empirical
  action distribution at each state (the default) ``g`` is exactly invariant to per-state shifts
  of ``c``; a task that computes the policy's action probabilities passes them instead. The
  **variance across batches** of that gradient (relative to its squared mean norm) completes it.

All functions take flat per-turn tensors (N turns of a batch or of many batches) and are
vectorized; :func:`turn_table` builds them from a batch, its tensors and a method's advantages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from stages.schema import Batch, BatchTensors, turn_credit, turn_key_ids

#: a true advantage with ``|A| <= ZERO_EPS`` counts as zero (routine turns of bifurcation tasks)
ZERO_EPS = 1e-9


def rankdata(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (1-based, ties share their mean rank), like ``scipy.stats.rankdata``."""
    n = x.numel()
    if n == 0:
        return x.clone().double()
    sorted_x, order = torch.sort(x)
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)
    starts = ends - counts.to(torch.float64) + 1
    avg = (starts + ends) / 2
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = avg[inverse]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation; nan when either side is constant or fewer than 2 points."""
    if a.numel() < 2:
        return float("nan")
    ra, rb = rankdata(a.double()), rankdata(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = torch.sqrt((ra * ra).sum() * (rb * rb).sum())
    if float(denom) == 0.0:
        return float("nan")
    return float((ra * rb).sum() / denom)


def _share(part: torch.Tensor, total: torch.Tensor) -> float:
    t = float(total)
    return float(part) / t if t > 0 else float("nan")


def identification(credit: torch.Tensor, advantage: torch.Tensor,
                   decisive: Optional[torch.Tensor] = None) -> dict[str, float]:
    """Is the credit an advantage? ``credit`` and ``advantage`` are (N,) per-turn; ``decisive`` (N,) bool.

    Returns ``rmse``, ``spearman``, ``sign_accuracy`` (over turns with a non-zero true advantage;
    a credit of exactly 0 there counts as wrong), ``zero_advantage_mass`` (share of ``sum |c|`` on
    turns whose true advantage is 0) and, with ``decisive``, ``decisive_share`` (share of
    ``sum |c|`` on decisive turns). nan where a quantity is undefined (no turns, no mass).
    """
    c, a = credit.double().flatten(), advantage.double().flatten()
    if c.shape != a.shape:
        raise ValueError(f"identification: credit has {c.numel()} turns, advantage {a.numel()}")
    out: dict[str, float] = {}
    out["rmse"] = float(torch.sqrt(((c - a) ** 2).mean())) if c.numel() else float("nan")
    out["spearman"] = spearman(c, a)
    nz = a.abs() > ZERO_EPS
    out["sign_accuracy"] = float((torch.sign(c[nz]) == torch.sign(a[nz])).double().mean()) if bool(nz.any()) else float("nan")
    mass = c.abs()
    out["zero_advantage_mass"] = _share(mass[~nz].sum(), mass.sum())
    if decisive is not None:
        out["decisive_share"] = _share(mass[decisive.flatten().bool()].sum(), mass.sum())
    return out


def _dense_ids(ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    uniq, inv = torch.unique(ids.flatten(), return_inverse=True)
    return inv, int(uniq.numel())


def split_halves(group: torch.Tensor) -> torch.Tensor:
    """(B,) 0/1: alternate rows of each group (in row order) between two half-batches, so that both
    halves hold rollouts of every task instance and visit the same states. The gradient variance
    compares the two halves' gradients: batches that are whole groups visit disjoint states (each
    group is its own task instance), their gradients are orthogonal, and the variance would read
    ``G - 1`` for any credit at all."""
    gid, _ = _dense_ids(group)
    order = torch.argsort(gid, stable=True)
    sorted_g = gid[order]
    rank = torch.empty_like(gid)
    rank[order] = torch.arange(gid.numel()) - torch.searchsorted(sorted_g, sorted_g)
    return rank % 2


def shift_invariant_error(credit: torch.Tensor, advantage: torch.Tensor, state: torch.Tensor) -> float:
    """RMSE of ``credit - advantage`` after removing the best per-state constant ``b(s)``.

    ``min_b sum_t (c_t - b(s_t) - A_t)^2`` is reached at ``b(s)`` = the mean residual at ``s``, so
    this is the RMSE of the residual demeaned within each state (``state``: (N,) integer ids).
    """
    r = (credit.double() - advantage.double()).flatten()
    if r.numel() == 0:
        return float("nan")
    sid, S = _dense_ids(state)
    sums = torch.zeros(S, dtype=torch.float64).index_add_(0, sid, r)
    counts = torch.zeros(S, dtype=torch.float64).index_add_(0, sid, torch.ones_like(r))
    resid = r - (sums / counts)[sid]
    return float(torch.sqrt((resid ** 2).mean()))


def policy_gradient(credit: torch.Tensor, state: torch.Tensor, action: torch.Tensor,
                    num_states: int, num_actions: int, probs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Logit-space policy gradient of a tabular softmax policy: (num_states, num_actions).

    ``g[s, a] = sum_{t: s_t = s} c_t (1[a_t = a] - pi(a | s))`` for turns with ids ``state``,
    ``action`` (N,) long in ``[0, num_states)``, ``[0, num_actions)``. ``probs`` (num_states,
    num_actions) is ``pi``; by default the empirical action distribution of the given turns at each
    state, which makes ``g`` exactly invariant to adding any ``b(s)`` to the credit.
    """
    c = credit.double().flatten()
    s, a = state.flatten().long(), action.flatten().long()
    flat = s * num_actions + a
    taken = torch.zeros(num_states * num_actions, dtype=torch.float64).index_add_(0, flat, c)
    taken = taken.view(num_states, num_actions)
    if probs is None:
        counts = torch.zeros(num_states * num_actions, dtype=torch.float64).index_add_(
            0, flat, torch.ones_like(c)).view(num_states, num_actions)
        probs = counts / counts.sum(1, keepdim=True).clamp(min=1)
    per_state = torch.zeros(num_states, dtype=torch.float64).index_add_(0, s, c)
    return taken - probs.double() * per_state[:, None]


def cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    """Cosine similarity of two flattened tensors; nan if either is the zero vector."""
    x, y = x.double().flatten(), y.double().flatten()
    d = float(torch.linalg.vector_norm(x) * torch.linalg.vector_norm(y))
    return float(x @ y) / d if d > 0 else float("nan")


def gradient_validity(credit: torch.Tensor, advantage: torch.Tensor, state: torch.Tensor, action: torch.Tensor,
                      batch: Optional[torch.Tensor] = None, probs: Optional[torch.Tensor] = None) -> dict[str, float]:
    """Does the credit push the policy the right way? Per-turn (N,) inputs; ``batch`` (N,) batch ids.

    Returns ``shift_invariant_rmse`` (:func:`shift_invariant_error`), ``gradient_cosine`` between
    the gradients the credit and the true advantage induce (:func:`policy_gradient`, summed over
    all turns) and, with ``batch`` ids of at least 2 batches, ``gradient_variance``: the mean
    squared distance of each batch's (per-turn averaged) gradient from their mean, divided by the
    squared norm of the mean, and ``gradient_cosine_mean``: the mean per-batch cosine to the
    oracle's gradient of the same batch.
    """
    sid, S = _dense_ids(state)
    aid, A = _dense_ids(action)
    out = {"shift_invariant_rmse": shift_invariant_error(credit, advantage, sid)}
    g_c = policy_gradient(credit, sid, aid, S, A, probs)
    g_a = policy_gradient(advantage, sid, aid, S, A, probs)
    out["gradient_cosine"] = cosine(g_c, g_a)
    if batch is not None:
        bid, nb = _dense_ids(batch)
        if nb >= 2:
            # per-batch gradients in one pass: batches become a leading axis of the state ids
            g_cb = policy_gradient(credit, bid * S + sid, aid, nb * S, A, None if probs is None else probs.repeat(nb, 1))
            g_ab = policy_gradient(advantage, bid * S + sid, aid, nb * S, A, None if probs is None else probs.repeat(nb, 1))
            n_b = torch.zeros(nb, dtype=torch.float64).index_add_(0, bid, torch.ones_like(bid, dtype=torch.float64))
            g_cb = g_cb.view(nb, S * A) / n_b[:, None]
            g_ab = g_ab.view(nb, S * A)
            mean = g_cb.mean(0)
            denom = float(mean @ mean)
            spread = float(((g_cb - mean) ** 2).sum(1).mean())
            out["gradient_variance"] = spread / denom if denom > 0 else float("nan")
            num = (g_cb * g_ab).sum(1)
            den = torch.linalg.vector_norm(g_cb, dim=1) * torch.linalg.vector_norm(g_ab, dim=1)
            ok = den > 0
            out["gradient_cosine_mean"] = float((num[ok] / den[ok]).mean()) if bool(ok.any()) else float("nan")
    return out


def gap_closed(value: float, baseline: float, oracle: float) -> float:
    """Share of the baseline → oracle gap a method closes: ``(value - baseline) / (oracle - baseline)``.

    1 = as good as the oracle, 0 = no better than the baseline (GRPO), negative = worse; nan when
    the oracle is no better than the baseline (no gap to close) or any input is not finite."""
    if not all(math.isfinite(x) for x in (value, baseline, oracle)) or oracle <= baseline:
        return float("nan")
    return (value - baseline) / (oracle - baseline)


@dataclass
class TurnTable:
    """Flat per-turn view of a batch with ground truth: every tensor is (N,) over the N turns
    that have both a credit (policy tokens) and a true advantage."""

    credit: torch.Tensor
    advantage: torch.Tensor
    decisive: torch.Tensor
    state: torch.Tensor
    action: torch.Tensor
    row: torch.Tensor


def turn_table(batch: Batch, tensors: BatchTensors, advantages: torch.Tensor) -> TurnTable:
    """Per-turn credit (mean advantage over the turn's policy tokens) next to the exact advantage,
    the state key and the parsed action of each turn (ids dense within the batch; an invalid
    action gets its own id). Raises if the batch carries no ground truth."""
    if tensors.gt_turn_advantage is None:
        raise ValueError("turn_table: the batch has no ground-truth credit (not a benchmark task)")
    gt = tensors.gt_turn_advantage
    tc = turn_credit(advantages.double(), tensors.turn_ids, gt.shape[1])
    K = gt.shape[1]
    sid = turn_key_ids(batch, K)  # string keys -> ids (data preparation, not a hot path)
    aid = turn_key_ids(batch, K, key=lambda turn: turn.action)
    valid = ~torch.isnan(tc) & ~torch.isnan(gt.double()) & (sid >= 0)
    rows = torch.arange(len(batch.trajectories))[:, None].expand(-1, K)
    return TurnTable(credit=tc[valid], advantage=gt.double()[valid], decisive=tensors.decisive[valid],
                     state=sid[valid], action=aid[valid], row=rows[valid])
