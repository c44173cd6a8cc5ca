"""Counterfactual turn credit by real replay: C3 and CCPO (survey §5, "difference rewards"; Appendix B).

Both methods ask "what would the outcome have been had this turn's action been different?" and
answer it by **really replaying** the episode: the environment is brought back to the state
the turn's action was taken in (snapshot/restore or reset + replay of the recorded turns, by the
``mc_rollouts`` provider, :class:`stages.rollout.continuations.MCContinuations`), a
counterfactual action is taken at that turn and the current policy plays the rest of the episode,
scored by the family's verifier. All returns are returns-to-go from the turn on (terminal reward
plus the rewards of that turn and the later ones), so earlier turns' rewards cancel.

The counterfactual action (``credit.counterfactual``):

* ``resample``: a fresh sample of the policy at the same context (the provider generates the turn
  anew): the k counterfactuals estimate ``V(s_t) = E_{a ~ pi}[Q(s_t, a)]``.
* ``default``: the family's declared default action text (``TaskFamily.default_action``; e.g.
  bifurcation's fixed letter ``A``), forced at the turn (as InT's intervention), then the policy
  continues: a difference reward against a fixed default action (Wolpert & Tumer). A family that
  declares none is refused by the config loader in one line.

* **C3** (Chen et al. 2026, "Contextual Counterfactual Credit Assignment for Multi-Agent RL in LLM
  Collaboration", arXiv 2603.06859; survey §5): freeze the turn's exact context, evaluate ``k``
  context-matched alternatives by replay, and compare the realized outcome with a leave-one-out
  baseline over the alternatives. The real action and the ``k`` counterfactuals are ``k + 1``
  candidates of one context; the real one's LOO baseline is the mean of the other ``k``:

      c_t = G_t(real episode) - (1/k) sum_j G_t(counterfactual_j)

  With ``resample`` this is an unbiased estimate of the exact advantage ``Q(s_t, a_t) - V(s_t)``
  *in expectation over episodes* (``G_t`` of the one real episode is a single sample of
  ``Q(s_t, a_t)``): a routine turn's credit is 0 on average but not per episode.

* **CCPO** (Li et al. 2026c, "Counterfactual Credit Policy Optimization for Multi-Agent
  Collaboration", arXiv 2603.21563; survey §5): turn credit as the *average treatment effect* of the
  turn's action in the trajectory's structural causal model, both arms estimated by replay:

      ATE_t = (1/k) sum_j G_t(do(a_t = real action))_j - (1/k) sum_j G_t(do(a_t = counterfactual))_j

  **How it differs from C3:** the treated arm is not the one realized outcome but the mean of
  ``k`` replays that force the real action and let the policy continue (``k >= 2`` per arm), so as
  ``k`` grows each turn's credit itself converges to ``Q(s_t, a_t) - V(s_t)`` (a routine turn's to
  0 in every episode, not only on average); the price is twice the replays of C3 at the same ``k``.

Turn credit goes to every action token of the turn (``steps_to_tokens``), observation tokens get 0.
The replays share the episode's environment random stream (same episode seed: the exogenous noise
of the structural causal model is held fixed, as in a counterfactual), so on a stochastic family
they differ only by the actions.

Overhead: the provider's (forks/resets/restores, env steps incl. replay steps, generated and
forward tokens of the replays); ``stats["counterfactual_replays"]`` counts the replayed episodes.

Simplified: both papers are multi-agent (an agent's message is the "turn"); here the turns of one
single-agent episode are the decisions. C3 also trains on the sampled alternatives (each with its own
LOO advantage); here only the real episode's tokens are trained (the provider returns returns, not
tokens). The model-based variant (an LLM predicting the counterfactual outcome instead of replaying,
survey §5) is not implemented. CCPO's second allocator (verifier-anchored LLM self-evaluation) is not
implemented; CCPO's "agent removed" counterfactual is the ``default`` action here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from stages.config_fields import param
from stages.credit.base import CreditConfig, CreditContext, CreditMethod, MCRollouts
from stages.credit.registry import register_method
from stages.credit.segments import steps_to_tokens
from stages.schema import Batch, BatchTensors, CreditResult, Overhead

COUNTERFACTUALS = ("resample", "default")

# --------------------------------------------------------------------------------------------
# replays of each turn with a counterfactual (or the real) action
# --------------------------------------------------------------------------------------------


def turn_points(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Every turn of every trajectory: ``(rows (N,), turns (N,), starts)`` with ``starts`` the
    ``(row, action start position)`` pairs the provider forks at."""
    pts = [(b, t.index, t.action_span[0]) for b, tr in enumerate(batch.trajectories) for t in tr.turns]
    rows = torch.tensor([p[0] for p in pts], dtype=torch.long)
    turns = torch.tensor([p[1] for p in pts], dtype=torch.long)
    return rows, turns, [(p[0], p[2]) for p in pts]


def realized_returns_to_go(batch: Batch, num_turns: int) -> torch.Tensor:
    """(B, K) ``G_t`` of the real episodes: terminal reward + rewards of turns t, t+1, ...
    (nan at absent turns). Reverse cumulative sum over turns (vectorized over rows)."""
    B, K = len(batch), max(num_turns, 1)
    r = torch.zeros((B, K))
    present = torch.zeros((B, K), dtype=torch.bool)
    for b, tr in enumerate(batch.trajectories):  # bookkeeping of the recorded turns (no tokens)
        n = min(len(tr.turns), K)
        r[b, :n] = torch.tensor([t.reward for t in tr.turns[:n]])
        present[b, :n] = True
    terminal = torch.tensor([tr.reward for tr in batch.trajectories], dtype=r.dtype)
    rtg = r.flip(-1).cumsum(-1).flip(-1) + terminal.unsqueeze(-1)
    return torch.where(present, rtg, torch.full_like(rtg, float("nan")))


def replay_returns(mc: MCRollouts, starts: list[tuple[int, int]], k: int, texts: Optional[list[str]],
                   name: str) -> tuple[torch.Tensor, Overhead]:
    """(N, k) returns-to-go of ``k`` real replays from each start: a fresh policy sample at the turn
    (``texts=None``) or the given action text forced at it, the policy continuing."""
    if not starts:
        return torch.zeros((0, k)), Overhead()
    G, overhead = mc(starts, k, replacements=texts) if texts is not None else mc(starts, k)
    G = torch.as_tensor(G, dtype=torch.get_default_dtype())
    if tuple(G.shape) != (len(starts), k):
        raise ValueError(f"credit method {name!r}: mc_rollouts returned shape {tuple(G.shape)}, expected "
                         f"({len(starts)}, {k}) for {len(starts)} turns and k={k}")
    if not bool(torch.isfinite(G).all()):
        raise ValueError(f"credit method {name!r}: mc_rollouts returned a non-finite return")
    return G, overhead if overhead is not None else Overhead()


def counterfactual_arm(method: CreditMethod, ctx: CreditContext, starts: list[tuple[int, int]],
                       k: int) -> tuple[torch.Tensor, Overhead]:
    """(N, k) returns of the counterfactual replays (``credit.counterfactual``)."""
    cfg = method.cfg
    texts = None
    if cfg.counterfactual == "default":  # type: ignore[attr-defined]
        if not ctx.default_action:
            raise ValueError(f"credit method {method.name!r}: credit.counterfactual=default needs the family's "
                             "default action (TaskFamily.default_action) and the stages provided none")
        texts = [ctx.default_action] * len(starts)
    assert ctx.mc_rollouts is not None  # CreditMethod.__call__ checked ``needs``
    return replay_returns(ctx.mc_rollouts, starts, k, texts, method.name)


def needs_for(cfg: CreditConfig) -> frozenset[str]:
    """A counterfactual method's needs: replays, and the family's default action with ``default``
    (the instance's ``needs``, which the providers read)."""
    extra = {"default_action"} if cfg.counterfactual == "default" else set()  # type: ignore[attr-defined]
    return frozenset({"mc_rollouts"} | extra)


def _scatter(values: torch.Tensor, rows: torch.Tensor, turns: torch.Tensor, B: int, K: int) -> torch.Tensor:
    out = torch.full((B, K), float("nan"), dtype=values.dtype)
    if rows.numel():
        out[rows, turns] = values
    return out


def _result(credit: torch.Tensor, baseline: torch.Tensor, tensors: BatchTensors, overhead: Overhead,
            stats: dict[str, float]) -> CreditResult:
    mask = (tensors.response_mask != 0).to(credit.dtype)
    adv = steps_to_tokens(credit, tensors.turn_ids) * mask
    present = ~torch.isnan(credit)
    stats = {
        **stats,
        "turn_credit_abs_mean": float(credit[present].abs().mean()) if present.any() else 0.0,
        "turn_credit_mean": float(credit[present].mean()) if present.any() else 0.0,
        "counterfactual_baseline_mean": float(baseline[present].mean()) if present.any() else 0.0,
    }
    return CreditResult(advantages=adv, granularity="turn", credit=credit, overhead=overhead, stats=stats)


def _num_turns(tensors: BatchTensors, batch: Batch) -> int:
    K = int(tensors.num_turns.max().item()) if tensors.num_turns.numel() else 0
    return max(K, max((len(t.turns) for t in batch.trajectories), default=0), 1)


# --------------------------------------------------------------------------------------------
# C3
# --------------------------------------------------------------------------------------------


@dataclass
class C3Config(CreditConfig):
    method: str = param("c3", help="credit-assignment method (registry name; C3, Chen et al. 2026)")
    k: int = param(4, help="counterfactual replays per turn; the real action's leave-one-out baseline is their mean (Chen et al. 2026)", ge=1)
    counterfactual: str = param("resample", help="counterfactual action: resample (a fresh policy sample at the turn) | default (the family's default action text)", choices=COUNTERFACTUALS)


@register_method
class C3(CreditMethod):
    """C3: a turn's credit is the real episode's return-to-go minus the mean return-to-go of ``k``
    real replays of the same context with a counterfactual action at the turn (leave-one-out
    baseline over the alternatives; module docstring; Chen et al. 2026; survey §5)."""

    name = "c3"
    Config = C3Config
    granularity = "turn"
    methodology = "Counterfactual"
    needs = frozenset({"mc_rollouts"})
    reference = "Chen et al. 2026 (C3: contextual counterfactual credit assignment, arXiv 2603.06859); survey §5"

    def __init__(self, cfg: CreditConfig):
        super().__init__(cfg)
        self.needs = needs_for(cfg)

    def checklist_note(self) -> str:
        return f"counterfactual={self.cfg.counterfactual}, k={self.cfg.k} real replays per turn"  # type: ignore[attr-defined]

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: C3Config = self.cfg  # type: ignore[assignment]
        B, K = len(batch), _num_turns(tensors, batch)
        rows, turns, starts = turn_points(batch)
        G_cf, overhead = counterfactual_arm(self, ctx, starts, cfg.k)
        real = realized_returns_to_go(batch, K)
        baseline = _scatter(G_cf.mean(-1), rows, turns, B, K)
        credit = real - baseline
        # the alternatives' own LOO advantages (C3 scores every candidate of a context; not trained on here)
        cand = torch.cat([real[rows, turns].unsqueeze(-1), G_cf], dim=-1) if rows.numel() else torch.zeros((0, cfg.k + 1))
        loo = cand - (cand.sum(-1, keepdim=True) - cand) / cfg.k
        stats = {
            "replayed_turns": float(len(starts)),
            "counterfactual_replays": float(len(starts) * cfg.k),
            "alternative_loo_abs_mean": float(loo[:, 1:].abs().mean()) if rows.numel() else 0.0,
            "outcome_changed_fraction": float((G_cf != real[rows, turns].unsqueeze(-1)).float().mean()) if rows.numel() else 0.0,
        }
        return _result(credit, baseline, tensors, overhead, stats)


# --------------------------------------------------------------------------------------------
# CCPO
# --------------------------------------------------------------------------------------------


@dataclass
class CCPOConfig(CreditConfig):
    method: str = param("ccpo", help="credit-assignment method (registry name; CCPO, Li et al. 2026c)")
    k: int = param(4, help="replays per arm and turn: k forcing the real action, k with the counterfactual (Li et al. 2026c ATE)", ge=2)
    counterfactual: str = param("resample", help="control arm's action: resample (a fresh policy sample at the turn) | default (the family's default action text)", choices=COUNTERFACTUALS)


@register_method
class CCPO(CreditMethod):
    """CCPO: a turn's credit is the average treatment effect of its action, the mean return-to-go
    of ``k`` replays forcing the real action minus that of ``k`` replays with the counterfactual
    (module docstring; Li et al. 2026c; survey §5)."""

    name = "ccpo"
    Config = CCPOConfig
    granularity = "turn"
    methodology = "Counterfactual"
    needs = frozenset({"mc_rollouts"})
    reference = "Li et al. 2026c (CCPO: counterfactual credit policy optimization, arXiv 2603.21563); survey §5"

    def __init__(self, cfg: CreditConfig):
        super().__init__(cfg)
        self.needs = needs_for(cfg)

    def checklist_note(self) -> str:
        return f"ATE with counterfactual={self.cfg.counterfactual}, k={self.cfg.k} real replays per arm and turn"  # type: ignore[attr-defined]

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: CCPOConfig = self.cfg  # type: ignore[assignment]
        assert ctx.mc_rollouts is not None  # CreditMethod.__call__ checked ``needs``
        B, K = len(batch), _num_turns(tensors, batch)
        rows, turns, starts = turn_points(batch)
        texts = [batch.trajectories[b].turns[t].action_text for b, t in zip(rows.tolist(), turns.tolist())]
        G_do, over_do = replay_returns(ctx.mc_rollouts, starts, cfg.k, texts, self.name)
        G_cf, over_cf = counterfactual_arm(self, ctx, starts, cfg.k)
        treated = _scatter(G_do.mean(-1), rows, turns, B, K)
        baseline = _scatter(G_cf.mean(-1), rows, turns, B, K)
        credit = treated - baseline
        real = realized_returns_to_go(batch, K)
        present = ~torch.isnan(real)
        stats = {
            "replayed_turns": float(len(starts)),
            "counterfactual_replays": float(2 * len(starts) * cfg.k),
            "treated_mean": float(treated[present].mean()) if present.any() else 0.0,
            # how far one realized outcome is from the treated arm's mean (what C3 uses instead)
            "realized_vs_treated_abs": float((real - treated)[present].abs().mean()) if present.any() else 0.0,
        }
        return _result(credit, baseline, tensors, over_do + over_cf, stats)
