"""RED: redistribution of a holistic reward by incremental prefix scores (Li et al. 2024; survey §3.1.2).

RED turns a sequence-level ("holistic") reward into dense rewards by reading a reward/value
model on every prefix: the reward of unit ``t`` is the score increase it causes,
``d_t = score(prefix_<=t) - score(prefix_<t)`` (the RUDDER idea, survey §2.5). The paper probes
an RLHF reward model token by token; here the prefix scores come from a configured process-reward
source that *scores prefixes* (``ctx.process_rewards``; default ``mc``: the MC value of the prefix
through step k, estimated by policy continuations; or ``prm``: a PRM trained here read on the
prefix). ``step_check`` is refused at config time: it is a per-step correctness bit, not a prefix
score — on a failed trajectory with step checks 1,0,1,0 its increments would give the correct
third step, *after* the error, the largest credit. The redistribution is at **step** granularity
(steps: ``Trajectory.step_spans``, else turns; the provider's k-th non-nan score of a row is read
as the score of the prefix ending with that row's k-th step). Simplified from the paper: step
(not token) units, and the prefix scorer is an MC value estimate or a PRM rather than the RLHF
reward model of the paper.

* Score of the empty prefix (``empty_score``): ``group_mean`` — the group's mean holistic reward,
  an MC estimate of the prompt's value (right when the process rewards are values / success
  probabilities); ``first_step`` — the first step's own score (the first increment is 0; no
  assumption on the scale); ``zero``.
* Return equivalence: the increments telescope to ``score(last) - score(empty)``, which need not
  equal the holistic reward ``R``. ``rescale=shift`` adds the same ``(R - sum d) / n`` to every
  step (always defined; keeps the increments' differences, so a larger score increase always
  gets more credit; equal increments give the uniform ``R / n``); ``rescale=scale`` multiplies
  by ``R / sum d`` (proportional; falls back to ``shift`` when ``|sum d| < 1e-8`` or the factor
  would flip signs, i.e. ``R * sum d < 0``). Either way the redistributed rewards of a
  trajectory sum exactly to ``R``.
* Advantages (critic-free): step ``k`` gets ``(n * r_k - mean_g R) / (std_g R + eps)`` — its
  redistributed reward in episode units minus the group baseline; the mean over a trajectory's
  steps is GRPO's advantage and a uniform redistribution is exactly GRPO
  (:func:`group_episode_advantages`).

Native credit: the (B, K) redistributed step rewards (nan for absent steps). Overhead: the
provider's (e.g. MC continuations or PRM forward passes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stages.credit.group_stats import group_stats
from stages.credit.base import CreditConfig, CreditContext, CreditMethod
from stages.credit.registry import register_method
from stages.credit.segments import Segments, broadcast, step_segments
from stages.reward.process import SOURCES, ProcessRewardConfig, prefix_scores, require_prefix_scores
from stages.schema import Batch, BatchTensors, CreditResult, Overhead
from stages.config_fields import param


def group_episode_advantages(
    step_rewards: torch.Tensor, present: torch.Tensor, index: torch.Tensor, norm_adv_by_std: bool, epsilon: float
) -> torch.Tensor:
    """Per-step advantages from per-step (redistributed) rewards that sum to the episode return:
    ``A_ik = (n_i * r_ik - mean_g R) / (std_g R + eps)`` with ``R_i = sum_k r_ik`` and ``n_i``
    the number of steps. ``n_i * r_ik`` is step k's reward in episode units, so the mean over a
    trajectory's steps is exactly GRPO's advantage and an equal redistribution reduces to GRPO;
    singleton groups use mean 0 and std 1 (verl's rule). Absent steps: nan."""
    r = torch.where(present, step_rewards, torch.zeros_like(step_rewards))
    ret = r.sum(-1)
    _, mean, std, _ = group_stats(ret, index, with_std=True)
    n = present.sum(-1, keepdim=True).to(r.dtype)
    adv = n * r - mean.unsqueeze(-1)
    if norm_adv_by_std:
        adv = adv / (std.unsqueeze(-1) + epsilon)
    return torch.where(present, adv, torch.full_like(adv, float("nan")))


def align_step_scores(scores: torch.Tensor, seg: Segments, name: str) -> torch.Tensor:
    """Left-pack each row's non-nan scores to (B, K) and check one score per step."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    B, K = seg.present.shape
    if scores.dim() != 2 or scores.shape[0] != B:
        raise ValueError(f"credit method {name!r}: process_rewards must be (B={B}, K) float, got shape {tuple(scores.shape)}")
    valid = ~torch.isnan(scores)
    bad = (valid & ~torch.isfinite(scores)).nonzero()
    if bad.numel():
        i, k = bad[0].tolist()
        raise ValueError(f"credit method {name!r}: process_rewards[{i}, {k}] must be finite or nan, got {scores[i, k].item()!r}")
    n = valid.sum(-1)
    wrong = (n != seg.count).nonzero()
    if wrong.numel():
        i = int(wrong[0])
        raise ValueError(
            f"credit method {name!r}: process_rewards row {i} has {int(n[i])} step scores but the "
            f"trajectory has {int(seg.count[i])} steps"
        )
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)  # non-nan first, in order
    packed = scores.gather(1, order)
    out = torch.full((B, K), float("nan"), dtype=torch.float64)
    w = min(K, packed.shape[1])
    out[:, :w] = packed[:, :w]
    return torch.where(seg.present, out, torch.full_like(out, float("nan")))


def redistribute(
    scores: torch.Tensor, present: torch.Tensor, holistic: torch.Tensor, empty: torch.Tensor, rescale: str
) -> torch.Tensor:
    """Step rewards from prefix scores (B, K) summing exactly to ``holistic`` (B,): increments
    ``d_k = s_k - s_{k-1}`` (``s_{-1} = empty``), then return-equivalent rescaling."""
    s = torch.where(present, scores, torch.zeros_like(scores))
    prev = torch.cat([empty.unsqueeze(1), s[:, :-1]], dim=1)
    d = torch.where(present, s - prev, torch.zeros_like(s))
    total = d.sum(-1)
    n = present.sum(-1).clamp(min=1).to(d.dtype)
    shifted = d + ((holistic - total) / n).unsqueeze(1)
    if rescale == "scale":
        ok = (total.abs() >= 1e-8) & (holistic * total >= 0)
        scaled = d * (holistic / torch.where(ok, total, torch.ones_like(total))).unsqueeze(1)
        out = torch.where(ok.unsqueeze(1), scaled, shifted)
    elif rescale == "shift":
        out = shifted
    else:
        raise ValueError(f"rescale must be shift or scale, got {rescale!r}")
    return torch.where(present, out, torch.full_like(out, float("nan")))


@dataclass
class REDConfig(ProcessRewardConfig, CreditConfig):
    method: str = param("red", help="credit-assignment method (registry name; RED, Li et al. 2024)")
    process_reward: str = param("mc", help="prefix scorer: mc (MC value of the prefix, needs no trained artifact) | prm (a PRM's prefix score); step_check is refused (not a prefix score)", choices=SOURCES)
    empty_score: str = param("group_mean", help="score of the empty prefix: group_mean (mean holistic reward of the group), first_step, zero", choices=("group_mean", "first_step", "zero"))
    rescale: str = param("shift", help="return equivalence: shift (add (R - sum d)/n to each step) or scale (multiply by R / sum d) (Li et al. 2024)", choices=("shift", "scale"))
    norm_adv_by_std: bool = param(True, help="divide by the group std of the holistic reward (GRPO baseline, Shao et al. 2024)")
    epsilon: float = param(1e-6, help="added to the group std (GRPO)", ge=0)

    def check_prefix_source(self) -> None:
        """RED takes differences of scores of consecutive prefixes: refuse a source whose values
        are not prefix scores (stages.reward.process.SOURCE_KINDS), with the reason."""
        require_prefix_scores(self.process_reward, self.method)

    def config_rules(self):
        """Rules between fields (checked by stages.config_fields.check): a prefix-scoring source."""
        if not prefix_scores(self.process_reward):
            try:
                require_prefix_scores(self.process_reward, self.method)
            except ValueError as exc:
                yield "process_reward", str(exc)


@register_method
class RED(CreditMethod):
    """RED (Li et al. 2024, "Unleashing token-level rewards from holistic feedback via reward
    redistribution"; survey §3.1.2): dense step rewards from the increments of the process
    scores of successive prefixes, rescaled to sum exactly to the holistic reward; group
    baseline (module docstring)."""

    name = "red"
    Config = REDConfig
    granularity = "step"
    methodology = "Redistribution (incremental prefix scores)"
    needs = frozenset({"process_rewards"})
    reference = "Li et al. 2024 (RED: reward redistribution to token level); survey §3.1.2, Appendix B row 2"

    def __init__(self, cfg: REDConfig):
        super().__init__(cfg)
        cfg.check_prefix_source()  # at config time (the run builds its method before any compute)

    def checklist_note(self) -> str:
        from stages.reward.process import SOURCE_KINDS

        src = self.cfg.process_reward  # type: ignore[attr-defined]
        return f"prefix scores: process_reward={src} ({SOURCE_KINDS[src][1]})"

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: REDConfig = self.cfg  # type: ignore[assignment]
        assert ctx.process_rewards is not None  # CreditMethod.__call__ checked ``needs``
        seg = step_segments(tensors, batch)
        raw, overhead = ctx.process_rewards(batch)
        scores = align_step_scores(raw, seg, self.name)
        rewards = tensors.token_level_rewards
        rewards = rewards if rewards.is_floating_point() else rewards.float()
        mask = (tensors.response_mask != 0).to(rewards.dtype)
        holistic = (rewards * mask).sum(-1).double()
        if cfg.empty_score == "group_mean":
            count, mean, _, _ = group_stats(holistic, tensors.index, with_std=False)
            empty = torch.where(count > 1, mean, holistic)  # a singleton's group mean is itself
        elif cfg.empty_score == "first_step":
            empty = torch.nan_to_num(scores[:, 0], nan=0.0)
        else:
            empty = torch.zeros_like(holistic)
        step_rewards = redistribute(scores, seg.present, holistic, empty, cfg.rescale)
        unit_adv = group_episode_advantages(step_rewards, seg.present, tensors.index, cfg.norm_adv_by_std, cfg.epsilon)
        adv = broadcast(unit_adv, seg, mask).to(rewards.dtype)
        p = seg.present
        stats = {
            "prefix_source_is_prefix_score": float(getattr(ctx.process_rewards, "prefix_scores", True)),
            "process_score_mean": float(scores[p].mean()) if p.any() else 0.0,
            "redistributed_abs_mean": float(step_rewards[p].abs().mean()) if p.any() else 0.0,
        }
        return CreditResult(
            advantages=adv,
            granularity="step",
            credit=step_rewards.to(rewards.dtype),
            overhead=overhead if overhead is not None else Overhead(),
            stats=stats,
        )
