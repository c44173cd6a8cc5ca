"""SCRIBE (Jiang and Ferraro 2026, "SCRIBE: Structured Mid-Level Supervision for Tool-Using Language
Models", arXiv 2601.03555; survey §5.7, Appendix B row 39, a CA-adjacent enabler): credit at the
mid level between tokens and episodes, by matching each step to a library of skill prototypes.

* :func:`step_mean_features` — each step's feature: the policy's last-layer hidden states mean-pooled
  over the step's action tokens (read from ``ctx.hidden_states``); the library centres it on its
  running mean feature and scales it to unit norm (:meth:`SkillLibrary.embed`);
* :func:`spherical_kmeans` — seeded k-means under cosine similarity (farthest-point init, Lloyd
  steps as segment reductions);
* :class:`SkillLibrary` — the bounded library: ``num_prototypes`` unit prototypes, each with a value,
  kept in registered buffers (saved with every policy checkpoint, restored on resume);
* :class:`SCRIBE` — the credit method: a step's reward is ``fit x value`` of its nearest prototype,
  centred on the group's pooled mean over its matched steps and added to GRPO's outcome advantage.

Vectorized over rows, steps and tokens; the only Python loops are k-means iterations and the
farthest-point initialisation over the (small, fixed) number of new prototypes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from stages.config_fields import param
from stages.credit import functional as F
from stages.credit.base import CreditConfig, CreditContext, CreditMethod, check_hidden
from stages.credit.group_stats import pooled_turn_normalize
from stages.credit.registry import register_method
from stages.credit.reverse_scan import reverse_discounted_scan
from stages.credit.segments import Segments, broadcast, policy_token_mask, segment_rewards, step_segments
from stages.schema import Batch, BatchTensors, CreditResult


def step_mean_features(hidden: torch.Tensor, seg: Segments) -> torch.Tensor:
    """(B, R, H) hidden states -> (B, K, H): the mean of each step's hidden states over its policy
    tokens; 0 for absent steps."""
    B, R, H = hidden.shape
    inside = (seg.seg_id >= 0).unsqueeze(-1).to(torch.float32)
    idx = seg.seg_id.clamp(min=0).unsqueeze(-1).expand(B, R, H)
    sums = torch.zeros(B, seg.K, H).scatter_add_(1, idx, hidden.float() * inside)
    counts = torch.zeros(B, seg.K).scatter_add_(1, seg.seg_id.clamp(min=0), inside.squeeze(-1))
    return sums / counts.clamp(min=1).unsqueeze(-1) * seg.present.unsqueeze(-1).to(torch.float32)


def nearest(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H) unit points, (M, H) unit centroids -> ((N,) cosine to the nearest centroid, (N,) its
    index). M = 0: fit -inf, index 0."""
    if centroids.shape[0] == 0:
        return torch.full((x.shape[0],), -float("inf")), torch.zeros(x.shape[0], dtype=torch.long)
    fit, idx = (x @ centroids.T).max(-1)
    return fit, idx


def spherical_kmeans(x: torch.Tensor, m: int, iters: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded k-means of unit points ``x`` (N, H) under cosine similarity into ``min(m, N)``
    clusters (fewer when points coincide). Init: a seeded random first centroid, then the point farthest (lowest max cosine) from
    the chosen ones, repeatedly (farthest-point init: deterministic given the seed). Lloyd steps:
    assign each point to its most similar centroid; a centroid becomes the normalised mean of its
    points (an empty cluster keeps its centroid); stops when no assignment changes or after
    ``iters`` steps. Returns (centroids (m', H), assignment (N,))."""
    n = x.shape[0]
    m = min(m, n)
    if m == 0:
        return x.new_zeros((0, x.shape[-1])), torch.zeros(n, dtype=torch.long)
    gen = torch.Generator().manual_seed(int(seed))
    chosen = [int(torch.randint(n, (1,), generator=gen))]
    best = x @ x[chosen[0]]
    for _ in range(m - 1):  # over the new centroids (m is small and fixed), not over points
        if float(best.min()) > 1.0 - 1e-6:  # every point coincides with a chosen one: no duplicate centroids
            break
        chosen.append(int(best.argmin()))
        best = torch.maximum(best, x @ x[chosen[-1]])
    c = x[chosen].clone()
    m = len(chosen)
    assign = (x @ c.T).argmax(-1)
    for _ in range(iters):  # Lloyd iterations
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.zeros(m).index_add_(0, assign, torch.ones(n))
        c = torch.where(counts.unsqueeze(-1) > 0, nn.functional.normalize(sums, dim=-1), c)
        new = (x @ c.T).argmax(-1)
        if torch.equal(new, assign):
            break
        assign = new
    return c, assign


def group_means(values: torch.Tensor, idx: torch.Tensor, keep: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``values`` (N,) or (N, H) per index in ``0..m-1`` over the entries with ``keep``:
    (mean (m,) / (m, H), count (m,)); mean 0 where count is 0."""
    w = keep.to(torch.float32)
    count = torch.zeros(m).index_add_(0, idx, w)
    wv = values.float() * (w.unsqueeze(-1) if values.dim() == 2 else w)
    total = torch.zeros((m,) + tuple(values.shape[1:])).index_add_(0, idx, wv)
    denom = count.clamp(min=1).unsqueeze(-1) if values.dim() == 2 else count.clamp(min=1)
    return total / denom, count


class SkillLibrary(nn.Module):
    """A bounded library of skill prototypes in registered buffers (its whole state is a
    ``state_dict``: saved in every policy checkpoint as ``helper.skills.safetensors``).

    ``prototypes`` (M, H) unit vectors (rows ``0..size-1`` in use), ``value`` (M,) each prototype's
    expected return-to-go, ``mass`` (M,) how many steps have matched it in all, ``center`` (H,) the
    running mean of the raw step features (EMA over merged batches; the first batch sets it),
    ``size`` and ``updates`` (batches merged) scalars.

    Centring: a policy's hidden states share a dominant direction, so raw mean-pooled features
    of different actions have cosines near 1 and every step would fit every prototype; the cosine
    geometry is taken after subtracting ``center`` (``centered=False``: raw features)."""

    def __init__(self, hidden_size: int, capacity: int, centered: bool = True):
        super().__init__()
        self.centered = centered
        self.register_buffer("center", torch.zeros(hidden_size))
        self.register_buffer("prototypes", torch.zeros(capacity, hidden_size))
        self.register_buffer("value", torch.zeros(capacity))
        self.register_buffer("mass", torch.zeros(capacity))
        self.register_buffer("size", torch.zeros((), dtype=torch.long))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @property
    def capacity(self) -> int:
        return int(self.value.shape[0])

    def embed(self, raw: torch.Tensor) -> torch.Tensor:
        """(..., H) raw step features -> unit vectors after centring on ``center``."""
        return nn.functional.normalize(raw.float() - self.center if self.centered else raw.float(), dim=-1)

    def active(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(prototypes (size, H), value (size,)) of the prototypes in use."""
        n = int(self.size)
        return self.prototypes[:n], self.value[:n]

    @torch.no_grad()
    def merge(self, raw: torch.Tensor, returns: torch.Tensor, success: torch.Tensor, threshold: float,
              ema: float, iters: int, seed: int) -> dict[str, float]:
        """Merge one batch of steps: raw features ``raw`` (N, H) (:func:`step_mean_features`), their
        ``returns`` (N,) (return-to-go) and ``success`` (N,) bool (the step belongs to a successful
        episode).

        0. ``center`` moves by EMA toward the batch's mean raw feature (the first batch sets it);
           the steps are embedded with it (:meth:`embed`).

        1. Successful steps that fit an existing prototype (cosine >= ``threshold``) move it by EMA:
           ``p <- normalise((1 - ema) p + ema * mean of its matched successful steps)``.
        2. Successful steps that fit none are clustered (:func:`spherical_kmeans`) into at most the
           free slots; the centroids become new prototypes (the rest are dropped: the library is full).
        3. Values: every step (successful or not) fitting a prototype contributes its return; an old
           prototype's value moves by EMA toward the mean, a new one takes the mean (or, matched by
           no step, the mean return of its cluster's members)."""
        if raw.shape[0]:
            mean_raw = raw.float().mean(0)
            self.center.copy_(mean_raw if int(self.updates) == 0 else (1 - ema) * self.center + ema * mean_raw)
        features = self.embed(raw)
        n0 = int(self.size)
        p_old = self.prototypes[:n0]
        fit, idx = nearest(features, p_old)
        hit = (fit >= threshold) & success
        mean_x, cnt = group_means(features, idx, hit, max(n0, 1))
        if n0:
            moved = nn.functional.normalize((1 - ema) * p_old + ema * mean_x[:n0], dim=-1)
            self.prototypes[:n0] = torch.where(cnt[:n0].unsqueeze(-1) > 0, moved, p_old)
        free = self.capacity - n0
        miss = success & ~(fit >= threshold)
        new_c, member = spherical_kmeans(features[miss], free, iters, seed)
        n_new = int(new_c.shape[0])
        if n_new:
            self.prototypes[n0:n0 + n_new] = new_c
            self.size.fill_(n0 + n_new)
        n1 = int(self.size)
        fit1, idx1 = nearest(features, self.prototypes[:n1])
        matched = fit1 >= threshold
        v_batch, v_cnt = group_means(returns, idx1, matched, max(n1, 1))
        v_batch, v_cnt = v_batch[:n1], v_cnt[:n1]
        old = torch.arange(n1) < n0
        ema_v = torch.where(v_cnt > 0, (1 - ema) * self.value[:n1] + ema * v_batch, self.value[:n1])
        if n_new:
            members, _ = group_means(returns[miss], member, torch.ones_like(member, dtype=torch.bool), n_new)
            first = torch.cat([torch.zeros(n0), members])
            ema_v = torch.where(old, ema_v, torch.where(v_cnt > 0, v_batch, first))
        self.value[:n1] = ema_v
        self.mass[:n1] += v_cnt
        self.updates.add_(1)
        return {"skills_library_size": float(n1), "skills_new_prototypes": float(n_new),
                "skills_dropped_success_steps": float(int(miss.sum())) if free == 0 else 0.0,
                "skills_merge_matched_fraction": float(matched.float().mean()) if matched.numel() else 0.0}


@dataclass
class SCRIBEConfig(CreditConfig):
    method: str = param("scribe", help="credit-assignment method (registry name; SCRIBE, Jiang and Ferraro 2026)")
    num_prototypes: int = param(16, help="capacity of the skill-prototype library (SCRIBE's curated library of skill prototypes; here learned from successful steps, bounded, persisted with every checkpoint)", ge=1)
    alpha: float = param(1.0, help="weight of the prototype-fit step advantage added to GRPO's outcome advantage (SCRIBE combines the mid-level skill reward with the outcome reward); 0 = GRPO", ge=0)
    center_features: bool = param(True, help="cosine geometry after subtracting the library's running mean step feature (the hidden states of a policy share a dominant direction: raw features of different actions have cosines near 1); false: raw mean-pooled features")
    step_norm_by_std: bool = param(False, help="divide the step rewards' deviation from the group's pooled mean by its std (turn-level GRPO); false: centred only, so a small spread of prototype values stays a small credit")
    fit_threshold: float = param(0.5, help="cosine similarity a step needs to its nearest prototype to be routed to it (SCRIBE's router); below it the step gets only the outcome advantage", ge=-1, le=1)
    ema: float = param(0.2, help="EMA rate of a prototype's centroid and value toward each new batch's matched steps", gt=0, le=1)
    kmeans_iters: int = param(20, help="at most this many Lloyd steps of the seeded spherical k-means that turns unmatched successful steps into new prototypes", ge=1)
    norm_adv_by_std: bool = param(True, help="outcome advantage divided by the group std (GRPO; false: Dr. GRPO)")
    epsilon: float = param(1e-6, help="added to the group std (GRPO and the step-reward normalisation)", ge=0)


@register_method
class SCRIBE(CreditMethod):
    """SCRIBE (Jiang and Ferraro 2026, arXiv 2601.03555; survey §5.7, Appendix B row 39).

    What we read: the survey's paragraph (a library of "skill prototypes", templates of common
    agentic sub-tasks with expected reward characteristics; each action is matched to its nearest
    prototype and credited by how well it fulfils the prototype's expected behaviour: credit at a
    level between tokens and trajectories) and the paper's abstract (Skill-Conditioned Reward with
    Intermediate Behavioral Evaluation: a *curated* library of skill prototypes; a Router maps each
    subgoal to a prototype, whose checklist rubric turns an LLM judge's open-ended evaluation into a
    constrained verification, reducing reward variance; the mid-level reward joins the outcome reward
    in RL). What we could not read: the paper's body (its reward formula, the weight of the
    mid-level reward against the outcome, the router's training, the prototype list).

    Here, with no curated rubrics or judge, the library is *learned* from the run's own successful
    steps and the "expected reward characteristics" of a prototype are its value::

        f_k       = normalise(mean of the policy's hidden states over step k's action tokens)
        j_k, s_k  = argmax_j cos(f_k, p_j), max_j cos(f_k, p_j)          (the router; fit s_k)
        r_k       = s_k * v_{j_k}        if s_k >= fit_threshold, else no step reward
        A_k       = A_GRPO + alpha * (r_k - mean_g)                       (matched steps)
        A_k       = A_GRPO                                                (unmatched steps)

    (``f_k`` is centred on the library's running mean feature before the normalisation,
    ``credit.center_features``; ``credit.step_norm_by_std`` divides ``r_k - mean_g`` by ``std_g + eps``,
    turn-level GRPO: off by default, because with near-equal prototype values it blows a tiny spread
    up to unit-size credit — in the first reduced benchmark run it did, and the policy collapsed.)
    ``mean_g``, ``std_g`` pool the matched steps of a group's trajectories
    (:func:`~stages.credit.group_stats.pooled_turn_normalize`). Steps are ``Trajectory.step_spans``
    where a family declares them, else turns (:func:`~stages.credit.segments.step_segments`).

    The library (:class:`SkillLibrary`) persists across iterations: the credit stage scores the batch
    with it as it stands (built from the earlier iterations) and records the batch's raw step features,
    returns-to-go and success (``CreditResult.helper_inputs``); the update stage merges them
    (:meth:`SkillLibrary.merge`: EMA of matched prototypes, seeded k-means of the unmatched
    successful steps into the free slots, EMA of the values from every matched step), and the
    library is saved in every checkpoint (``helper.skills.safetensors``). With an empty library (the
    first iteration) or ``alpha = 0`` the method is GRPO exactly.

    Simplified: prototypes are learned centroids of successful steps' hidden-state features, not a
    curated library of named skills with rubrics; the fit is a cosine similarity (not an LLM judge's
    verification against a checklist) and the prototype's value is the mean return-to-go of the
    steps routed to it; the router is nearest-prototype (not a trained model); a full library drops
    new unmatched skills instead of curating. Overhead: one forward pass over the batch for the
    hidden states (the provider counts its tokens); the library is tiny (M x H floats).
    """

    name = "scribe"
    Config = SCRIBEConfig
    granularity = "step"
    methodology = "Skill-prototype"
    needs = frozenset({"hidden_states"})
    needs_group = True
    reference = ("Jiang and Ferraro 2026 (SCRIBE: skill-prototype library, mid-level credit by prototype fit, "
                 "arXiv 2601.03555); survey §5.7")

    def __init__(self, cfg: CreditConfig):
        super().__init__(cfg)
        self.library: Optional[SkillLibrary] = None

    def build_helpers(self, hidden_size: int, seed: int) -> None:
        cfg: SCRIBEConfig = self.cfg  # type: ignore[assignment]
        self.library = SkillLibrary(hidden_size, cfg.num_prototypes, cfg.center_features)

    def helper_modules(self) -> dict[str, nn.Module]:
        return {"skills": self.library} if self.library is not None else {}

    def update_helpers(self, credit: CreditResult, seed: int) -> dict[str, float]:
        cfg: SCRIBEConfig = self.cfg  # type: ignore[assignment]
        x = credit.helper_inputs
        if self.library is None or "features" not in x:
            return {}
        return self.library.merge(x["features"], x["returns"], x["success"], cfg.fit_threshold, cfg.ema,
                                  cfg.kmeans_iters, seed)

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: SCRIBEConfig = self.cfg  # type: ignore[assignment]
        hidden = check_hidden(self.name, ctx.hidden_states, tensors)
        B = hidden.shape[0]
        if len(batch.trajectories) != B:
            raise ValueError(f"credit method 'scribe': needs the batch's trajectories (which steps succeeded), "
                             f"got {len(batch.trajectories)} for {B} rows")
        if self.library is None:
            self.build_helpers(int(hidden.shape[-1]), 0)
        assert self.library is not None
        mask = policy_token_mask(tensors)
        seg = step_segments(tensors, batch)
        p = seg.present
        raw = step_mean_features(hidden, seg)
        feats = self.library.embed(raw) * p.unsqueeze(-1).to(torch.float32)
        protos, values = self.library.active()
        fit, j = nearest(feats.reshape(-1, feats.shape[-1]), protos)
        fit, j = fit.reshape(p.shape), j.reshape(p.shape)
        matched = p & (fit >= cfg.fit_threshold)
        v_j = values[j] if len(values) else torch.zeros_like(fit)
        r = torch.where(matched, fit * v_j, torch.zeros_like(fit))
        step_adv = pooled_turn_normalize(r, matched, tensors.index, cfg.epsilon, scale=cfg.step_norm_by_std)
        rewards = tensors.token_level_rewards.float()
        episode = F._grpo_scalars(rewards, mask, tensors.index, cfg.epsilon, cfg.norm_adv_by_std)  # (B,)
        adv = episode.unsqueeze(1) * mask + cfg.alpha * broadcast(step_adv, seg, mask)
        returns = reverse_discounted_scan(segment_rewards(tensors, seg).float() * p, 1.0) * p
        success = torch.tensor([bool(t.success) for t in batch.trajectories]).unsqueeze(1).expand_as(p)
        n = max(int(p.sum()), 1)
        stats = {"library_size": float(len(values)), "matched_step_fraction": float(matched.sum()) / n,
                 "fit_mean": float(fit[matched].mean()) if bool(matched.any()) else 0.0,
                 "step_reward_mean": float(r[matched].mean()) if bool(matched.any()) else 0.0,
                 "prototype_value_mean": float(values.mean()) if len(values) else 0.0,
                 "steps_per_trajectory": float(p.sum(-1).float().mean())}
        helper_inputs = {"features": raw[p], "returns": returns[p], "success": success[p]}
        return CreditResult(advantages=adv, granularity="step", credit=step_adv, returns=adv, stats=stats,
                            helper_inputs=helper_inputs)
