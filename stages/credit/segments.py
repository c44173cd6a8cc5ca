"""Steps and segments of a response, and moving credit between them and tokens (survey §2.4).

The credit of step-, segment- and turn-level methods lives on *units*: consecutive runs of a
response's policy tokens (the "Granularity" axis of the survey's taxonomy, §2.4). This module
is the one place that partitions responses into units and maps per-unit values back to tokens;
the methods share it rather than borrowing from each other's modules:

* :class:`Segments` — a partition of each row's policy tokens into units, with
  :func:`segments_from_ids` (from per-token unit ids), :func:`compact_ids` (renumber ids
  without gaps) and :func:`step_segments` (the reasoning steps: ``Trajectory.step_spans``, else
  the turns) — VinePPO's steps (§3.1.1), SPO's segments (§3.2), RED's and SCAR's steps (§3.1.2,
  §3.2);
* :func:`turn_segments` — the turns as units (turn-level MDP methods, §5.1); :func:`unit_ends`
  — each unit's last position; :func:`unit_sums`
  — token values summed per unit (ITPO's implicit turn rewards);
* :func:`segment_rewards` — the reward collected in each unit (the units of a row sum to its
  return);
* :func:`broadcast` — (B, K) unit values to the (B, R) tokens of each unit;
* :func:`steps_to_tokens` — (B, K) step values to tokens by ``BatchTensors.turn_ids`` (one step
  per turn: PURE, PRL, CAPO);
* :func:`policy_token_mask` — the (B, R) float mask of policy tokens.

Everything is vectorized over rows and tokens; shapes follow :class:`stages.schema.BatchTensors`
(B rows, R response positions, K units per row at most).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from stages.schema import Batch, BatchTensors


def policy_token_mask(tensors: BatchTensors) -> torch.Tensor:
    """(B, R) float32: 1.0 on the policy's tokens, 0.0 on observation and padding tokens."""
    return (tensors.response_mask != 0).float()


@dataclass
class Segments:
    """A partition of each response's policy tokens into consecutive units (steps / segments).

    ``seg_id`` (B, R) long: unit index of each policy token (0..count-1, increasing along the
    response), -1 on observation/padding tokens and policy tokens outside every unit;
    ``starts`` (B, K) long: response position of each unit's first token (-1 where absent);
    ``present`` (B, K) bool; ``count`` (B,) long: number of units of each row (units of a row are
    ``0..count-1``, no gaps).
    """

    seg_id: torch.Tensor
    starts: torch.Tensor
    present: torch.Tensor
    count: torch.Tensor

    @property
    def K(self) -> int:
        return int(self.present.shape[1])


def segments_from_ids(seg_id: torch.Tensor) -> Segments:
    """Starts / presence / counts of a compact ``seg_id`` (B, R) (ids 0..n-1 without gaps)."""
    B, R = seg_id.shape
    K = max(int(seg_id.max().item()) + 1 if seg_id.numel() else 0, 1)
    valid = seg_id >= 0
    idx = seg_id.clamp(min=0)
    pos = torch.arange(R, device=seg_id.device).expand(B, R)
    big = torch.full_like(pos, R)
    starts = torch.full((B, K), R, dtype=torch.long, device=seg_id.device)
    starts = starts.scatter_reduce(1, idx, torch.where(valid, pos, big), "amin")
    present = starts < R
    starts = torch.where(present, starts, torch.full_like(starts, -1))
    return Segments(seg_id=seg_id, starts=starts, present=present, count=present.sum(-1))


def compact_ids(raw: torch.Tensor) -> torch.Tensor:
    """Renumber per-row unit ids (-1 = none) to 0..n-1 in order, dropping empty ids (vectorized)."""
    B, R = raw.shape
    K = max(int(raw.max().item()) + 1 if raw.numel() else 0, 1)
    valid = raw >= 0
    hit = torch.zeros((B, K), dtype=torch.long, device=raw.device)
    hit.scatter_add_(1, raw.clamp(min=0), valid.long())
    new = (hit > 0).long().cumsum(-1) - 1
    out = new.gather(1, raw.clamp(min=0))
    return torch.where(valid, out, torch.full_like(out, -1))


def turn_segments(tensors: BatchTensors) -> Segments:
    """The turns of each response as units (the actions of the turn-level MDP: Turn-PPO, ITPO,
    SORL, survey §5.1): unit k is the k-th turn with policy tokens (``tensors.turn_ids``)."""
    mask = tensors.response_mask != 0
    raw = torch.where(mask, tensors.turn_ids, torch.full_like(tensors.turn_ids, -1))
    return segments_from_ids(compact_ids(raw))


def unit_ends(seg: Segments) -> torch.Tensor:
    """(B, K) response position of each unit's last token (-1 where absent): SPA-RL's turn-end
    features, POAD's inter-turn backup."""
    B, R = seg.seg_id.shape
    pos = torch.arange(R, device=seg.seg_id.device).expand(B, R)
    ends = torch.full((B, seg.K), -1, dtype=torch.long, device=seg.seg_id.device)
    ends = ends.scatter_reduce(1, seg.seg_id.clamp(min=0), torch.where(seg.seg_id >= 0, pos, -1), "amax")
    return torch.where(seg.present, ends, torch.full_like(ends, -1))


def unit_sums(values: torch.Tensor, seg: Segments) -> torch.Tensor:
    """(B, R) token values -> (B, K) sum over each unit's tokens (0 for absent units)."""
    vals = values.float() * (seg.seg_id >= 0).float()
    out = torch.zeros((values.shape[0], seg.K), dtype=vals.dtype, device=vals.device)
    return out.scatter_add_(1, seg.seg_id.clamp(min=0), vals)


def step_segments(tensors: BatchTensors, batch: Optional[Batch]) -> Segments:
    """The reasoning steps of each response: ``Trajectory.step_spans`` where a trajectory has
    them, else its turns' action spans (``tensors.turn_ids``; the math family's step = turn).

    Only policy tokens belong to a step. Spans must be sorted and non-overlapping.
    """
    mask = tensors.response_mask != 0
    B, R = mask.shape
    trajs = batch.trajectories if batch is not None else []
    if not any(t.step_spans for t in trajs):
        return turn_segments(tensors)
    if len(trajs) != B:
        raise ValueError(f"batch has {len(trajs)} trajectories but the tensors have {B} rows")
    spans: list[list[tuple[int, int]]] = []
    for t in trajs:  # reading the span lists (O(B*K) Python, like BatchTensors.from_batch)
        s = [tuple(x) for x in (t.step_spans or [turn.action_span for turn in t.turns])]
        s = [(a, b) for a, b in s if b > a]
        for j in range(1, len(s)):
            if s[j][0] < s[j - 1][1]:
                raise ValueError(f"trajectory {t.uid}: step_spans[{j}]={s[j]} overlaps or precedes step_spans[{j-1}]={s[j-1]}")
        spans.append(s)
    K = max(max((len(s) for s in spans), default=0), 1)
    starts = torch.full((B, K), R + 1, dtype=torch.long)
    ends = torch.zeros((B, K), dtype=torch.long)
    for i, s in enumerate(spans):
        if s:
            starts[i, : len(s)] = torch.tensor([a for a, _ in s])
            ends[i, : len(s)] = torch.tensor([b for _, b in s])
    pos = torch.arange(R).expand(B, R).contiguous()
    idx = torch.searchsorted(starts, pos, right=True) - 1  # last span starting at or before pos
    inside = (idx >= 0) & (pos < ends.gather(1, idx.clamp(min=0))) & mask
    raw = torch.where(inside, idx, torch.full_like(idx, -1)).to(tensors.turn_ids.device)
    return segments_from_ids(compact_ids(raw))


def segment_rewards(tensors: BatchTensors, seg: Segments) -> torch.Tensor:
    """(B, K) reward collected in each unit: every token reward goes to the last unit starting at
    or before it (rewards before the first unit go to unit 0), so a row's units sum to its
    return. Absent units are 0."""
    rewards = tensors.token_level_rewards
    rewards = rewards if rewards.is_floating_point() else rewards.float()
    ff = seg.seg_id.cummax(dim=1).values.clamp(min=0)  # seg ids increase along the row
    out = torch.zeros((rewards.shape[0], seg.K), dtype=rewards.dtype, device=rewards.device)
    return out.scatter_add_(1, ff, rewards)


def broadcast(unit_values: torch.Tensor, seg: Segments, mask: torch.Tensor) -> torch.Tensor:
    """(B, K) per-unit values -> (B, R) on the unit's tokens, 0 elsewhere (and where nan)."""
    vals = torch.nan_to_num(unit_values, nan=0.0)
    out = vals.gather(1, seg.seg_id.clamp(min=0))
    return out * (seg.seg_id >= 0).to(out.dtype) * (mask != 0).to(out.dtype)


def steps_to_tokens(step_values: torch.Tensor, turn_ids: torch.Tensor) -> torch.Tensor:
    """(B, K) step values -> (B, R): each policy token gets the value of its step (its turn,
    ``turn_ids``); 0 off-policy, beyond column K-1 and where the step value is nan."""
    K = step_values.shape[1]
    valid = (turn_ids >= 0) & (turn_ids < K)
    vals = torch.nan_to_num(step_values, nan=0.0)
    out = vals.gather(1, turn_ids.clamp(min=0, max=max(K - 1, 0)))
    return out * valid.to(out.dtype)


def parsed_turns(batch: Optional[Batch], rows: int, method: str) -> torch.Tensor:
    """(B, K) float: 1.0 where the environment parsed turn k's action (``Turn.action`` is set: the
    action was well-formed and executable), 0.0 where it was invalid and beyond a row's turns.
    Reading the turn lists is O(B*K) Python, like :meth:`stages.schema.BatchTensors.from_batch`
    (SPA-RL's grounding signal, PRS's format stage)."""
    trajs = batch.trajectories if batch is not None else []
    if len(trajs) != rows:
        raise ValueError(f"credit method {method!r}: needs the batch's turns (whether each action parsed), "
                         f"got {len(trajs)} trajectories for {rows} rows")
    K = max(max((len(t.turns) for t in trajs), default=0), 1)
    out = torch.zeros((rows, K))
    for i, t in enumerate(trajs):
        if t.turns:
            out[i, : len(t.turns)] = torch.tensor([float(turn.action is not None) for turn in t.turns])
    return out


def balanced_segments(scores: torch.Tensor, mask: torch.Tensor, num_segments: int) -> Segments:
    """Cut each row's policy tokens into ``min(num_segments, n_row)`` consecutive segments at the
    ``num_segments - 1`` highest-scoring *pivots* (a pivot token opens a new segment; the row's
    first policy token cannot be one), whatever the row's length: the segment count of a row is
    independent of its length (adaptive segment-level reward, Li et al. 2024b, survey §5.7).

    ``scores`` (B, R) float: the boundary signal of each token; ``mask`` (B, R): policy tokens.
    Ties (e.g. a flat signal) go first to the cut points of the equal-size split of the row, then
    to earlier positions, so a flat signal gives ``num_segments`` equal-size segments. Vectorized:
    three stable sorts (position, equal-split point, score), no loop over rows or tokens."""
    if num_segments < 1:
        raise ValueError(f"balanced_segments: num_segments must be >= 1, got {num_segments}")
    m = mask != 0
    B, R = m.shape
    q = m.long().cumsum(-1) - 1  # rank of each policy token in its row (0..n-1)
    n = m.long().sum(-1, keepdim=True)  # (B, 1)
    s = torch.minimum(torch.full_like(n, num_segments), n)  # segments of each row
    cand = m & (q >= 1)
    nn = n.clamp(min=1)
    even = cand & ((q * s) // nn > ((q - 1) * s) // nn)  # the equal-size split's s - 1 cut points
    key = torch.where(cand, torch.nan_to_num(scores.float(), nan=0.0), torch.full((B, R), -float("inf")))
    order = torch.arange(R).expand(B, R)
    order = order.gather(1, torch.sort((~even).long(), dim=1, stable=True).indices)  # equal-split points first
    order = order.gather(1, torch.sort(-key.gather(1, order), dim=1, stable=True).indices)  # then by score
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(R).expand(B, R).contiguous())
    pivot = cand & (rank < (s - 1))
    seg_id = torch.where(m, pivot.long().cumsum(-1), torch.full_like(q, -1))
    return segments_from_ids(seg_id)
