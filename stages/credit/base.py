"""The credit-assignment registry (stage 4 of survey §8).

Every method is a :class:`CreditMethod` subclass registered with :func:`register_method`. A
method *declares* what it needs from the other stages (``needs``: e.g. ``{"critic"}``) and the
stages provide it through :class:`CreditContext`; the pipeline never branches on a method's name.
Each method also declares its own config dataclass (``Config``, subclass of
:class:`CreditConfig`): its fields are exactly the keys allowed under ``credit.`` in the run
config when ``credit.method`` names that method.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional, Protocol

import torch

from stages.schema import Batch, BatchTensors, CreditResult


@dataclass
class CreditConfig:
    """Base of every method's config; ``method`` selects the registry entry."""

    method: str = "grpo"  # credit-assignment method (registry name; `creditflow methods` lists them)


class Critic(Protocol):
    """A learned value function V(s) over response positions (provided by the update stage)."""

    def values(self, tensors: BatchTensors) -> torch.Tensor:
        """(B, R) value of the state *before* each response token (no grad)."""


@dataclass
class CreditContext:
    """What the stages provide to a credit method, by its declared ``needs``."""

    critic: Optional[Critic] = None
    #: greedy (argmax) rollout of each trajectory's task instance: batch -> ((B,) greedy return, Overhead)
    greedy_rollout: Optional[Callable[[Batch], tuple[torch.Tensor, Any]]] = None
    generator: Optional[torch.Generator] = None
    extras: dict[str, Any] = field(default_factory=dict)


class CreditMethod(abc.ABC):
    """One credit-assignment method. Subclasses set the class attributes and implement ``assign``."""

    name: ClassVar[str]
    Config: ClassVar[type[CreditConfig]] = CreditConfig
    #: granularity of the method's native credit (schema.GRANULARITIES)
    granularity: ClassVar[str]
    #: methodology family per the survey's taxonomy (§2.4 / Appendix B column "Methodology")
    methodology: ClassVar[str]
    #: True for episode-level baselines (GRPO, PPO, RLOO, ...) — Appendix C "episode-level baseline"
    episode_level_baseline: ClassVar[bool] = False
    #: what the method needs the stages to provide: subset of {"critic", "greedy_rollout"}
    needs: ClassVar[frozenset[str]] = frozenset()
    #: short citation of the paper / survey section the method implements
    reference: ClassVar[str] = ""

    def __init__(self, cfg: CreditConfig):
        self.cfg = cfg

    @abc.abstractmethod
    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        """Compute per-token advantages and the native credit (vectorized torch)."""

    def __call__(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        missing = [n for n in sorted(self.needs) if getattr(ctx, n, None) is None]
        if missing:
            raise ValueError(f"credit method {self.name!r} needs {missing} but the stages did not provide it")
        t0 = time.perf_counter()
        result = self.assign(tensors, batch, ctx)
        result.overhead.wall_seconds += time.perf_counter() - t0
        return result


_METHODS: dict[str, type[CreditMethod]] = {}


def register_method(cls: type[CreditMethod]) -> type[CreditMethod]:
    """Class decorator adding ``cls`` to the registry under ``cls.name``."""
    if cls.name in _METHODS:
        raise ValueError(f"credit method {cls.name!r} registered twice")
    _METHODS[cls.name] = cls
    return cls


def _load_builtin() -> None:
    import stages.credit.methods  # noqa: F401  (registers the built-in methods)


def method_names() -> list[str]:
    _load_builtin()
    return sorted(_METHODS)


def get_method_class(name: str) -> type[CreditMethod]:
    _load_builtin()
    if name not in _METHODS:
        raise KeyError(f"unknown credit method {name!r}; known methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def build_method(cfg: CreditConfig) -> CreditMethod:
    return get_method_class(cfg.method)(cfg)
