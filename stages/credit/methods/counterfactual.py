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

import time
from dataclasses import dataclass
from typing import Optional

import torch

from stages.benchmark.metrics import identification, spearman
from stages.config_fields import param
from stages.credit.base import CreditConfig, CreditContext, CreditMethod, MCRollouts
from stages.credit.judge_config import JudgeCreditConfig
from stages.credit.methods.judged_turns import _scores as judge_scores
from stages.credit.registry import register_method
from stages.credit.segments import steps_to_tokens
from stages.reward.judge import check_judge_config, judge_overhead, usage
from stages.reward.judge_prompts import counterfactual_outcome_prompt
from stages.schema import Batch, BatchTensors, CreditResult, Overhead

COUNTERFACTUALS = ("resample", "default")
#: where a counterfactual's outcome comes from: a real replay, or an LLM's prediction (survey §5.2)
OUTCOMES = ("replay", "model")

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
    """A counterfactual method's needs (the instance's ``needs``, which the providers read): replays
    (``counterfactual_outcome=replay``, or ``model`` with ``compare_replay``), the judge
    (``model``), the policy's fresh action samples (``mc_rollouts``' ``sample_actions``, ``model``
    with ``resample``; no environment), and the family's default action with ``default``."""
    model = cfg.counterfactual_outcome == "model"  # type: ignore[attr-defined]
    need = set()
    if not model or cfg.compare_replay or cfg.counterfactual == "resample":  # type: ignore[attr-defined]
        need.add("mc_rollouts")
    if model:
        need.add("judge")
    if cfg.counterfactual == "default":  # type: ignore[attr-defined]
        need.add("default_action")
    return frozenset(need)


# --------------------------------------------------------------------------------------------
# the model-based counterfactual: an LLM predicts each counterfactual's outcome (survey §5.2)
# --------------------------------------------------------------------------------------------


@dataclass
class OutcomeConfig(JudgeCreditConfig):
    """The fields of a counterfactual method that pick the outcome's source (and the judge's fields)."""

    counterfactual_outcome: str = param("replay", help="counterfactual outcome: replay (the episode really replayed from the forked context) | model (the LLM judge, credit.judge, predicts P(success) after the counterfactual action; survey §5.2)", choices=OUTCOMES)
    compare_replay: bool = param(False, help="with counterfactual_outcome=model: also really replay the same counterfactual actions and log the agreement of model and replay credit (and each one's against the exact advantage) and their cost ratio; a diagnostic that spends both")

    def config_rules(self):
        """``compare_replay`` compares the model with the replay; judge fields are read by the model only."""
        if self.compare_replay and self.counterfactual_outcome != "model":
            yield "compare_replay", "needs credit.counterfactual_outcome=model (it compares the LLM's predicted outcomes with the replay's)"
        if self.counterfactual_outcome == "replay" and self.judge != "policy":
            yield "judge", ("is read only with credit.counterfactual_outcome=model (the replay needs no judge); "
                            "set credit.counterfactual_outcome=model or leave credit.judge=policy")


def counterfactual_actions(method: CreditMethod, ctx: CreditContext, starts: list[tuple[int, int]],
                           k: int) -> tuple[list[list[str]], Overhead]:
    """The counterfactual actions the model is asked about, exactly as the replay would take them:
    ``k`` fresh policy samples at the turn's context (``resample``; generated, no environment) or the
    family's default action (``default``: one per turn, the ``k`` replays' identical action asked once)."""
    if method.cfg.counterfactual == "default":  # type: ignore[attr-defined]
        if not ctx.default_action:
            raise ValueError(f"credit method {method.name!r}: credit.counterfactual=default needs the family's "
                             "default action (TaskFamily.default_action) and the stages provided none")
        return [[ctx.default_action] for _ in starts], Overhead()
    sample = getattr(ctx.mc_rollouts, "sample_actions", None)
    if sample is None:
        raise ValueError(f"credit method {method.name!r}: counterfactual_outcome=model with counterfactual=resample needs "
                         f"the mc_rollouts provider's sample_actions() (fresh policy samples of a turn's action), and "
                         f"{type(ctx.mc_rollouts).__name__} has none")
    return sample(starts, k) if starts else ([], Overhead())


def predicted_returns(method: CreditMethod, ctx: CreditContext, batch: Batch, rows: torch.Tensor, turns: torch.Tensor,
                      actions: list[list[str]]) -> tuple[torch.Tensor, Overhead]:
    """(N, m) the judge's P(success) after each turn's ``m`` given actions (nan = unparsed): the
    model's stand-in for the replays' returns-to-go (exact where the return is the 0/1 success)."""
    m = len(actions[0]) if actions else 1
    if ctx.judge is None:
        raise ValueError(f"credit method {method.name!r}: counterfactual_outcome=model needs the judge (credit.judge)")
    trajs = batch.trajectories
    prompts = [counterfactual_outcome_prompt(trajs[b], t, a)
               for b, t, acts in zip(rows.tolist(), turns.tolist(), actions) for a in acts]
    before = usage(ctx.judge)
    p = judge_scores(method.name, ctx.judge, prompts).reshape(len(actions), m)
    return p, judge_overhead(ctx.judge, before)


def _nanmean_or(x: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Mean over the last dim ignoring nan; ``fallback`` where every entry is nan (an unparsed turn)."""
    ok = ~torch.isnan(x)
    n = ok.sum(-1)
    mean = torch.where(ok, x, torch.zeros_like(x)).sum(-1) / n.clamp(min=1)
    return torch.where(n > 0, mean, fallback)


def replay_the_actions(method: CreditMethod, ctx: CreditContext, starts: list[tuple[int, int]],
                       actions: list[list[str]], k: int) -> tuple[torch.Tensor, Overhead]:
    """(N, m) real replays of exactly the counterfactual actions the model was asked about: each
    resampled action forced at its turn once; the default action ``k`` times (its replays differ by
    the continuation only)."""
    assert ctx.mc_rollouts is not None
    if method.cfg.counterfactual == "default":  # type: ignore[attr-defined]
        return replay_returns(ctx.mc_rollouts, starts, k, [a[0] for a in actions], method.name)
    m = len(actions[0]) if actions else k
    rep = [s for s in starts for _ in range(m)]
    G, ov = replay_returns(ctx.mc_rollouts, rep, 1, [a for acts in actions for a in acts], method.name)
    return G.reshape(len(starts), m), ov


def _cost(prefix: str, ov: Overhead, seconds: float) -> dict[str, float]:
    return {f"{prefix}_forward_tokens": float(ov.forward_tokens), f"{prefix}_generated_tokens": float(ov.extra_tokens),
            f"{prefix}_env_steps": float(ov.env_steps), f"{prefix}_env_forks": float(ov.env_restores + ov.env_resets),
            f"{prefix}_judge_calls": float(ov.judge_calls), f"{prefix}_seconds": float(seconds)}


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def comparison_stats(model: torch.Tensor, replay: torch.Tensor, tensors: BatchTensors, p: torch.Tensor,
                     G: torch.Tensor, ov_model: Overhead, ov_replay: Overhead, s_model: float,
                     s_replay: float) -> dict[str, float]:
    """Model-based vs replay credit of the same turns and counterfactual actions (``compare_replay``):
    Spearman and sign agreement between them (on the turns where the replay credit is non-zero), the
    predicted outcomes' mean absolute error against the replays', each credit's sign accuracy and
    Spearman against the exact per-turn advantage (families with ground truth:
    :func:`stages.benchmark.metrics.identification`), and the cost of both and its ratios."""
    present = ~torch.isnan(model) & ~torch.isnan(replay)
    mc, rc = model[present], replay[present]
    nz = rc != 0
    out = {
        "compare_spearman": spearman(mc, rc),
        "compare_sign_agreement": float((torch.sign(mc[nz]) == torch.sign(rc[nz])).float().mean()) if bool(nz.any()) else float("nan"),
        "compare_credit_abs_diff": float((mc - rc).abs().mean()) if mc.numel() else float("nan"),
    }
    ok = ~torch.isnan(p)
    if p.shape == G.shape:
        out["compare_outcome_mae"] = float((p[ok] - G[ok]).abs().mean()) if bool(ok.any()) else float("nan")
    else:  # default: one prediction per turn against the mean of its k replays
        pm, gm = _nanmean_or(p, torch.full(p.shape[:1], float("nan"))), G.mean(-1)
        keep = ~torch.isnan(pm)
        out["compare_outcome_mae"] = float((pm[keep] - gm[keep]).abs().mean()) if bool(keep.any()) else float("nan")
    gt = tensors.gt_turn_advantage
    if gt is not None:
        valid = present & ~torch.isnan(gt[:, : model.shape[1]])
        g = gt[:, : model.shape[1]][valid]
        for name, c in (("model", model), ("replay", replay)):
            ident = identification(c[valid], g)
            out[f"compare_{name}_gt_sign_accuracy"] = ident["sign_accuracy"]
            out[f"compare_{name}_gt_spearman"] = ident["spearman"]
    out.update(_cost("model", ov_model, s_model))
    out.update(_cost("replay", ov_replay, s_replay))
    out["cost_ratio_forward_tokens"] = _ratio(ov_model.forward_tokens, ov_replay.forward_tokens)
    out["cost_ratio_env_steps"] = _ratio(ov_model.env_steps, ov_replay.env_steps)
    out["cost_ratio_seconds"] = _ratio(s_model, s_replay)
    return out


def model_arm(method: CreditMethod, ctx: CreditContext, batch: Batch, rows: torch.Tensor, turns: torch.Tensor,
              starts: list[tuple[int, int]], k: int, fallback: torch.Tensor
              ) -> tuple[torch.Tensor, Overhead, dict[str, float], Optional[tuple]]:
    """The counterfactual arm's (N,) mean outcome from the model: counterfactual actions as the replay
    would take them, the judge's P(success) after each (``fallback`` for a turn none of whose
    predictions parsed). With ``compare_replay`` also the replays of the same actions; returns
    ``(mean, overhead spent, stats, (p, G, overhead_model, overhead_replay, s_model, s_replay))``."""
    t0 = time.perf_counter()
    actions, ov_sample = counterfactual_actions(method, ctx, starts, k)
    p, ov_judge = predicted_returns(method, ctx, batch, rows, turns, actions)
    ov_model, s_model = ov_sample + ov_judge, time.perf_counter() - t0
    stats = {"model_predictions": float(p.numel()), "unparsed_predictions": float(torch.isnan(p).sum()),
             "predicted_success_mean": float(p[~torch.isnan(p)].mean()) if bool((~torch.isnan(p)).any()) else 0.0}
    stats.update(_cost("model", ov_model, s_model))
    mean = _nanmean_or(p, fallback)
    if not method.cfg.compare_replay:  # type: ignore[attr-defined]
        return mean, ov_model, stats, None
    t0 = time.perf_counter()
    G, ov_replay = replay_the_actions(method, ctx, starts, actions, k)
    return mean, ov_model + ov_replay, stats, (p, G, ov_model, ov_replay, s_model, time.perf_counter() - t0)


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
class C3Config(OutcomeConfig):
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
        if cfg.counterfactual_outcome == "model":  # type: ignore[attr-defined]
            check_judge_config(cfg)

    def checklist_note(self) -> str:
        return f"counterfactual={self.cfg.counterfactual}, k={self.cfg.k} real replays per turn"  # type: ignore[attr-defined]

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: C3Config = self.cfg  # type: ignore[assignment]
        B, K = len(batch), _num_turns(tensors, batch)
        rows, turns, starts = turn_points(batch)
        real = realized_returns_to_go(batch, K)
        if cfg.counterfactual_outcome == "model":
            return self._assign_model(tensors, batch, ctx, rows, turns, starts, real, B, K)
        G_cf, overhead = counterfactual_arm(self, ctx, starts, cfg.k)
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

    def _assign_model(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext, rows: torch.Tensor,
                      turns: torch.Tensor, starts: list[tuple[int, int]], real: torch.Tensor, B: int,
                      K: int) -> CreditResult:
        """counterfactual_outcome=model: ``c_t = G_t(real) - mean_j P_judge(success | context, a_j)``
        (a turn none of whose predictions parsed gets 0: its baseline is its realized return)."""
        cfg: C3Config = self.cfg  # type: ignore[assignment]
        realized = real[rows, turns] if rows.numel() else torch.zeros(0)
        mean, overhead, stats, cmp = model_arm(self, ctx, batch, rows, turns, starts, cfg.k, realized)
        baseline = _scatter(mean, rows, turns, B, K)
        credit = real - baseline
        stats = {"replayed_turns": 0.0, "counterfactual_replays": 0.0, "predicted_turns": float(len(starts)), **stats}
        if cmp is not None:
            p, G, ov_m, ov_r, s_m, s_r = cmp
            replay_credit = real - _scatter(G.mean(-1), rows, turns, B, K)
            stats["counterfactual_replays"] = float(G.numel())
            stats.update(comparison_stats(credit, replay_credit, tensors, p, G, ov_m, ov_r, s_m, s_r))
        return _result(credit, baseline, tensors, overhead, stats)


# --------------------------------------------------------------------------------------------
# CCPO
# --------------------------------------------------------------------------------------------


@dataclass
class CCPOConfig(OutcomeConfig):
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
        if cfg.counterfactual_outcome == "model":  # type: ignore[attr-defined]
            check_judge_config(cfg)

    def checklist_note(self) -> str:
        return f"ATE with counterfactual={self.cfg.counterfactual}, k={self.cfg.k} real replays per arm and turn"  # type: ignore[attr-defined]

    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        cfg: CCPOConfig = self.cfg  # type: ignore[assignment]
        assert ctx.mc_rollouts is not None  # CreditMethod.__call__ checked ``needs``
        B, K = len(batch), _num_turns(tensors, batch)
        rows, turns, starts = turn_points(batch)
        texts = [batch.trajectories[b].turns[t].action_text for b, t in zip(rows.tolist(), turns.tolist())]
        if cfg.counterfactual_outcome == "model":
            return self._assign_model(tensors, batch, ctx, rows, turns, starts, texts, B, K)
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

    def _assign_model(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext, rows: torch.Tensor,
                      turns: torch.Tensor, starts: list[tuple[int, int]], texts: list[str], B: int,
                      K: int) -> CreditResult:
        """counterfactual_outcome=model: both arms from the judge, ``ATE_t = P(success | a_t) -
        mean_j P(success | a_j)`` (one query for the real action: a local judge's answer to one prompt
        does not vary; 0 where an arm's predictions did not parse)."""
        cfg: CCPOConfig = self.cfg  # type: ignore[assignment]
        t0 = time.perf_counter()
        p_do, ov_do = predicted_returns(self, ctx, batch, rows, turns, [[a] for a in texts])
        s_do = time.perf_counter() - t0
        p_do = p_do.reshape(-1)
        mean, ov_spent, stats, cmp = model_arm(self, ctx, batch, rows, turns, starts, cfg.k, p_do)
        # an unparsed arm takes the other arm's value (credit 0); both unparsed: 0 - 0
        mean = torch.nan_to_num(mean)
        treated_n = torch.where(torch.isnan(p_do), mean, p_do)
        treated, baseline = _scatter(treated_n, rows, turns, B, K), _scatter(mean, rows, turns, B, K)
        credit = treated - baseline
        ov_cf_model = cmp[2] if cmp is not None else ov_spent  # the model's part of the control arm
        stats.update(_cost("model", ov_do + ov_cf_model, s_do + stats["model_seconds"]))
        stats.update({"replayed_turns": 0.0, "counterfactual_replays": 0.0, "predicted_turns": float(len(starts)),
                      "model_predictions": stats["model_predictions"] + float(p_do.numel()),
                      "unparsed_predictions": stats["unparsed_predictions"] + float(torch.isnan(p_do).sum())})
        overhead = ov_do + ov_spent
        if cmp is not None:  # the replay's treated arm too: k replays forcing the real action
            p, G, ov_m, ov_r, s_m, s_r = cmp
            assert ctx.mc_rollouts is not None
            t0 = time.perf_counter()
            G_do, ov_rdo = replay_returns(ctx.mc_rollouts, starts, cfg.k, texts, self.name)
            s_r += time.perf_counter() - t0
            replay_credit = _scatter(G_do.mean(-1), rows, turns, B, K) - _scatter(G.mean(-1), rows, turns, B, K)
            overhead = overhead + ov_rdo
            stats["counterfactual_replays"] = float(G.numel() + G_do.numel())
            stats.update(comparison_stats(credit, replay_credit, tensors, p, G, ov_do + ov_m, ov_r + ov_rdo,
                                          s_do + s_m, s_r))
        return _result(credit, baseline, tensors, overhead, stats)
