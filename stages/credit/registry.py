"""The credit-assignment registry (stage 4 of survey §8): name -> :class:`~stages.credit.base.CreditMethod`.

One registry decorator, as verl's ``core_algos`` has (DESIGN.md, "Examples worth following"):
a method module decorates its class with :func:`register_method`; ``credit.method`` in the run
config picks it by ``name``. The built-in methods (:mod:`stages.credit.methods`) register when
that package is imported: the registry does not import them (they import it), so whoever looks
methods up by name imports ``stages.credit.methods`` first (``flows.config`` does).
"""

from __future__ import annotations

from stages.credit.base import NEEDS, CreditConfig, CreditMethod

_METHODS: dict[str, type[CreditMethod]] = {}


def register_method(cls: type[CreditMethod]) -> type[CreditMethod]:
    """Class decorator adding ``cls`` to the registry under ``cls.name``.

    Refuses needs outside :data:`~stages.credit.base.NEEDS`, a ``process_rewards`` need without
    the source fields in the method's Config, and a name registered twice."""
    unknown = set(cls.needs) - set(NEEDS)
    if unknown:
        raise ValueError(f"credit method {cls.name!r} declares unknown needs {sorted(unknown)}; known: {sorted(NEEDS)}")
    if "process_rewards" in cls.needs and not hasattr(cls.Config, "process_reward"):
        raise ValueError(f"credit method {cls.name!r} needs process_rewards: its Config must have the source fields "
                         "(inherit stages.reward.process.ProcessRewardConfig)")
    if cls.name in _METHODS:
        raise ValueError(f"credit method {cls.name!r} registered twice")
    _METHODS[cls.name] = cls
    return cls


def method_names() -> list[str]:
    """Names of the registered methods, sorted."""
    return sorted(_METHODS)


def get_method_class(name: str) -> type[CreditMethod]:
    """The method registered as ``name``; ``KeyError`` listing the known ones otherwise."""
    if name not in _METHODS:
        known = ", ".join(sorted(_METHODS)) or "none registered (importing stages.credit.methods registers the built-in ones)"
        raise KeyError(f"unknown credit method {name!r}; known methods: {known}")
    return _METHODS[name]


def build_method(cfg: CreditConfig) -> CreditMethod:
    """An instance of the method ``cfg.method`` names, configured by ``cfg``."""
    return get_method_class(cfg.method)(cfg)
