"""The policy-loss registry of stage 5 (survey §2.6, §8), after verl's ``register_policy_loss`` /
``get_policy_loss_fn`` (``verl/trainer/ppo/core_algos.py``).

A loss is a function registered with :func:`register_loss` under the name ``update.loss`` takes;
the accepted ``update.loss`` values are :func:`loss_names` (the field's ``choices`` call it), and
:class:`~stages.update.trainer.PolicyTrainer` looks the loss up by name and never branches on it.
Every loss has one signature (:data:`PolicyLoss`)::

    @register_loss("ppo", aggregation="token-mean", reference="Schulman et al. 2017, eq. 7")
    def ppo_loss(logprobs, old_logprobs, advantages, mask, cfg):
        ...
        return loss, {"clip_fraction": ..., ...}

* ``logprobs`` (B, R) log pi_theta of the response tokens (with grad), ``old_logprobs`` (B, R)
  behaviour log-probs of the rollout, ``advantages`` (B, R) per-token advantages of the credit
  stage, ``mask`` (B, R) float, 1 on policy tokens; ``cfg`` the :class:`UpdateConfig`;
* returns the scalar loss to minimise and a dict of detached float statistics (logged as
  ``update.<key>``).

A loss *declares* what it needs beyond those (``needs``, a subset of :data:`LOSS_NEEDS`, like a
credit method's ``needs``); the trainer provides each as a keyword argument of the same name,
e.g. ``needs=("ref_logprobs",)`` (DPO-family losses) makes the trainer keep a frozen reference
policy and call ``fn(..., cfg, ref_logprobs=...)``. ``aggregation`` (a mode of
:func:`stages.update.losses.aggregate`) is how the trainer averages the entropy bonus and the KL
penalty over tokens, so they are weighted like the loss itself.

``accepts`` (optional) names the credit granularities whose advantages the loss can read; the
turn-level losses of :mod:`stages.update.turn_losses` take one advantage per turn and accept
only ``episode`` and ``turn`` credit (constant on a turn), and the config loader refuses any other
``credit.method`` with them before compute.

The DPO-family losses (:mod:`stages.update.dpo_losses`) also need preference pairs
(``trajectory_pairs`` / ``turn_pairs``): the trainer builds them from the credit stage's
advantages (:mod:`stages.update.pairs`, the one mechanism by which credit reaches a pair loss) and
keeps each group's rows in one mini-batch.

Adding a loss (DPO-family, turn-level IS / clip for the agentic catalogue): a function in
:mod:`stages.update.losses` (or a module it imports) decorated with :func:`register_loss`, and a
test of its defining property against a direct computation (``tests/test_loss_registry.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

#: ``fn(logprobs, old_logprobs, advantages, mask, cfg, **needs) -> (loss, stats)``
PolicyLoss = Callable[..., "tuple[torch.Tensor, dict[str, float]]"]

#: every value a loss may put in ``needs``, and what the trainer then passes (keyword of that name)
LOSS_NEEDS: dict[str, str] = {
    "ref_logprobs": "(B, R) response log-probs under the frozen reference policy (no grad)",
    "turn_ids": "(B, R) long turn index of each policy token, -1 elsewhere (turn-level ratio / clip losses)",
    "trajectory_pairs": "(P, 2) long (chosen row, rejected row) of the mini-batch: per group the highest- vs the "
                        "lowest-advantage trajectory (stages/update/pairs.py; DPO on trajectories)",
    "turn_pairs": "(P, 4) long (chosen row, chosen turn, rejected row, rejected turn) of the mini-batch: per group "
                  "and anchor state the highest- vs the lowest-advantage turn (stages/update/pairs.py; DPO on turns)",
}

#: the needs that make the trainer keep a group's rows in one mini-batch (a pair never spans two)
PAIR_NEEDS = frozenset({"trajectory_pairs", "turn_pairs"})

#: aggregation modes of :func:`stages.update.losses.aggregate`
AGGREGATIONS = ("token-mean", "seq-mean-token-mean")


@dataclass(frozen=True)
class LossSpec:
    """One registered loss: the function and what it declares."""

    name: str
    fn: PolicyLoss
    aggregation: str
    needs: frozenset[str]
    #: short citation of the paper / section the loss implements
    reference: str
    #: credit granularities (schema.GRANULARITIES) whose advantages the loss accepts; None = all.
    #: Turn-level losses read one advantage per turn, so they accept only credit that is constant
    #: on a turn's tokens; :func:`flows.config.check_learnable` refuses the rest before compute
    accepts: "frozenset[str] | None" = None
    #: what the loss reads of the credit, for the one-line refusal of a granularity it does not accept
    reads: str = "takes one advantage per turn"
    #: how the loss corrects for rollouts sampled by an older policy than the one it updates
    #: (``rollout.max_staleness >= 1``), e.g. "token ratio to the behaviour log-probs, clipped"; ""
    #: = none declared, and :func:`flows.config.check_learnable` refuses the loss with stale rollouts
    off_policy: str = ""

    @property
    def needs_pairs(self) -> bool:
        return bool(self.needs & PAIR_NEEDS)

    def __call__(self, logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                 mask: torch.Tensor, cfg: Any, **provided: torch.Tensor
                 ) -> tuple[torch.Tensor, dict[str, float]]:
        missing = sorted(self.needs - set(provided))
        if missing:
            raise ValueError(f"loss {self.name!r} needs {missing} but the trainer did not provide it")
        return self.fn(logprobs, old_logprobs, advantages, mask, cfg, **{k: provided[k] for k in self.needs})


_LOSSES: dict[str, LossSpec] = {}


def register_loss(name: str, *, aggregation: str, needs: tuple[str, ...] = (), reference: str = "",
                  accepts: "tuple[str, ...] | None" = None, reads: str = "takes one advantage per turn",
                  off_policy: str = "") -> Callable[[PolicyLoss], PolicyLoss]:
    """Decorator adding a :data:`PolicyLoss` to the registry under ``name`` (see the module docstring)."""
    unknown = set(needs) - set(LOSS_NEEDS)
    if unknown:
        raise ValueError(f"loss {name!r} declares unknown needs {sorted(unknown)}; known: {sorted(LOSS_NEEDS)}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"loss {name!r}: aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")

    def add(fn: PolicyLoss) -> PolicyLoss:
        if name in _LOSSES:
            raise ValueError(f"loss {name!r} registered twice")
        _LOSSES[name] = LossSpec(name, fn, aggregation, frozenset(needs), reference,
                                 frozenset(accepts) if accepts is not None else None, reads, off_policy)
        return fn

    return add


def unregister_loss(name: str) -> None:
    """Remove ``name`` from the registry (for losses a test registers)."""
    _LOSSES.pop(name, None)


def loss_names() -> list[str]:
    """The accepted ``update.loss`` values."""
    return sorted(_LOSSES)


def get_loss(name: str) -> LossSpec:
    if name not in _LOSSES:
        raise KeyError(f"unknown loss {name!r}; known losses: {', '.join(sorted(_LOSSES))}")
    return _LOSSES[name]
